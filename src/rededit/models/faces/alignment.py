"""Differentiable face / region alignment T_i of the consistency loss (report §3.7, eq. 8).

Faces: a similarity transform (rotation, uniform scale, translation) maps each face's five landmarks
``[5, 2]`` (left eye, right eye, nose tip, left and right mouth corner, as seen in the image) onto the
ArcFace 112×112 template; the crop is sampled with ``grid_sample``, so gradients flow from the crop back
to every pixel of the image (the landmarks themselves are data, computed offline, and carry no gradient).

Pixel convention (OpenCV's ``warpAffine``): pixel ``(u, v)`` has its centre at integer coordinates, so a
crop made here equals ``cv2.warpAffine(img, M, (112, 112))`` with bilinear interpolation and zero border.

Regions: an axis-aligned box ``[x0, y0, x1, y1]`` (target pixels) is resampled to ``S×S`` with
``torchvision.ops.roi_align`` (also differentiable in the image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# InsightFace / ArcFace 112×112 reference landmarks (x, y), the template SFace and ArcFace were trained on.
ARCFACE_TEMPLATE_112 = torch.tensor(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=torch.float32,
)


def estimate_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms ``M [N, 2, 3]`` with ``dst ≈ M·[src; 1]`` (Umeyama 1991).

    Args:
        src: ``[N, K, 2]`` (or ``[K, 2]``) source points, e.g. detected landmarks in image pixels.
        dst: ``[K, 2]`` or ``[N, K, 2]`` destination points, e.g. :data:`ARCFACE_TEMPLATE_112`.

    Returns:
        ``[N, 2, 3]`` float32 matrices ``[[a, −b, tx], [b, a, ty]]`` (no reflection).
    """
    squeeze = src.ndim == 2
    src = src.reshape(-1, *src.shape[-2:]).double()
    dst = dst.to(src.device).double().expand_as(src)
    if src.shape[-1] != 2 or src.shape[-2] < 2:
        raise ValueError(f"estimate_similarity needs points [N, K>=2, 2], got {tuple(src.shape)}")
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    var_s = s.pow(2).sum((1, 2)) / src.shape[1]
    cov = d.transpose(1, 2) @ s / src.shape[1]  # [N, 2, 2]
    u, sv, vh = torch.linalg.svd(cov)
    sign = torch.ones_like(sv)
    sign[:, -1] = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    sign[sign == 0] = 1
    rot = u @ torch.diag_embed(sign) @ vh
    scale = (sv * sign).sum(1) / var_s.clamp_min(1e-12)
    lin = scale[:, None, None] * rot
    trans = mu_d.transpose(1, 2) - lin @ mu_s.transpose(1, 2)
    m = torch.cat([lin, trans], dim=2).float()
    return m[0] if squeeze else m


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Inverse of affine maps ``[N, 2, 3]``."""
    lin, t = m[..., :2], m[..., 2:]
    inv = torch.linalg.inv(lin)
    return torch.cat([inv, -inv @ t], dim=-1)


def warp_affine(
    images: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int], index: torch.Tensor | None = None
) -> torch.Tensor:
    """``cv2.warpAffine`` in PyTorch, differentiable in ``images``.

    Args:
        images: ``[B, C, H, W]``.
        matrices: ``[N, 2, 3]`` forward maps (image pixel → output pixel), as from :func:`estimate_similarity`.
        size: output ``(height, width)``.
        index: ``[N]`` long, which image each matrix reads (default ``arange(N)``, needs ``N == B``).

    Returns:
        ``[N, C, height, width]`` bilinear samples, zeros outside the image.
    """
    n = matrices.shape[0]
    if index is None:
        if images.shape[0] != n:
            raise ValueError(f"{n} matrices for {images.shape[0]} images: pass index= to say which is which")
        index = torch.arange(n, device=images.device)
    oh, ow = size
    h, w = images.shape[-2:]
    inv = invert_affine(matrices.double()).to(images.device)  # output pixel → image pixel
    ys, xs = torch.meshgrid(
        torch.arange(oh, device=images.device, dtype=torch.float64),
        torch.arange(ow, device=images.device, dtype=torch.float64),
        indexing="ij",
    )
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, -1, 3)  # [1, oh*ow, 3]
    src = pts @ inv.transpose(1, 2)  # [N, oh*ow, 2] image pixel coordinates
    # align_corners=False: normalised −1/+1 are the outer pixel *edges*, pixel centre x ↦ (2x + 1)/W − 1.
    gx = (2 * src[..., 0] + 1) / w - 1
    gy = (2 * src[..., 1] + 1) / h - 1
    grid = torch.stack([gx, gy], dim=-1).reshape(n, oh, ow, 2).to(images.dtype)
    return F.grid_sample(images[index], grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def align_faces(
    images: torch.Tensor,
    landmarks: torch.Tensor,
    index: torch.Tensor,
    size: int = 112,
    matrices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aligned face crops ``[F, C, size, size]`` (eq. 8's ``T_i(x)``) of faces spread over a batch.

    Args:
        images: ``[B, C, H, W]`` (any range; crops keep it).
        landmarks: ``[F, 5, 2]`` image-pixel landmarks of all faces of the batch.
        index: ``[F]`` image of each face.
        size: crop side; the template is scaled by ``size / 112``.
        matrices: precomputed ``[F, 2, 3]`` (to apply the *same* ``T_i`` to x̂_0 and x_gt).
    """
    if matrices is None:
        matrices = face_matrices(landmarks, size)
    return warp_affine(images, matrices, (size, size), index)


def face_matrices(landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    """``[F, 2, 3]`` similarity maps from landmarks ``[F, 5, 2]`` to the ArcFace template at ``size``."""
    if landmarks.ndim != 3 or tuple(landmarks.shape[1:]) != (5, 2):
        raise ValueError(f"face landmarks must be [F, 5, 2], got {tuple(landmarks.shape)}")
    template = ARCFACE_TEMPLATE_112 * (size / 112.0)
    return estimate_similarity(landmarks.float().cpu(), template).to(landmarks.device)


def crop_boxes(
    images: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, size: int = 64
) -> torch.Tensor:
    """Region crops ``[O, C, size, size]`` of boxes ``[O, 4]`` (x0, y0, x1, y1 in pixels), differentiable.

    Boxes are continuous coordinates (pixel ``i`` spans ``[i, i + 1]``, the synthetic corpus's and the
    bucket transform's convention); ``roi_align(aligned=True)`` samples them with that convention.
    """
    from torchvision.ops import roi_align

    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"object boxes must be [O, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    rois = torch.cat([index.to(boxes)[:, None], boxes], dim=1).to(images.dtype)
    return roi_align(
        images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True
    )
