"""Per-sample loss weights over the noise level σ (§3.8 "Logit-Normal Loss Weighting").

The report samples σ (globally) uniformly with the stratified sampler and moves the emphasis to the
intermediate noise levels through the *weight* instead. Every scheme here is normalised so that
``E_{σ ~ U(0,1)}[w(σ)] = 1``: switching schemes changes where the gradient comes from, not the overall loss
scale (so learning rates stay comparable across ablations). The normalisers are closed-form:

* ``uniform``:      ``w = 1``.
* ``logit_normal``: ``w(σ) = N(logit σ; m, s²) / (σ(1 − σ))``, the logit-normal *density*, which
  integrates to 1 over (0, 1) by construction, so it is already normalised. Peak at the middle for m = 0,
  → 0 at both ends (the "negligible extremes").
* ``x0_mse``:       ``w(σ) = 3σ²``; ``∫₀¹ 3σ² dσ = 1``. The velocity error is ``(x̂0 − x0)/σ`` for an
  x0-predicting network, so this weight turns the v-loss into a plain, σ-independent MSE on ``x̂0`` —
  without it the 1/σ² factor lets a few low-noise samples dominate every gradient (spiky losses, noisy
  edits on the tiny CPU editor; experiments/demo/README.md).
* ``sd3_cosmap``:   ``w(σ) = 2 / (π(1 − 2σ + 2σ²))`` (SD3's cosmap density);
  ``∫₀¹ 2/(π(2(σ−½)² + ½)) dσ = (2/π)·[arctan(2σ − 1)]₀¹ = (2/π)(π/2) = 1``.

**Edit-region weighting** (:func:`region_weights`, ``stage.weighting.region_weight = α``, an option of this
project, not of the report): per-pixel weights ``1 + α·M`` from the edit mask ``M``, divided by their mean
over the sample so each sample's total weight is unchanged — the loss is only moved toward the pixels the
edit changes. A local edit covers 5–15 % of a synthetic picture, so with α = 0 more than 85 % of an edit
sample's gradient teaches "copy Picture 1"; measured on the CPU demo editor, this is what keeps object-level
edits from being learned (experiments/benchmarks/learnability). Samples without a mask (T2I) and whole-image
masks get weight 1 everywhere. The report's data has no exact masks for most rows, so its recipes keep α = 0.

If σ is drawn from a non-uniform distribution (or shifted), the mean weight is no longer 1; the caller
then chooses whether that is intended (it is a different objective, not a bug). Weights are computed in
float32 and are independent of the model (no gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

WeightingScheme = Literal["uniform", "logit_normal", "sd3_cosmap", "x0_mse"]
SCHEMES: tuple[str, ...] = ("uniform", "logit_normal", "sd3_cosmap", "x0_mse")


def loss_weight(
    sigma: torch.Tensor,
    scheme: WeightingScheme = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Loss weight ``w(σ)`` ``[B]`` with ``E_{σ~U(0,1)} w = 1``.

    Args:
        sigma: noise levels ``[B]`` in ``[0, 1]``.
        scheme: ``"uniform" | "logit_normal" | "sd3_cosmap"``.
        mean: logit-normal location ``m``.
        std: logit-normal scale ``s``.
        eps: σ is clamped to ``[eps, 1 − eps]`` (the logit-normal density is 0 in the limit anyway).
    """
    s = sigma.detach().float()
    if scheme == "uniform":
        return torch.ones_like(s)
    if scheme == "logit_normal":
        if std <= 0:
            raise ValueError("std must be > 0")
        s = s.clamp(eps, 1 - eps)
        logit = torch.log(s) - torch.log1p(-s)
        gauss = torch.exp(-0.5 * ((logit - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        return gauss / (s * (1 - s))
    if scheme == "x0_mse":
        return 3.0 * s * s
    if scheme == "sd3_cosmap":
        return 2.0 / (math.pi * (1 - 2 * s + 2 * s * s))
    raise ValueError(f"unknown weighting scheme {scheme!r}; choose one of {SCHEMES}")


def region_weights(batch: Mapping[str, Any], alpha: float, latent_hw: Sequence[int]) -> torch.Tensor:
    """Per-pixel loss weights ``[B, 1, h, w]`` on the latent grid from the batch's edit masks.

    ``w = (1 + α·m) / mean(1 + α·m)`` with ``m`` the edit mask ``[B, 1, H, W]`` area-averaged onto the latent
    grid ``(h, w)``; samples whose ``has_edit_mask`` is False get ``w = 1`` (the collate fills their mask
    with ones, which would otherwise count them as whole-image edits — harmless after the renormalisation,
    but explicit is clearer). Every sample's weights average to 1.
    """
    mask = batch["edit_mask"].float()
    m = torch.nn.functional.adaptive_avg_pool2d(mask, tuple(int(v) for v in latent_hw))
    has = batch.get("has_edit_mask")
    if has is not None:
        m = m * torch.as_tensor(has, dtype=m.dtype).reshape(-1, 1, 1, 1)
    w = 1.0 + float(alpha) * m
    return w / w.mean(dim=(1, 2, 3), keepdim=True)
