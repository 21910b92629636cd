"""The reward interface of the online RL stage (report §3.6.2) and the weighted reward mix.

A :class:`Reward` scores a batch of generated edits against the training batch they were made for::

    out = reward(images, batch)     # images [B, 3, H, W] in [0, 1] (the sampler's decoded edits)
    out["reward"]                   # [B] float32 in [0, 1], higher is better; NaN = does not apply
    out["ocr_text"], ...            # [B] named components, for logging next to the reward

Ranges: generated ``images`` are in [0, 1]; the batch's ``target`` and ``references`` come from the
dataset in the VAE range [-1, 1] (``rededit.data.images.to_tensor``) and are mapped with
:func:`from_dataset_range` where a reward needs them (:func:`source_from_batch`).

NaN policy: a sample a reward cannot score (no ``ocr_target`` for the OCR reward, no source of the same
shape for preservation, every VLM pass failed) gets NaN, never 0 — a 0 would be a real, very bad score
and would push the policy away from samples that were simply not judged. :class:`RewardMix` averages
the parts that are finite for each sample with their weights renormalised; a sample no part scores stays
NaN and the stage must drop it (DiffusionNFT normalises rewards per prompt group, NaNs excluded).

Logging: stages log every returned key as ``reward/<key>`` and :func:`rededit.rewards.hack_monitors`
as ``monitor/<key>`` (NaN-aware means), so a hack shows as a monitor moving while the reward climbs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Reward", "RewardMix", "check_images", "from_dataset_range", "source_from_batch"]


def check_images(images: Tensor, where: str) -> None:
    """Raise a clear error unless ``images`` is ``[B, 3, H, W]`` floating point."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{where}: images must be a [B, 3, H, W] tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{where}: images must be floating point in [0, 1], got dtype {images.dtype}")


def from_dataset_range(x: Tensor) -> Tensor:
    """Dataset images (VAE range [-1, 1]) → [0, 1] float32, clamped."""
    return ((x.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)


def source_from_batch(batch: Mapping[str, Any], like: Tensor) -> Tensor | None:
    """Picture 1 of the batch (``references[0]``) in [0, 1], or ``None`` when there is no reference of
    ``like``'s shape (text-to-image, or a source bucket of another size)."""
    refs = batch.get("references") or []
    if not refs:
        return None
    src = refs[0]
    if not torch.is_tensor(src) or src.shape != like.shape:
        return None
    return from_dataset_range(src).to(like.device)


class Reward(nn.Module):
    """A reward over generated edits (report §3.6.2); subclasses implement :meth:`forward`.

    Attributes:
        name: the reward's name; :class:`RewardMix` returns each part's reward under it.
    """

    name: str = "reward"

    def __init__(self, name: str | None = None):
        super().__init__()
        if name is not None:
            self.name = str(name)

    def forward(self, images: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:  # pragma: no cover
        """Score ``images`` ``[B, 3, H, W]`` in [0, 1] for ``batch`` (see the module docstring).

        Returns:
            ``{"reward": [B] in [0, 1] or NaN, <component>: [B], ...}``.
        """
        raise NotImplementedError


class RewardMix(Reward):
    """Weighted mix of rewards: ``R = Σ_j w_j R_j / Σ_j w_j`` over the parts finite for each sample.

    The report's NFT reward is a composite of the fine-grained VLM soft score (eq. 4) and the layout-aware
    OCR reward (eq. 5); samples of non-text tasks have no OCR reward (NaN), so their weight is renormalised
    over the remaining parts rather than counting the OCR part as 0.

    Args:
        rewards: ``{name: Reward}`` (Hydra instantiates each); the key becomes the part's name.
        weights: ``{name: weight ≥ 0}``; missing names weigh 1.
        name: this mix's name.

    Returns (forward): ``"reward"`` (the mix), ``"<name>"`` per part (its ``"reward"``) and every part's
    other components under their own keys (a key produced by two parts is an error).
    """

    name = "mix"

    def __init__(
        self,
        rewards: Mapping[str, Reward],
        weights: Mapping[str, float] | None = None,
        name: str | None = None,
    ):
        super().__init__(name)
        if not rewards:
            raise ValueError("RewardMix needs at least one reward")
        weights = dict(weights or {})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(
                f"RewardMix weights name unknown rewards {sorted(unknown)}; parts: {sorted(rewards)}"
            )
        self.parts = nn.ModuleDict()
        for key, r in rewards.items():
            if not isinstance(r, Reward):
                raise TypeError(
                    f"RewardMix part {key!r} must be a rededit.rewards.Reward, got {type(r).__name__}"
                )
            r.name = str(key)
            self.parts[key] = r
        self.weights = {k: float(weights.get(k, 1.0)) for k in rewards}
        bad = {k: w for k, w in self.weights.items() if not math.isfinite(w) or w < 0}
        if bad or sum(self.weights.values()) <= 0:
            raise ValueError(f"RewardMix weights must be finite, ≥ 0 and not all 0, got {self.weights}")

    def forward(self, images: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        num = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
        den = torch.zeros_like(num)
        for key, part in self.parts.items():
            res = part(images, batch)
            r = res["reward"].to(num)
            ok = torch.isfinite(r)
            w = self.weights[key]
            num = num + torch.where(ok, r * w, torch.zeros_like(r))
            den = den + ok.to(num) * w
            for comp, value in res.items():
                k = key if comp == "reward" else comp
                if k in out or k == "reward":
                    raise ValueError(f"RewardMix: key {k!r} is produced by two parts; rename a part")
                out[k] = value
        mixed = torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, math.nan))
        return {"reward": mixed.float(), **out}
