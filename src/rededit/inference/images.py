"""Images in and out of an editor: PIL ↔ ``[-1, 1]`` tensors (:func:`tensor_to_pil` is
:func:`rededit.data.images.tensor_to_pil`), and atomic image files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from rededit.data.images import resize_to_bucket, tensor_to_pil, to_tensor
from rededit.utils.io import atomic_path

__all__ = ["image_tensor", "save_image", "tensor_to_pil"]


def image_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image → ``[1, 3, height, width]`` in [-1, 1] after cover-resize + centre-crop."""
    return to_tensor(resize_to_bucket(img.convert("RGB"), height, width)).unsqueeze(0)


def save_image(img: Image.Image, out: str | os.PathLike) -> Path:
    """Write ``img`` atomically; the format follows the suffix (PNG when unknown)."""
    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
    with atomic_path(out) as tmp:
        img.save(tmp, format=fmt)
    return out
