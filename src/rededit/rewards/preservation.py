"""Preservation reward: similarity to the source outside the edit region (report §3.6.2 composite reward;
§4.2 "background preservation").

A local edit must leave everything outside its region untouched. With ``edit_mask`` ``[B, 1, H, W]`` from
the batch (1 = edited) and the source Picture 1 (``references[0]``):

* ``metric="l1"``: ``R = 1 − mean_{outside} |image − source|`` on [0, 1] images (1 for identical pixels);
* ``metric="psnr"``: ``R = min(PSNR_outside, psnr_cap) / psnr_cap`` (PSNR in dB, data range 1).

Both reuse :mod:`rededit.scoring.edit_metrics` (``masked_l1`` / ``masked_psnr``). NaN (does not apply) for
samples without a mask (``has_edit_mask`` false, when ``require_mask``), without a source of the image's
shape (text-to-image), or whose mask covers the whole image (global edits: nothing is outside).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from rededit.rewards.base import Reward, check_images, source_from_batch
from rededit.scoring.edit_metrics import masked_l1, masked_psnr

__all__ = ["PreservationReward"]


class PreservationReward(Reward):
    """Outside-region similarity to the source (see the module docstring).

    Args:
        metric: ``"l1"`` or ``"psnr"``.
        psnr_cap: dB mapped to reward 1 for ``metric="psnr"``.
        require_mask: samples without an edit mask get NaN; with ``False`` they are compared over the
            whole image (a no-op edit then scores 1, so keep it for mask-annotated data only).
        name: reward name.

    Returns (forward): ``reward`` and ``preservation_l1`` (mean absolute difference outside) ``[B]``.
    """

    name = "preservation"

    def __init__(
        self,
        metric: Literal["l1", "psnr"] = "l1",
        psnr_cap: float = 40.0,
        require_mask: bool = True,
        name: str | None = None,
    ):
        super().__init__(name)
        if metric not in ("l1", "psnr"):
            raise ValueError(f"PreservationReward: metric must be 'l1' or 'psnr', got {metric!r}")
        if psnr_cap <= 0:
            raise ValueError(f"PreservationReward: psnr_cap must be > 0, got {psnr_cap}")
        self.metric = metric
        self.psnr_cap = float(psnr_cap)
        self.require_mask = bool(require_mask)

    @torch.no_grad()
    def forward(self, images: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        check_images(images, "PreservationReward")
        b = images.shape[0]
        nan = torch.full((b,), math.nan, dtype=torch.float32, device=images.device)
        source = source_from_batch(batch, images)
        if source is None:
            return {"reward": nan, "preservation_l1": nan.clone()}
        mask = batch.get("edit_mask")
        given = mask is not None
        if mask is None:
            mask = torch.ones_like(images[:, :1])
        outside = (mask.to(images.device) < 0.5).to(images.dtype)
        has = batch.get("has_edit_mask")
        # The collator fills missing masks with ones; has_edit_mask tells which are real.
        has = (
            torch.as_tensor(has, dtype=torch.bool, device=images.device)
            if has is not None
            else torch.full((b,), given, dtype=torch.bool, device=images.device)
        )
        if self.require_mask:
            applies = has
        else:
            applies = torch.ones_like(has)
            outside = torch.where(has.view(-1, 1, 1, 1), outside, torch.ones_like(outside))
        # edit_metrics takes the [-1, 1] VAE range and measures on [0, 1].
        pred, src = images.float() * 2 - 1, source * 2 - 1
        l1 = masked_l1(pred, src, outside).float()
        if self.metric == "l1":
            reward = 1.0 - l1
        else:
            reward = (
                masked_psnr(pred, src, outside).float().clamp(max=self.psnr_cap) / self.psnr_cap
            ).clamp_min(0)
        reward = torch.where(applies, reward, nan)
        return {"reward": reward, "preservation_l1": torch.where(applies, l1, nan)}

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, psnr_cap={self.psnr_cap}, require_mask={self.require_mask}"
