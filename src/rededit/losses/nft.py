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

Two forms of the objective (``stage.nft.form``):

* ``report`` — :func:`nft_loss`, eq. (3) in v-space as the report prints it (the FireRed recipes' default).
* ``official`` — :func:`nft_loss_official` + :func:`nft_kl`, the loss of DiffusionNFT's released trainer
  (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``): the same implicit policies, matched in x₀ space with a
  per-sample adaptive weight, scaled by c/β (c = advantage clip, 5 there), plus a KL term to a frozen
  reference. See :func:`nft_loss_official` for the equations.

β and the step size. In eq. (3) the gradient at ``v_θ = v_old`` is ``2β(2r − 1)(v_old − v)/N``: proportional
to β, so a smaller β (a tighter trust region) would also silently shrink the step. ``nft_loss(...,
inverse_beta=True)`` (what the stage uses) divides eq. (3) by β — the same minimiser, and at β = 1 (every
shipped recipe) eq. (3) exactly — so that gradient is ``2(2r − 1)(v_old − v)/N`` for every β. The official
form carries its own 1/β, and its factor c cancels the 1/c of ``r − ½ = A/(2c)``: its gradient at
``v_θ = v_old`` depends on neither β nor c (see :func:`nft_loss_official`). Away from ``v_θ = v_old`` β keeps
its meaning in both forms: how far a change of v_θ moves the implicit policies.
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
    *,
    inverse_beta: bool = False,
) -> torch.Tensor:
    """Per-sample eq. (3) loss ``[B]``.

    Args:
        v_theta: policy velocity, ``[B, N, D]`` (packed tokens) or ``[B, C, h, w]``.
        v_old: old-policy velocity at the same ``x_t`` (same shape; detached here).
        v_target: flow-matching target ``v`` (same shape).
        r: optimality probability ``[B]`` in [0, 1].
        beta: β of the implicit policies (DiffusionNFT uses 1 … 0.1).
        inverse_beta: return eq. (3) / β, whose gradient at ``v_θ = v_old`` does not depend on β (see the
            module docstring); False: eq. (3) as printed.
    """
    _check_shapes("nft_loss", v_theta, v_old, v_target, r)
    if beta <= 0:
        raise ValueError(f"nft_loss: beta must be > 0, got {beta}")
    v_old = v_old.detach()
    v_pos = (1.0 - beta) * v_old + beta * v_theta
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    r = r.to(torch.float32)
    loss = r * _per_sample_mse(v_pos, v_target) + (1.0 - r) * _per_sample_mse(v_neg, v_target)
    return loss / beta if inverse_beta else loss


def _check_shapes(fn: str, v_theta, v_old, other, r) -> None:
    if v_theta.shape != v_old.shape or v_theta.shape != other.shape:
        raise ValueError(
            f"{fn}: v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)} and the target "
            f"{tuple(other.shape)} must have the same shape"
        )
    if r.shape != (v_theta.shape[0],):
        raise ValueError(f"{fn}: r must be [B] = [{v_theta.shape[0]}], got {tuple(r.shape)}")


#: Floor of the adaptive weight (the official trainer's ``clip(min=0.00001)``).
ADAPTIVE_WEIGHT_FLOOR = 1e-5


def nft_loss_official(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    *,
    adv_clip: float,
    adaptive_weighting: bool = True,
) -> torch.Tensor:
    """Per-sample policy loss ``[B]`` of DiffusionNFT's released trainer (``form=official``).

    With the implicit policies of eq. (3) mapped to x₀ predictions (``x̂0 = x_t − σ·v``, the rectified-flow
    inverse; ``σ`` is the value the backbone multiplies its velocity by, ``σ_c`` for an x₀-prediction backbone)::

        v⁺ = β v_θ + (1 − β) v_old            x̂0⁺ = x_t − σ v⁺
        v⁻ = (1 + β) v_old − β v_θ            x̂0⁻ = x_t − σ v⁻
        w±  = max(mean|x̂0± − x0|, 1e-5)       (per sample, no gradient; 1 without adaptive weighting)
        L   = (c / β) · [ r · mean((x̂0⁺ − x0)²) / w⁺ + (1 − r) · mean((x̂0⁻ − x0)²) / w⁻ ]

    ``x0`` is the rollout latent, ``r = ½ + clip(A, ±c)/(2c)`` (:func:`optimality_probability` with
    ``adv_clip=c``), and the total loss adds ``kl_weight · mean_B`` :func:`nft_kl` (not scaled by c/β).

    Scaling: at ``v_θ = v_old`` both implicit policies equal v_old, ``w⁺ = w⁻ = w`` and, with
    ``d = x̂0_old − x0 = σ(v − v_old)``, the gradient is
    ``∂L/∂v_θ = 2σ·(c/β)·β·(1 − 2r)·d/(w·N) = −2σ·clip(A, ±c)·d/(w·N)``: independent of β and of c.

    Args:
        v_theta: policy velocity ``[B, ...]`` (``[B, C, h, w]`` or ``[B, N, D]``).
        v_old: old-policy velocity at the same ``x_t`` (detached here).
        x_t: the noised rollout latent the velocities were predicted at (same shape).
        x0: the rollout latent (same shape).
        sigma: ``[B]`` noise level that maps velocity to x₀.
        r: optimality probability ``[B]`` in [0, 1].
        beta: β of the implicit policies (> 0).
        adv_clip: c, the advantage clip r was built with (the official trainer multiplies its loss by it).
        adaptive_weighting: divide each term by its detached mean absolute x₀ error (the official trainer
            always does); False: plain x₀-space MSE.
    """
    _check_shapes("nft_loss_official", v_theta, v_old, x0, r)
    if x_t.shape != x0.shape:
        raise ValueError(f"nft_loss_official: x_t {tuple(x_t.shape)} and x0 {tuple(x0.shape)} differ")
    if beta <= 0 or adv_clip <= 0:
        raise ValueError(f"nft_loss_official: beta and adv_clip must be > 0, got {beta}, {adv_clip}")
    v_old = v_old.detach()
    s = torch.as_tensor(sigma, device=x_t.device, dtype=torch.float32).reshape(-1, *([1] * (x_t.ndim - 1)))
    x_t, x0 = x_t.float(), x0.float()
    v_pos = beta * v_theta.float() + (1.0 - beta) * v_old.float()
    v_neg = (1.0 + beta) * v_old.float() - beta * v_theta.float()
    pos = _weighted_x0_error(x_t - s * v_pos, x0, adaptive_weighting)
    neg = _weighted_x0_error(x_t - s * v_neg, x0, adaptive_weighting)
    r = r.to(torch.float32)
    return (r * pos + (1.0 - r) * neg) * (float(adv_clip) / float(beta))


def _weighted_x0_error(x0_hat: torch.Tensor, x0: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """``mean((x̂0 − x0)²) / w`` per sample ``[B]``, ``w = max(mean|x̂0 − x0|, 1e-5)`` detached (or 1)."""
    err = (x0_hat - x0).pow(2).flatten(1).mean(1)
    if not adaptive:
        return err
    with torch.no_grad():
        # float64 like the official trainer: the mean of many small |errors| near the floor.
        w = (x0_hat.detach().double() - x0.double()).abs().flatten(1).mean(1).clamp_min(ADAPTIVE_WEIGHT_FLOOR)
    return err / w.to(err.dtype)


def nft_kl(v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """KL surrogate to the frozen reference ``[B]``: ``mean((v_θ − v_ref)²)`` per sample (the official
    trainer's ``kl_div_loss``; for Gaussian flow policies the KL between two velocity fields at one step is
    proportional to it). ``v_ref`` is detached."""
    if v_theta.shape != v_ref.shape:
        raise ValueError(f"nft_kl: v_theta {tuple(v_theta.shape)} and v_ref {tuple(v_ref.shape)} differ")
    return _per_sample_mse(v_theta, v_ref.detach())


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
