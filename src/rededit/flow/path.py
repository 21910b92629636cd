"""Rectified-flow path and the Qwen-Image timestep shift (§3.3, §3.8).

Convention (σ is the noise level, σ = 0 data, σ = 1 noise; diffusers' flow-matching convention)::

    x_σ = (1 − σ)·x0 + σ·ε                  interpolate
    v   = dx_σ/dσ = ε − x0                  velocity_target
    x0  = x_σ − σ·v,   ε = x_σ + (1 − σ)·v  x0_from_velocity / eps_from_velocity

Qwen-Image "dynamic shifting" (exponential time shift of diffusers' ``FlowMatchEulerDiscreteScheduler``)::

    shift(σ; μ) = e^μ / (e^μ + (1/σ − 1))     ⇔  logit(shift(σ)) = logit(σ) + μ

with ``μ`` linear in the image token count (``calculate_mu``, diffusers' ``calculate_shift``). The
defaults are Qwen-Image's scheduler config: base/max image seq len 256/8192, base/max shift 0.5/0.9,
``shift_terminal = 0.02``.

σ tensors are ``[B]`` and broadcast against ``[B, C, h, w]`` (or any ``[B, ...]``) via :func:`expand_like`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: Qwen-Image ``scheduler/scheduler_config.json`` values (FlowMatchEulerDiscreteScheduler).
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
    "num_train_timesteps": 1000,
    "shift": 1.0,
}

#: ``FlowMatchEulerDiscreteScheduler``'s own defaults (diffusers 0.42.1): what a config file leaves out.
FLOW_MATCH_EULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "shift_terminal": None,
    "time_shift_type": "exponential",
}
#: Options of the scheduler that the Euler sampler does not implement (a config with one set is refused).
_UNSUPPORTED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def scheduler_settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampling schedule of a ``FlowMatchEulerDiscreteScheduler`` config (a pipeline folder's
    ``scheduler/scheduler_config.json``), absent keys at diffusers' defaults; ``None`` → :data:`QWEN_IMAGE_SCHEDULER`
    (the tiny demo editors, which come from no folder).

    Raises:
        ValueError: another scheduler class, or an option the Euler sampler does not implement (named).
    """
    if config is None:
        return dict(QWEN_IMAGE_SCHEDULER)
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(
            f"scheduler {name!r}: rededit's sampler implements FlowMatchEulerDiscreteScheduler only"
        )
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ValueError(
                f"scheduler config {key}={config[key]!r} is not implemented by rededit's Euler sampler"
            )
    out = {k: config.get(k, v) for k, v in FLOW_MATCH_EULER_DEFAULTS.items()}
    if out["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(
            f"scheduler config time_shift_type={out['time_shift_type']!r}: exponential or linear"
        )
    return out


def schedule_sigmas(
    steps: int,
    image_seq_len: int,
    settings: Mapping[str, Any],
    *,
    mu: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[steps + 1]`` float32 σ schedule ``FlowMatchEulerDiscreteScheduler.set_timesteps`` gives the Qwen-Image
    pipelines for ``settings`` (:func:`scheduler_settings`): ``linspace(1, 1/S, S)``, then the dynamic shift
    (``μ`` from ``image_seq_len`` target tokens unless given; exponential or linear) or the static ``shift``,
    then the stretch to ``shift_terminal``, then ``0``.

    Computed in float32 operation by operation as diffusers does (not in float64 like :func:`inference_sigmas`),
    so the schedule is the pipeline's to the bit; the one exception is ``steps = 1`` with a ``shift_terminal``,
    where diffusers divides 0 by 0 (NaN) and this returns ``[1, 0]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def f32(value: float) -> torch.Tensor:
        # numpy turns a Python scalar into a float32 before a float32 operation; torch may instead multiply by
        # a reciprocal (scalar / tensor): every scalar becomes a float32 tensor first.
        return torch.tensor(value, dtype=torch.float32)

    one = f32(1.0)
    s = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps).astype(np.float32))
    if settings["use_dynamic_shifting"]:
        if mu is None:
            mu = calculate_mu(
                image_seq_len,
                settings["base_image_seq_len"],
                settings["max_image_seq_len"],
                settings["base_shift"],
                settings["max_shift"],
            )
        e = f32(mu if settings["time_shift_type"] == "linear" else math.exp(mu))
        s = e / (e + (one / s - one))
    else:
        shift = f32(float(settings["shift"]))
        s = shift * s / (one + (shift - one) * s)
    terminal = settings["shift_terminal"]
    if terminal and steps > 1:  # diffusers' stretch_shift_to_terminal
        one_minus = one - s
        s = one - one_minus / (one_minus[-1] / f32(1.0 - terminal))
    return torch.cat([s, s.new_zeros(1)]).to(device=device)


def expand_like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast σ (scalar or ``[B]``) to ``[B, 1, ..., 1]`` matching ``x`` ``[B, ...]``."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be scalar or [B={x.shape[0]}], got shape {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_σ = (1 − σ)·x0 + σ·ε`` ``[B, ...]``."""
    s = expand_like(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``v = ε − x0`` (constant along the straight path)."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x̂0 = x_σ − σ·v``."""
    return x_t - expand_like(sigma, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``ε̂ = x_σ + (1 − σ)·v``."""
    return x_t + (1 - expand_like(sigma, x_t)) * v


def shift_sigma(sigma: torch.Tensor | float, mu: float) -> torch.Tensor | float:
    """Exponential time shift ``e^μ / (e^μ + (1/σ − 1))`` (diffusers ``_time_shift_exponential``, power 1).

    Maps 0 → 0 and 1 → 1 and is monotone; ``μ > 0`` moves mass toward noise (σ → 1). ``μ = 0`` is the
    identity up to rounding.
    """
    e = math.exp(mu)
    if isinstance(sigma, torch.Tensor):
        return e / (e + (1 / sigma - 1))
    if sigma <= 0:
        return 0.0
    return e / (e + (1 / sigma - 1))


def calculate_mu(
    seq_len: int | float,
    base_seq_len: int = 256,
    max_seq_len: int = 8192,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
) -> float:
    """Shift ``μ`` for ``seq_len`` target image tokens (diffusers ``calculate_shift``, Qwen-Image values).

    Linear through ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``, not clamped (as diffusers).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return float(seq_len) * m + b


def stretch_to_terminal(sigmas: torch.Tensor, shift_terminal: float) -> torch.Tensor:
    """Rescale ``1 − σ`` so that the last entry of a decreasing schedule equals ``shift_terminal``.

    diffusers ``stretch_shift_to_terminal`` (Qwen-Image: 0.02). ``sigmas`` ``[S]``.
    """
    one_minus = 1 - sigmas
    if float(one_minus[-1]) == 0.0:
        # A 1-step schedule is just [1]; diffusers would divide 0 by 0 here.
        return sigmas
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - one_minus / scale


def inference_sigmas(
    steps: int,
    mu: float | None,
    shift_terminal: float | None = 0.02,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sampling schedule ``[steps + 1]`` of the Qwen-Image pipelines, ending with 0.

    ``linspace(1, 1/steps, steps)`` → exponential shift with ``μ`` (skipped when ``None``) → stretch to
    ``shift_terminal`` (skipped when falsy) → append ``0``; computed in float64, then cast.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if mu is not None:
        s = shift_sigma(s, mu)
    if shift_terminal:
        s = stretch_to_terminal(s, shift_terminal)
    s = torch.cat([s, s.new_zeros(1)])
    return s.to(dtype=dtype, device=device)
