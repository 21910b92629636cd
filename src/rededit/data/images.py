"""Image decoding and the resize-to-bucket geometry.

Every image reaches training through :func:`load_image` (URI → fully decoded PIL image) and
:func:`resize_to_bucket` (scale to cover the bucket, centre-crop). Annotations that live in target
pixel coordinates (face landmarks, object boxes) must follow the image through the same scale and
crop, so one function, :func:`cover_crop_params`, owns that arithmetic and :func:`resize_to_bucket`,
:func:`transform_points` and :func:`transform_boxes` all derive from it.

Coordinates are continuous pixel coordinates: ``(0, 0)`` is the top-left corner of the top-left pixel
and ``(W, H)`` the bottom-right corner of the image (PIL's convention), x to the right, y down. Under
the cover-crop a point maps as ``x' = x * scale - crop_left``, ``y' = y * scale - crop_top``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rededit.data.uri import resolve_uri

__all__ = [
    "ImageDecodeError",
    "cover_crop_params",
    "load_image",
    "mask_to_tensor",
    "resize_to_bucket",
    "to_tensor",
    "transform_boxes",
    "transform_points",
]


class ImageDecodeError(Exception):
    """The bytes behind a URI exist but are not a decodable image (corrupt, truncated, not an image).

    Attributes:
        uri: the image URI as written in the manifest.
        reason: what the decoder reported.
    """

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"cannot decode image {uri!r}: {reason}")


class ImageSizeError(ImageDecodeError):
    """An image that decodes but cannot be used as stated: over the pixel cap, or not the size the manifest
    says (a lying header would put it in the wrong bucket)."""


# Pixel cap for every image rededit decodes (an 8k × 8k photo): PIL's own decompression-bomb limit lets a
# 176 MP PNG through (+0.84 GB per decode); training sizes are around 1 MP.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


def load_image(
    uri: str,
    root: str | Path,
    mode: str | None = "RGB",
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    expect_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Read and fully decode the image behind ``uri``.

    The pixels are decoded here (``Image.load()``), not lazily on first use, so a truncated or corrupt
    file fails at this call with the URI in the message instead of deep inside a collate function. The
    header is checked first, so an oversized image or one whose size the manifest misstates is refused
    before its pixels are decoded.

    Args:
        uri: image URI (see :func:`rededit.data.uri.resolve_uri`).
        root: folder that relative URIs resolve against (the manifest's folder).
        mode: PIL mode to convert to (``"RGB"``, ``"L"`` for masks), or None to keep the file's mode.
        max_pixels: refuse images with more pixels (None: no cap; the default is 64 MP, a 8k × 8k photo).
        expect_size: ``(width, height)`` the manifest states; another size is an error.

    Raises:
        FileNotFoundError: nothing exists at ``uri``.
        ImageDecodeError: the bytes are not a decodable image, the image is over ``max_pixels``, or its
            size is not ``expect_size`` (:class:`ImageSizeError`).
    """
    data = resolve_uri(uri, root)
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageSizeError(
                uri, f"{w}x{h} (WxH) is {w * h / 1e6:.1f} MP, over the {max_pixels / 1e6:.3g} MP cap"
            )
        if expect_size is not None and (w, h) != tuple(int(v) for v in expect_size):
            ew, eh = (int(v) for v in expect_size)
            raise ImageSizeError(uri, f"decoded size {w}x{h} (WxH) does not match the manifest's {ew}x{eh}")
        img.load()
        if mode is not None and img.mode != mode:
            img = img.convert(mode)
    except (MemoryError, ImageSizeError):
        raise
    except UnidentifiedImageError as e:
        # PIL's own message names the in-memory buffer (an address), useless in a report.
        raise ImageDecodeError(
            uri, "unrecognised image format (not an image, or its header is corrupt)"
        ) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors... by format
        raise ImageDecodeError(uri, f"{type(e).__name__}: {e}") from e
    return img


def cover_crop_params(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[float, float, float]:
    """Scale and centre-crop offsets that make a ``src_h x src_w`` image exactly cover ``dst_h x dst_w``.

    The image is scaled by ``scale = max(dst_h / src_h, dst_w / src_w)`` (aspect preserved, the
    bucket fully covered) and the ``dst_h x dst_w`` window centred in the scaled image is kept. The
    offsets are in scaled (destination) pixels and may be fractional: the crop is exact, with no
    rounding, so the image centre always maps to the bucket centre.

    Returns:
        ``(scale, crop_top, crop_left)``; a source point ``(x, y)`` lands at
        ``(x * scale - crop_left, y * scale - crop_top)``.
    """
    if min(src_h, src_w) <= 0 or min(dst_h, dst_w) <= 0:
        raise ValueError(f"sizes must be positive, got src {src_h}x{src_w} (HxW) and dst {dst_h}x{dst_w}")
    scale = max(dst_h / src_h, dst_w / src_w)
    crop_top = max(0.0, (src_h * scale - dst_h) / 2.0)
    crop_left = max(0.0, (src_w * scale - dst_w) / 2.0)
    return scale, crop_top, crop_left


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_to_bucket(
    img: Image.Image,
    height: int,
    width: int,
    resample: Image.Resampling | str = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Scale ``img`` to cover ``height x width`` (aspect preserved), then centre-crop to exactly that size.

    Resampling reads the (fractional) source window directly through PIL's ``box`` argument, so the
    pixels follow :func:`cover_crop_params` exactly, the same mapping :func:`transform_points` applies.

    Args:
        img: the image.
        height: bucket height.
        width: bucket width.
        resample: a PIL filter or its name (``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"lanczos"``);
            use ``"nearest"`` for label masks that must stay binary.
    """
    if isinstance(resample, str):
        if resample.lower() not in _RESAMPLE:
            raise ValueError(f"unknown resample filter {resample!r}; expected one of {sorted(_RESAMPLE)}")
        resample = _RESAMPLE[resample.lower()]
    src_w, src_h = img.size
    scale, top, left = cover_crop_params(src_h, src_w, height, width)
    x0, y0 = left / scale, top / scale
    # Clamp: float round-off must not push the window a hair past the source edge.
    box = (x0, y0, min(float(src_w), x0 + width / scale), min(float(src_h), y0 + height / scale))
    return img.resize((width, height), resample=resample, box=box)


def _hw(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"expected a (height, width) pair, got {size!r}")
    return int(size[0]), int(size[1])


def transform_points(points, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Map pixel coordinates through the cover-crop of :func:`resize_to_bucket`.

    Args:
        points: ``[..., 2]`` (x, y) coordinates in the source image (e.g. face landmarks ``[F, 5, 2]``).
        src_hw: (height, width) of the source image.
        dst_hw: (height, width) of the bucket.

    Returns:
        ``[..., 2]`` coordinates in the bucket image (float32 unless the input was float64). Points
        cropped away fall outside ``[0, W] x [0, H]``; they are kept, not clipped, so the caller decides.
    """
    pts = np.asarray(points)
    if pts.ndim == 0 or pts.shape[-1] != 2:
        raise ValueError(f"points must have shape [..., 2] (x, y), got {pts.shape}")
    dtype = pts.dtype if pts.dtype == np.float64 else np.float32
    scale, top, left = cover_crop_params(*_hw(src_hw), *_hw(dst_hw))
    out = pts.astype(np.float64) * scale - np.array([left, top])
    return out.astype(dtype)


def transform_boxes(boxes, src_hw: tuple[int, int], dst_hw: tuple[int, int], clip: bool = True) -> np.ndarray:
    """Map ``[..., 4]`` (x0, y0, x1, y1) boxes through the cover-crop of :func:`resize_to_bucket`.

    With ``clip`` the boxes are clipped to the bucket; a box cropped away entirely ends with zero area
    (``x1 <= x0`` or ``y1 <= y0``), which callers use to drop it.
    """
    arr = np.asarray(boxes)
    if arr.ndim == 0 or arr.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4] (x0, y0, x1, y1), got {arr.shape}")
    out = transform_points(arr.reshape(*arr.shape[:-1], 2, 2), src_hw, dst_hw).reshape(arr.shape)
    if clip:
        dst_h, dst_w = _hw(dst_hw)
        out[..., 0::2] = np.clip(out[..., 0::2], 0, dst_w)
        out[..., 1::2] = np.clip(out[..., 1::2], 0, dst_h)
    return out


def _uint8_hwc(img: Image.Image, allowed: tuple[str, ...]) -> np.ndarray:
    if img.mode not in allowed:
        raise ValueError(
            f"expected an 8-bit image in mode {'/'.join(allowed)}, got mode {img.mode!r}; convert it first"
        )
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only views
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_tensor(img: Image.Image, mask: bool = False) -> torch.Tensor:
    """8-bit image (L / RGB / RGBA) → float32 ``[C, H, W]`` in ``[-1, 1]`` (the VAE's input range).

    With ``mask`` the image is a mask instead: see :func:`mask_to_tensor` (``[1, H, W]`` in ``[0, 1]``).
    """
    if mask:
        return mask_to_tensor(img)
    arr = _uint8_hwc(img, ("L", "RGB", "RGBA"))
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32)
    return t.div_(127.5).sub_(1.0)


def tensor_to_pil(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Image.Image:
    """``[3, H, W]`` with values in ``value_range`` (the VAE's [-1, 1] by default; [0, 1] for rewards and
    judges) → RGB PIL image, clamped and rounded to 8 bits. The inverse of :func:`to_tensor`."""
    lo, hi = value_range
    arr = ((x.detach().float().cpu().clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def mask_to_tensor(img: Image.Image) -> torch.Tensor:
    """Mask image (mode ``1`` or ``L``) → float32 ``[1, H, W]`` in ``[0, 1]`` (1 = edited region)."""
    if img.mode == "1":
        img = img.convert("L")
    arr = _uint8_hwc(img, ("L",))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32).div_(255.0)
