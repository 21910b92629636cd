"""Progressive timestep curriculum (§3.3 "Curriculum Learning via Progressive Timestep Sampling").

Early in pre-training, σ is biased toward high noise (global structure and layout, robust to noisy web
data); the bias then anneals away so the final distribution is the base sampler's.

Mechanism: an extra exponential time shift whose ``μ_c`` decays to 0::

    σ' = shift(σ; μ_c(step)),   logit(σ') = logit(σ) + μ_c(step),   μ_c(step) = start_bias · w(step)
    w(step) = max(0, 1 − step/anneal_steps)                  (linear)
            = ½(1 + cos(π·min(step/anneal_steps, 1)))        (cosine)

For a logit-normal base this is exactly a shift of the logit-normal mean from ``m + start_bias`` to ``m``;
for a uniform base it is the SD3-style shift ``s·σ/(1 + (s−1)σ)`` with ``s = e^{μ_c}``. Because the map is
monotone it composes with :class:`~rededit.flow.timesteps.DistributedStratifiedTimesteps`: each rank's
stratum is mapped as a whole, so the global batch still covers every quantile of the (biased) distribution.
At ``w = 0`` the base sampler's σs are returned unchanged (bit-identical).

Default ``start_bias = 1.5``: mean σ ≈ 0.73 at step 0 for a uniform base (vs 0.5).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from rededit.flow.path import shift_sigma
from rededit.flow.timesteps import TimestepSampler


class ProgressiveTimestepCurriculum:
    """Wraps a base :class:`TimestepSampler`; same ``sample`` interface, plus the step it is at.

    Args:
        base: the target sampler (e.g. stratified uniform).
        start_bias: ``μ_c`` at step 0 (logit-space shift toward noise; 0 disables the curriculum).
        anneal_steps: optimizer steps until the bias is gone.
        schedule: ``"linear"`` or ``"cosine"`` decay of the bias.
    """

    def __init__(
        self,
        base: TimestepSampler,
        start_bias: float = 1.5,
        anneal_steps: int = 10_000,
        schedule: Literal["linear", "cosine"] = "linear",
    ) -> None:
        if anneal_steps < 1:
            raise ValueError("anneal_steps must be >= 1")
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        self.base = base
        self.start_bias = float(start_bias)
        self.anneal_steps = int(anneal_steps)
        self.schedule = schedule
        self.step = 0

    def weight_at(self, step: int) -> float:
        """Remaining fraction ``w(step) ∈ [0, 1]`` of the initial bias (for logging)."""
        progress = min(max(step, 0) / self.anneal_steps, 1.0)
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def bias_at(self, step: int) -> float:
        """``μ_c(step) = start_bias · w(step)``."""
        return self.start_bias * self.weight_at(step)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def sample(
        self,
        batch_size: int,
        *,
        step: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        seq_len: int | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """σ ``[B]``: base sample shifted by ``μ_c(step)``. ``step=None`` uses (and does not advance) the
        held step; an explicit step is recorded as the held step."""
        if step is None:
            step = self.step
        else:
            self.step = int(step)
        sigma = self.base.sample(
            batch_size, step=step, rank=rank, world_size=world_size, seed=seed, seq_len=seq_len, device=device
        )
        return self.apply(sigma, step)

    def apply(self, sigma: torch.Tensor, step: int) -> torch.Tensor:
        """Shift already-drawn σ ``[B]`` by ``μ_c(step)`` (identity, bit-exact, once the bias is gone)."""
        mu = self.bias_at(step)
        if mu == 0.0:
            return sigma
        eps = getattr(self.base, "eps", 1e-5)
        return shift_sigma(sigma.double(), mu).clamp(eps, 1 - eps).to(sigma.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "start_bias": self.start_bias,
            "anneal_steps": self.anneal_steps,
            "schedule": self.schedule,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only the step is state; the hyper-parameters come from the config (a resumed run may change them
        # deliberately), so they are recorded for inspection but not restored.
        self.step = int(state["step"])
