"""Flow-matching Diffusion-DPO with Positive Sample Reinforcement (report §3.6.1, eq. 2).

Inputs are per-sample flow-matching errors ``L = mean((v̂ − v)²)`` (shape ``[B]``) of the policy θ and the
frozen reference on the preferred ("win", ``x_w``) and dispreferred ("lose", ``x_l``) edit of the same
condition, computed with the *same* noise ε and σ for win and lose (and for policy and reference).

Reading of eq. (2). Its typeset brackets put β only around the lose term; we read it so that ω = 1, λ = 0
is exactly standard Diffusion-DPO, i.e. β scales the whole difference::

    Win Diff  Δ_w = L_w^θ − L_w^ref          Lose Diff  Δ_l = L_l^θ − L_l^ref          (each [B])
    z         = β · (Δ_l − ω · Δ_w)
    loss      = −log σ(z) + λ · L_w^θ                                                      (per sample, [B])

* ω > 1 amplifies the gradient through the win term: ∂loss/∂L_w^θ = ω·β·σ(−z) + λ while
  ∂loss/∂L_l^θ = −β·σ(−z), so their ratio is −ω (λ = 0).
* λ is the SFT regulariser: the report writes ``− λ L_w^θ`` *inside* ``−E[·]``, which adds ``+λ L_w^θ`` to
  the minimised loss (plain flow matching on the winners).
* When the policy equals the reference, Δ_w = Δ_l = 0 and the loss is log 2 (λ = 0).

Relation to Diffusion-DPO (Wallace et al. 2024). Their objective is
``−log σ(−β_T · [(L_w^θ − L_w^ref) − (L_l^θ − L_l^ref)])`` with ``β_T = β·T`` (the T of the ELBO sum
absorbed into one constant) and their reference code multiplies by a further 0.5
(``inside = −0.5 · β_code · (model_diff − ref_diff)``). Here β is the single constant in front of the
difference: ``β = β_T = 0.5 · β_code`` (so β_code = 5000 there is β = 2500 here). The flow-matching
errors replace their ε-prediction errors; the sign convention (lower error = higher implicit reward) is
theirs.

Implicit reward (for logging): ``r(x) = −β (L^θ(x) − L^ref(x))``; the reward margin ``r_w − r_l =
β(Δ_l − Δ_w)`` is the standard (ω = 1) one and implicit accuracy is ``mean(margin > 0)``, so both stay
comparable across ω.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    if x.shape != like.shape or x.ndim != 1:
        raise ValueError(
            f"dpo_loss: {name} must be per-sample [B] like loss_w {tuple(like.shape)}, got {tuple(x.shape)}"
        )


def dpo_loss(
    loss_w: torch.Tensor,
    loss_l: torch.Tensor,
    ref_loss_w: torch.Tensor,
    ref_loss_l: torch.Tensor,
    beta: float,
    omega: float = 1.0,
    lam: float = 0.0,
) -> torch.Tensor:
    """Per-sample eq. (2) loss ``[B]`` (see the module docstring for the reading).

    Args:
        loss_w, loss_l: policy flow-matching errors on win / lose, ``[B]`` (carry gradients).
        ref_loss_w, ref_loss_l: reference errors on the same x_t, ``[B]`` (detached here).
        beta: β, the inverse temperature in front of the whole difference.
        omega: ω ≥ 1 amplifies the Win Diff (Asymmetric Gradient Optimization; 1 = standard DPO).
        lam: λ ≥ 0 weight of the SFT term ``λ · L_w^θ`` (Positive Sample Reinforcement).
    """
    for name, x in (("loss_l", loss_l), ("ref_loss_w", ref_loss_w), ("ref_loss_l", ref_loss_l)):
        _check(name, x, loss_w)
    win_diff = loss_w - ref_loss_w.detach()
    lose_diff = loss_l - ref_loss_l.detach()
    z = beta * (lose_diff - omega * win_diff)
    # −log σ(z) = softplus(−z), stable for large |z|.
    return F.softplus(-z) + lam * loss_w


@torch.no_grad()
def dpo_stats(
    loss_w: torch.Tensor,
    loss_l: torch.Tensor,
    ref_loss_w: torch.Tensor,
    ref_loss_l: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Batch means of the §3.6.1 diagnostics: Win/Lose Diff (the "double degradation" shows as both rising),
    the reference losses, the implicit reward margin ``β(Δ_l − Δ_w)`` and implicit accuracy."""
    win_diff = (loss_w - ref_loss_w).float()
    lose_diff = (loss_l - ref_loss_l).float()
    margin = beta * (lose_diff - win_diff)
    return {
        "win_diff": win_diff.mean(),
        "lose_diff": lose_diff.mean(),
        "ref_loss_w": ref_loss_w.float().mean(),
        "ref_loss_l": ref_loss_l.float().mean(),
        "reward_margin": margin.mean(),
        "implicit_acc": (margin > 0).float().mean(),
    }
