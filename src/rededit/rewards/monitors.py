"""Reward-hacking monitors: unrewarded image statistics logged next to the reward (docs/architecture.md, "Traps other projects fell into").

RL against a learned or programmatic reward drifts within tens of steps into images that please the
scorer: over-bright or over-saturated pictures for aesthetic VLM judges, busy high-frequency texture, and
for OCR rewards oversized text (report §3.6.2). None of these statistics is optimised; a monitor that moves
while the reward climbs is the early sign of a hack.

All statistics are per sample ``[B]`` float32 on ``[B, 3, H, W]`` images in [0, 1]:

* ``brightness``: mean Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B``.
* ``saturation``: mean HSV saturation ``(max − min) / max`` (0 where ``max = 0``).
* ``edge_density``: share of pixels whose Sobel gradient magnitude on luma exceeds ``edge_threshold``.
* ``colour_entropy``: Shannon entropy of the joint RGB histogram (``bins`` per channel) divided by
  ``log(bins³)``, in [0, 1] (0: one flat colour).
* ``text_area_fraction``: share of the image covered by the union of OCR text boxes (NaN without boxes).
* ``preservation_outside``: ``1 − mean |image − source|`` outside the edit region (NaN without a source,
  or when the edit region covers the whole image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from rededit.scoring.edit_metrics import masked_l1

__all__ = ["MONITOR_KEYS", "hack_monitors", "preservation_outside", "text_area_fraction"]

MONITOR_KEYS = (
    "brightness",
    "saturation",
    "edge_density",
    "colour_entropy",
    "text_area_fraction",
    "preservation_outside",
)
_LUMA = (0.299, 0.587, 0.114)


def _luma(images: Tensor) -> Tensor:
    w = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)  # [B, 1, H, W]


def _edge_density(images: Tensor, threshold: float) -> Tensor:
    y = _luma(images)
    kx = y.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3) / 4
    gx = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kx)
    gy = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kx.transpose(-1, -2))
    return ((gx.pow(2) + gy.pow(2)).sqrt() > threshold).float().flatten(1).mean(1)


def _colour_entropy(images: Tensor, bins: int) -> Tensor:
    q = (images.clamp(0, 1) * bins).long().clamp_max(bins - 1)  # [B, 3, H, W]
    idx = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    out = []
    for row in idx.flatten(1):
        p = torch.bincount(row, minlength=bins**3).double()
        p = p[p > 0] / row.numel()
        out.append(float(-(p * p.log()).sum() / math.log(bins**3)))
    return images.new_tensor(out)


def text_area_fraction(boxes: Sequence[Any] | None, height: int, width: int) -> float:
    """Share of an ``height × width`` image covered by the union of text boxes.

    Args:
        boxes: 4-point quads ``[[x, y], ...]`` (as :class:`rededit.scoring.ocr.OCRResult.box`), ``(x0, y0, x1,
            y1)`` boxes, or OCR results with a ``box``; ``None`` → NaN (not measured), ``[]`` → 0.
    """
    if boxes is None:
        return math.nan
    canvas = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    for b in boxes:
        b = getattr(b, "box", b)
        arr = np.asarray(b, dtype=float)
        if arr.shape == (4,):
            x0, y0, x1, y1 = arr.tolist()
            arr = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        arr = arr.reshape(-1, 2)
        # Polygon fill covers pixel centres inside the quad (union by painting the same canvas).
        draw.polygon([(float(x), float(y)) for x, y in arr], fill=255)
    return float((np.asarray(canvas) > 0).mean())


def preservation_outside(images: Tensor, sources: Tensor, edit_masks: Tensor | None) -> Tensor:
    """``1 − mean |images − sources|`` over pixels outside the edit region, per sample ``[B]`` (NaN if none).

    Args:
        images, sources: ``[B, 3, H, W]`` in [0, 1].
        edit_masks: ``[B, 1, H, W]`` in {0, 1} (1 = edited) or ``None`` (whole image = outside region:
            the statistic then measures change anywhere, useful for local edits without masks).
    """
    if sources.shape != images.shape:
        raise ValueError(
            f"sources must have the images' shape {tuple(images.shape)}, got {tuple(sources.shape)}"
        )
    outside = torch.ones_like(images[:, :1]) if edit_masks is None else (edit_masks < 0.5).to(images)
    # edit_metrics works on the [-1, 1] VAE range and reports L1 on [0, 1] images.
    return (1.0 - masked_l1(images * 2 - 1, sources * 2 - 1, outside)).float()


@torch.no_grad()
def hack_monitors(
    images: Tensor,
    sources: Tensor | None,
    edit_masks: Tensor | None = None,
    ocr_boxes: Sequence[Sequence[Any] | None] | None = None,
    *,
    edge_threshold: float = 0.1,
    bins: int = 8,
) -> dict[str, Tensor]:
    """Unrewarded statistics of generated edits (see the module docstring), each ``[B]`` float32.

    Args:
        images: generated edits ``[B, 3, H, W]`` in [0, 1].
        sources: the source images (Picture 1) ``[B, 3, H, W]`` in [0, 1] (see
            :func:`rededit.rewards.base.source_from_batch`), or ``None``.
        edit_masks: ``[B, 1, H, W]`` (1 = edited) or ``None``.
        ocr_boxes: per sample the OCR boxes read from that image (``None`` entries: not read).
        edge_threshold: Sobel magnitude (on [0, 1] luma, kernel normalised to unit step response) above which
            a pixel counts as an edge.
        bins: histogram bins per channel for the colour entropy.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"hack_monitors: images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1)
    b, _, h, w = x.shape
    mx, mn = x.max(1).values, x.min(1).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx))
    out = {
        "brightness": _luma(x).flatten(1).mean(1),
        "saturation": sat.flatten(1).mean(1),
        "edge_density": _edge_density(x, edge_threshold),
        "colour_entropy": _colour_entropy(x, bins),
    }
    if ocr_boxes is None:
        out["text_area_fraction"] = torch.full((b,), math.nan, device=x.device)
    else:
        if len(ocr_boxes) != b:
            raise ValueError(f"hack_monitors: {len(ocr_boxes)} OCR box lists for {b} images")
        out["text_area_fraction"] = x.new_tensor([text_area_fraction(bx, h, w) for bx in ocr_boxes])
    if sources is None:
        out["preservation_outside"] = torch.full((b,), math.nan, device=x.device)
    else:
        masks = None if edit_masks is None else edit_masks.to(x)
        out["preservation_outside"] = preservation_outside(x, sources.detach().float().to(x.device), masks)
    return {k: out[k].float() for k in MONITOR_KEYS}
