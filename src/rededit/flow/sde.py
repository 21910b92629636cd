"""Stochastic (SDE) sampler with the same marginals as the flow ODE, for RL rollouts (report §3.6.2).

For the straight path ``x_σ = (1 − σ) x0 + σ ε`` the score is ``∇log p_σ(x) = −(x + (1 − σ) v) / σ`` (from
``x̂0 = x − σ v``), so the reverse-time SDE with diffusion ``g(σ)`` and the ODE's marginals is, per step
``Δ = σ_{i+1} − σ_i < 0`` (Euler–Maruyama, as in Flow-GRPO)::

    x ← x + [v + g²/(2σ) · (x + (1 − σ) v)] · Δ + g · sqrt(−Δ) · z,       g(σ) = a · sqrt(σ / (1 − σ))

``a`` (``noise_level``) = 0 is exactly the Euler ODE of :func:`rededit.flow.sampler.euler_sample`. σ = 1 is
evaluated at ``1 − 1e-3`` inside ``g`` (it diverges there) and the last step (to σ = 0) is deterministic.
DiffusionNFT is solver-agnostic: the SDE only adds rollout diversity within a prompt group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rededit.flow.path import QWEN_IMAGE_SCHEDULER, calculate_mu, inference_sigmas
from rededit.flow.sampler import ode_velocity


@torch.no_grad()
def sde_sample(
    backbone: torch.nn.Module,
    *,
    noise: torch.Tensor,
    references: Sequence[torch.Tensor],
    text_emb: torch.Tensor,
    text_mask: torch.Tensor | None,
    steps: int = 8,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    shift_terminal: float | None = QWEN_IMAGE_SCHEDULER["shift_terminal"],
) -> torch.Tensor:
    """Integrate the marginal-preserving SDE from ``noise`` (σ = 1) to ``x̂0`` ``[B, C, h, w]`` (float32).

    Args:
        backbone: ``forward(x_t, refs, σ, text, mask) → v`` (an :class:`~rededit.models.backbone.EditBackbone`).
        noise: ``ε`` ``[B, C, h, w]``.
        references, text_emb, text_mask: conditioning as in :func:`~rededit.flow.sampler.euler_sample`.
        steps: number of steps (same shifted schedule as the ODE sampler).
        noise_level: ``a`` of ``g(σ)``; 0 gives the ODE.
        generator: CPU generator of the per-step noise ``z`` (derive it from (seed, step, rank)).
    """
    patch = getattr(backbone, "patch_size", 2)
    h, w = noise.shape[-2:]
    mu = calculate_mu(
        (h // patch) * (w // patch),
        QWEN_IMAGE_SCHEDULER["base_image_seq_len"],
        QWEN_IMAGE_SCHEDULER["max_image_seq_len"],
        QWEN_IMAGE_SCHEDULER["base_shift"],
        QWEN_IMAGE_SCHEDULER["max_shift"],
    )
    sigmas = inference_sigmas(steps, mu, shift_terminal, device=noise.device)
    b = noise.shape[0]
    x = noise.float()
    for i in range(sigmas.shape[0] - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma = s.expand(b)
        v = ode_velocity(backbone, backbone(x, references, sigma, text_emb, text_mask), sigma)
        delta = s_next - s
        if noise_level > 0 and float(s_next) > 0:
            sc = s.clamp(max=1 - 1e-3)
            g2 = noise_level**2 * sc / (1 - sc)
            drift = v + g2 / (2 * sc) * (x + (1 - sc) * v)
            z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            x = x + drift * delta + g2.sqrt() * (-delta).sqrt() * z
        else:
            x = x + delta * v
    return x
