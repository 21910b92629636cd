"""DiffusionNFT objective (report §3.6.2, eq. 3) and reward → optimality-probability normalisation.

Eq. (3), per sample, with the implicit positive / negative policies built from the old (sampling) policy::

    v⁺ = (1 − β) · v_old + β · v_θ            v⁻ = (1 + β) · v_old − β · v_θ
    L  = r · ‖v⁺ − v‖² + (1 − r) · ‖v⁻ − v‖²                 (‖·‖² = mean over every non-batch dim)

``v`` is the flow-matching target of the rollout image ``x_0`` at ``x_t`` (``ε − x_0``), ``v_old`` the old
policy's prediction at the same ``x_t`` (no gradient), ``r ∈ [0, 1]`` the optimality probability. This is
the form of the report and of DiffusionNFT (Zheng et al. 2025, eq. for L(θ) with v⁺/v⁻); their released
trainer additionally rescales by 1/β and can reweight in x_0 space — we keep eq. (3) exactly and leave any
global scale to the learning rate. Where ``v_θ = v_old`` (start of every soft update), the gradient w.r.t.
``v_θ`` is ``2β(2r − 1)(v_θ − v)/N``: r = 1 pulls v_θ toward v, r = 0 pushes it away, r = ½ is neutral.

Normalisation (DiffusionNFT §"reward normalisation"; group statistics as in GRPO-style trainers)::

    A = (R − mean_group(R)) / (std_group(R) + eps)       (per prompt, G samples each)
    r = clip(½ + A / (2·c), 0, 1)                         (c = ``adv_clip``: |A| ≥ c saturates at 0 / 1)

``std`` is the per-group std (``scale="group"``) or the batch std (``scale="global"``); NaN rewards ("not
applicable") get r = ½ and ``valid = False`` so the stage can drop them.
"""

from __future__ import annotations

import torch


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).float().pow(2).flatten(1).mean(1)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-sample eq. (3) loss ``[B]``.

    Args:
        v_theta: policy velocity, ``[B, N, D]`` (packed tokens) or ``[B, C, h, w]``.
        v_old: old-policy velocity at the same ``x_t`` (same shape; detached here).
        v_target: flow-matching target ``v`` (same shape).
        r: optimality probability ``[B]`` in [0, 1].
        beta: β of the implicit policies (DiffusionNFT uses 1 … 0.1).
    """
    if v_theta.shape != v_old.shape or v_theta.shape != v_target.shape:
        raise ValueError(
            f"nft_loss: v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)} and v_target "
            f"{tuple(v_target.shape)} must have the same shape"
        )
    if r.shape != (v_theta.shape[0],):
        raise ValueError(f"nft_loss: r must be [B] = [{v_theta.shape[0]}], got {tuple(r.shape)}")
    v_old = v_old.detach()
    v_pos = (1.0 - beta) * v_old + beta * v_theta
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    r = r.to(torch.float32)
    return r * _per_sample_mse(v_pos, v_target) + (1.0 - r) * _per_sample_mse(v_neg, v_target)


@torch.no_grad()
def optimality_probability(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    *,
    adv_clip: float = 1.0,
    scale: str = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards ``[B]`` → (r ``[B]`` in [0, 1], advantages ``[B]``, valid ``[B]`` bool).

    Args:
        rewards: raw rewards, NaN = not applicable.
        groups: ``[B]`` integer prompt index; samples of one prompt share it (G per prompt).
        adv_clip: c; advantages are clipped to [−c, c] and mapped linearly onto [0, 1].
        scale: ``group`` (per-prompt std) or ``global`` (std over the valid batch).
        eps: added to the std (a group of equal rewards gets A = 0, r = ½).
    """
    if scale not in ("group", "global"):
        raise ValueError(f"optimality_probability: scale must be 'group' or 'global', got {scale!r}")
    if adv_clip <= 0:
        raise ValueError("optimality_probability: adv_clip must be > 0")
    rewards = rewards.float()
    valid = torch.isfinite(rewards)
    adv = torch.zeros_like(rewards)
    global_std = rewards[valid].std(unbiased=False) if valid.sum() > 1 else rewards.new_tensor(0.0)
    for g in torch.unique(groups):
        sel = (groups == g) & valid
        if sel.sum() == 0:
            continue
        vals = rewards[sel]
        std = vals.std(unbiased=False) if scale == "group" else global_std
        adv[sel] = (vals - vals.mean()) / (std + eps)
    adv = adv.clamp(-adv_clip, adv_clip)
    r = (0.5 + adv / (2.0 * adv_clip)).clamp(0.0, 1.0)
    r = torch.where(valid, r, torch.full_like(r, 0.5))
    return r, adv, valid
