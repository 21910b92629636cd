"""Inference: Euler ODE sampler over the shifted flow schedule, with true CFG (Qwen-Image-Edit-Plus).

Matches diffusers' ``QwenImageEditPlusPipeline`` + ``FlowMatchEulerDiscreteScheduler`` with the Qwen-Image
scheduler config (tested to 1e-5 against them on a tiny random transformer)::

    σ_0..σ_{S−1} = stretch_{0.02}(shift(linspace(1, 1/S, S); μ)),  σ_S = 0,  μ = calculate_mu(N_target)
    x ← x + (σ_{i+1} − σ_i) · v̂(x, σ_i)

True classifier-free guidance (when ``cfg_scale > 1`` and a negative prompt is given), per packed token
``[B, N, C·p²]``::

    v = v_neg + s·(v_cond − v_neg);   v ← v · ‖v_cond‖ / ‖v‖      (norm over the token's features)

The norm rescale keeps the guided velocity at the conditional one's magnitude (diffusers does it so large
scales do not over-saturate).

Editors loaded from a diffusers pipeline folder (issue 19) carry the folder's
``scheduler/scheduler_config.json`` (``backbone.scheduler_config``, or ``scheduler=``): the schedule then comes
from it (:func:`~rededit.flow.path.schedule_sigmas`) and the loop keeps the pipeline's numerics, so its output
is the pipeline's in any dtype, not only in float32:

* the latents stay in ``latents_dtype`` between steps (the pipeline's ``prompt_embeds.dtype``; default the
  transformer's parameter dtype), as ``FlowMatchEulerDiscreteScheduler.step`` casts its float32 result back to
  the model output's dtype;
* the transformer sees ``t = σ·N`` (float32, N = ``num_train_timesteps``) cast to that dtype and divided by N,
  the pipeline's ``timestep / 1000``, not ``σ`` rounded on its own (they differ in bf16);
* true CFG and its norm rescale run in the model output's dtype.

Without a scheduler config (the tiny demo editors) the schedule uses :data:`QWEN_IMAGE_SCHEDULER`'s constants
and the loop runs in float32, as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rededit.flow.path import (
    QWEN_IMAGE_SCHEDULER,
    calculate_mu,
    inference_sigmas,
    schedule_sigmas,
    scheduler_settings,
)
from rededit.models.packing import pack_latents, unpack_latents


def cfg_combine(v_cond: torch.Tensor, v_neg: torch.Tensor, scale: float, patch: int = 2) -> torch.Tensor:
    """True CFG with the Edit-Plus per-token norm rescale; inputs/outputs ``[B, C, h, w]``."""
    h, w = v_cond.shape[-2:]
    cond = pack_latents(v_cond, patch)
    neg = pack_latents(v_neg, patch)
    comb = neg + scale * (cond - neg)
    comb = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    return unpack_latents(comb, h, w, patch)


def ode_velocity(backbone: torch.nn.Module, v_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # x0-prediction backbones floor σ in their x0 → v conversion; undo it so the Euler step is exact.
    exact = getattr(backbone, "exact_velocity", None)
    return (exact(v_hat, sigma) if exact is not None else v_hat).float()


@torch.no_grad()
def euler_sample(
    backbone: torch.nn.Module,
    *,
    noise: torch.Tensor,
    references: Sequence[torch.Tensor],
    text_emb: torch.Tensor,
    text_mask: torch.Tensor | None,
    neg_text_emb: torch.Tensor | None = None,
    neg_text_mask: torch.Tensor | None = None,
    steps: int = 28,
    cfg_scale: float = 1.0,
    mu: float | None = None,
    shift_terminal: float | None = QWEN_IMAGE_SCHEDULER["shift_terminal"],
    base_seq_len: int = QWEN_IMAGE_SCHEDULER["base_image_seq_len"],
    max_seq_len: int = QWEN_IMAGE_SCHEDULER["max_image_seq_len"],
    base_shift: float = QWEN_IMAGE_SCHEDULER["base_shift"],
    max_shift: float = QWEN_IMAGE_SCHEDULER["max_shift"],
    sigmas: torch.Tensor | None = None,
    vae: torch.nn.Module | None = None,
    scheduler: Mapping[str, Any] | None = None,
    latents_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` (σ = 1) to data (σ = 0).

    Args:
        backbone: an :class:`~rededit.models.backbone.EditBackbone` (``forward(x_t, refs, σ, text, mask) → v``).
        noise: ``ε`` ``[B, C, h, w]`` (drawn by the caller from an explicit generator).
        references: clean reference latents ``[B, C, h_k, w_k]`` (K may be 0).
        text_emb, text_mask: ``[B, L, D]``, ``[B, L]`` bool.
        neg_text_emb, neg_text_mask: negative prompt for true CFG (``[B, L', D]``, ``[B, L']``).
        steps: number of Euler steps ``S``.
        cfg_scale: guidance scale; CFG runs only when ``> 1`` and a negative prompt is given (as diffusers).
        mu: shift; ``None`` computes ``calculate_mu`` from the target's token count.
        shift_terminal: last non-zero σ after stretching (Qwen-Image: 0.02; ``None`` disables).
        base_seq_len, max_seq_len, base_shift, max_shift: ``calculate_mu`` constants.
        sigmas: explicit schedule ``[S + 1]`` ending in 0 (overrides steps/mu/shift_terminal).
        vae: if given, the result is decoded to images ``[B, 3, H, W]``.
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` config (default: ``backbone.scheduler_config``, the
            editor's pipeline folder's). With one, the schedule comes from it (the constants above are unused)
            and the loop keeps the pipeline's numerics (module docstring).
        latents_dtype: with a scheduler config, the dtype of the latents between steps (default: the
            backbone's parameter dtype).

    Returns:
        ``x̂0`` latents ``[B, C, h, w]`` in float32, or in ``latents_dtype`` with a scheduler config (or decoded
        images if ``vae`` is given).
    """
    patch = getattr(backbone, "patch_size", 2)
    h, w = noise.shape[-2:]
    if scheduler is None:
        scheduler = getattr(backbone, "scheduler_config", None)
    if scheduler is not None:
        return _pipeline_euler(
            backbone,
            scheduler_settings(scheduler),
            noise=noise,
            references=references,
            text_emb=text_emb,
            text_mask=text_mask,
            neg_text_emb=neg_text_emb,
            neg_text_mask=neg_text_mask,
            steps=steps,
            cfg_scale=cfg_scale,
            mu=mu,
            sigmas=sigmas,
            vae=vae,
            latents_dtype=latents_dtype,
        )
    if sigmas is None:
        if mu is None:
            mu = calculate_mu((h // patch) * (w // patch), base_seq_len, max_seq_len, base_shift, max_shift)
        sigmas = inference_sigmas(steps, mu, shift_terminal, device=noise.device)
    else:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=noise.device)
        if sigmas.ndim != 1 or float(sigmas[-1]) != 0.0:
            raise ValueError("explicit sigmas must be a 1-D schedule ending in 0")
    do_cfg = cfg_scale > 1 and neg_text_emb is not None

    b = noise.shape[0]
    x = noise.float()
    for i in range(sigmas.shape[0] - 1):
        sigma = sigmas[i].expand(b)
        v = ode_velocity(backbone, backbone(x, references, sigma, text_emb, text_mask), sigma)
        if do_cfg:
            v_neg = ode_velocity(backbone, backbone(x, references, sigma, neg_text_emb, neg_text_mask), sigma)
            v = cfg_combine(v, v_neg, cfg_scale, patch)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    if vae is not None:
        return vae.decode(x)
    return x


def _pipeline_euler(
    backbone: torch.nn.Module,
    settings: Mapping[str, Any],
    *,
    noise: torch.Tensor,
    references: Sequence[torch.Tensor],
    text_emb: torch.Tensor,
    text_mask: torch.Tensor | None,
    neg_text_emb: torch.Tensor | None,
    neg_text_mask: torch.Tensor | None,
    steps: int,
    cfg_scale: float,
    mu: float | None,
    sigmas: torch.Tensor | None,
    vae: torch.nn.Module | None,
    latents_dtype: torch.dtype | None,
) -> torch.Tensor:
    """:func:`euler_sample` with a scheduler config: ``QwenImageEditPlusPipeline``'s denoising loop (module doc)."""
    patch = getattr(backbone, "patch_size", 2)
    h, w = noise.shape[-2:]
    if sigmas is None:
        sigmas = schedule_sigmas(steps, (h // patch) * (w // patch), settings, mu=mu, device=noise.device)
    else:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=noise.device)
        if sigmas.ndim != 1 or float(sigmas[-1]) != 0.0:
            raise ValueError("explicit sigmas must be a 1-D schedule ending in 0")
    if latents_dtype is None:
        latents_dtype = next(backbone.parameters()).dtype
    n_train = float(settings["num_train_timesteps"])
    timesteps = sigmas[:-1] * n_train  # FlowMatchEulerDiscreteScheduler.timesteps (float32)
    do_cfg = cfg_scale > 1 and neg_text_emb is not None
    exact = getattr(backbone, "exact_velocity", None)  # x0-prediction backbones; identity for "v"

    b = noise.shape[0]
    x = noise.to(latents_dtype)
    for i in range(sigmas.shape[0] - 1):
        # the pipeline: timestep = t.expand(B).to(latents.dtype); transformer(timestep=timestep / 1000)
        t_in = timesteps[i].expand(b).to(latents_dtype) / n_train
        v = backbone(x, references, t_in, text_emb, text_mask)
        if exact is not None:
            v = exact(v, t_in)
        if do_cfg:
            v_neg = backbone(x, references, t_in, neg_text_emb, neg_text_mask)
            if exact is not None:
                v_neg = exact(v_neg, t_in)
            v = cfg_combine(v, v_neg, cfg_scale, patch)
        # FlowMatchEulerDiscreteScheduler.step: float32 sample + dt·v, cast back to the model output's dtype
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
    if vae is not None:
        return vae.decode(x)
    return x
