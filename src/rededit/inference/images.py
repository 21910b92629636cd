"""Images in and out of an editor: PIL ↔ ``[-1, 1]`` tensors, and atomic image files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from rededit.data.images import resize_to_bucket, to_tensor
from rededit.utils.io import atomic_path


def image_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image → ``[1, 3, height, width]`` in [-1, 1] after cover-resize + centre-crop."""
    return to_tensor(resize_to_bucket(img.convert("RGB"), height, width)).unsqueeze(0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] → RGB PIL image."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def save_image(img: Image.Image, out: str | os.PathLike) -> Path:
    """Write ``img`` atomically; the format follows the suffix (PNG when unknown)."""
    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
    with atomic_path(out) as tmp:
        img.save(tmp, format=fmt)
    return out
