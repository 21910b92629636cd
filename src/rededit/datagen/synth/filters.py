"""Algorithmic filter templates (report §2.3): stylisation filters and low-level degradations.

Both are deterministic image-signal operations, so a (source, target) pair is exact: ``stylize`` rows
map a clean scene to its filtered version, ``restore`` rows map a degraded version back to the clean
scene (the target is always the clean render). Random parameters come from the caller's generator.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from rededit.datagen.synth.scene import SIZE_MULTIPLE

STYLES: tuple[str, ...] = (
    "grayscale",
    "sepia",
    "posterize",
    "sketch",
    "emboss",
    "invert",
    "pixelate",
    "solarize",
    "warm",
    "cool",
    "contour",
)
DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "jpeg", "lowres", "dark")


def _gains(img: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) * np.asarray(gains, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")


def apply_style(img: Image.Image, style: str, rng: np.random.Generator) -> Image.Image:
    """``img`` (RGB) under the stylisation filter ``style`` (one of :data:`STYLES`)."""
    img = img.convert("RGB")
    if style == "grayscale":
        return ImageOps.grayscale(img).convert("RGB")
    if style == "sepia":
        return ImageOps.colorize(ImageOps.grayscale(img), black=(40, 26, 13), white=(255, 238, 190))
    if style == "posterize":
        return ImageOps.posterize(img, int(rng.integers(1, 3)))
    if style == "sketch":
        edges = ImageOps.grayscale(img).filter(ImageFilter.FIND_EDGES)
        return ImageOps.autocontrast(ImageOps.invert(edges)).convert("RGB")
    if style == "emboss":
        return img.filter(ImageFilter.EMBOSS)
    if style == "invert":
        return ImageOps.invert(img)
    if style == "pixelate":
        f = max(4, min(img.size) // int(rng.integers(12, 24)))
        small = img.resize((max(1, img.width // f), max(1, img.height // f)), Image.Resampling.BOX)
        return small.resize(img.size, Image.Resampling.NEAREST)
    if style == "solarize":
        return ImageOps.solarize(img, threshold=int(rng.integers(100, 160)))
    if style == "warm":
        return _gains(img, (1.12, 1.0, 0.78))
    if style == "cool":
        return _gains(img, (0.8, 0.95, 1.15))
    if style == "contour":
        return img.filter(ImageFilter.CONTOUR)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A degraded copy of ``img`` (``lowres`` returns a smaller image, sides still multiples of 32
    where the image allows, so the reference lands in a different bucket than the target)."""
    img = img.convert("RGB")
    w, h = img.size
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(1.2, 2.5) * min(w, h) / 256))
    if kind == "noise":
        sigma = rng.uniform(12.0, 30.0)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, sigma, size=(h, w, 3)).astype(np.float32)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(4, 14)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "lowres":

        def half(v: int) -> int:
            return (
                max(SIZE_MULTIPLE, round(v / 2 / SIZE_MULTIPLE) * SIZE_MULTIPLE)
                if v >= 2 * SIZE_MULTIPLE
                else v
            )

        return img.resize((half(w), half(h)), Image.Resampling.BILINEAR, reducing_gap=None)
    if kind == "dark":
        gamma, gain = rng.uniform(1.6, 2.4), rng.uniform(0.45, 0.7)
        arr = (np.asarray(img, dtype=np.float32) / 255.0) ** gamma * gain * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")
    raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")
