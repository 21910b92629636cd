"""Training noise-level samplers (§3.3, §3.8).

Every sampler draws ``u ∈ (0, 1)`` in *uniform space*, maps it through the inverse CDF of a base
distribution (uniform, or logit-normal ``σ = sigmoid(m + s·Φ⁻¹(u))``), then optionally applies the
Qwen-Image exponential shift (fixed ``shift_mu`` or ``shift="dynamic"`` with ``μ = calculate_mu(seq_len)``).
Both maps are monotone, so stratification done in uniform space survives them: stratified + logit-normal
gives one draw per quantile bin of the logit-normal.

Randomness comes only from explicit parts: ``torch_generator(seed, <name>, step, rank)``. No sampler keeps
RNG state, so resuming at step ``n`` reproduces step ``n``'s σs, and the same (seed, step, rank) gives the
same σs on every machine. Draws happen on CPU and are moved to ``device`` (device generators differ).

Common interface::

    sample(batch_size, *, step, rank=0, world_size=1, seed=0, seq_len=None, device="cpu") -> sigma [B]
"""

from __future__ import annotations

import abc
import math
from typing import Literal

import torch

from rededit.flow.path import calculate_mu, shift_sigma
from rededit.utils.seeding import torch_generator

BaseDistribution = Literal["uniform", "logit_normal"]


class TimestepSampler(abc.ABC):
    """Base class: uniform-space draws → base inverse CDF → optional shift → clamp to ``[eps, 1 − eps]``.

    Args:
        base: base distribution the uniform draws are mapped through.
        mean: logit-normal location ``m`` (``base="logit_normal"``).
        std: logit-normal scale ``s``.
        shift: ``None`` or ``"dynamic"`` (``μ`` from the ``seq_len`` passed to :meth:`sample`).
        shift_mu: fixed ``μ`` (exclusive with ``shift="dynamic"``).
        base_seq_len, max_seq_len, base_shift, max_shift: ``calculate_mu`` constants (Qwen-Image values).
        eps: keeps σ strictly inside (0, 1) (σ = 0 would make x-prediction targets and logit-normal
            densities degenerate).
    """

    name = "timesteps"

    def __init__(
        self,
        base: BaseDistribution = "uniform",
        mean: float = 0.0,
        std: float = 1.0,
        shift: str | None = None,
        shift_mu: float | None = None,
        base_seq_len: int = 256,
        max_seq_len: int = 8192,
        base_shift: float = 0.5,
        max_shift: float = 0.9,
        eps: float = 1e-5,
    ) -> None:
        if base not in ("uniform", "logit_normal"):
            raise ValueError(f"base must be 'uniform' or 'logit_normal', got {base!r}")
        if shift not in (None, "dynamic"):
            raise ValueError(f"shift must be None or 'dynamic', got {shift!r}")
        if shift == "dynamic" and shift_mu is not None:
            raise ValueError("give either shift='dynamic' or a fixed shift_mu, not both")
        if std <= 0:
            raise ValueError("std must be > 0")
        self.base = base
        self.mean = float(mean)
        self.std = float(std)
        self.shift = shift
        self.shift_mu = None if shift_mu is None else float(shift_mu)
        self.mu_kwargs = {
            "base_seq_len": base_seq_len,
            "max_seq_len": max_seq_len,
            "base_shift": base_shift,
            "max_shift": max_shift,
        }
        self.eps = float(eps)

    @abc.abstractmethod
    def uniform(self, batch_size: int, *, step: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
        """``u`` ``[B]`` in ``[0, 1)`` (float64, CPU)."""

    def base_icdf(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse CDF of the base distribution applied to ``u`` ``[B]``."""
        if self.base == "uniform":
            return u
        z = math.sqrt(2.0) * torch.erfinv(2 * u.clamp(self.eps, 1 - self.eps) - 1)
        return torch.sigmoid(self.mean + self.std * z)

    def mu_for(self, seq_len: int | None) -> float | None:
        if self.shift == "dynamic":
            if seq_len is None:
                raise ValueError("shift='dynamic' needs seq_len (target image tokens) at sample()")
            return calculate_mu(seq_len, **self.mu_kwargs)
        return self.shift_mu

    def sample(
        self,
        batch_size: int,
        *,
        step: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        seq_len: int | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """σ ``[B]`` (float32) in ``[eps, 1 − eps]``, a function of (seed, step, rank, world_size) only."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        u = self.uniform(
            batch_size, step=int(step), rank=int(rank), world_size=int(world_size), seed=int(seed)
        )
        sigma = self.base_icdf(u)
        mu = self.mu_for(seq_len)
        if mu is not None:
            sigma = shift_sigma(sigma.clamp_min(self.eps), mu)
        return sigma.clamp(self.eps, 1 - self.eps).to(device=device, dtype=torch.float32)


class UniformTimesteps(TimestepSampler):
    """i.i.d. draws per rank: ``u ~ U(0, 1)`` from ``(seed, step, rank)``; base uniform by default."""

    name = "uniform"

    def uniform(self, batch_size: int, *, step: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
        gen = torch_generator(seed, self.name, step, rank)
        return torch.rand(batch_size, generator=gen, dtype=torch.float64)


class LogitNormalTimesteps(UniformTimesteps):
    """i.i.d. logit-normal σ (SD3): ``logit(σ) ~ N(mean, std²)``."""

    name = "logit_normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0, **kwargs) -> None:
        kwargs.setdefault("base", "logit_normal")
        super().__init__(mean=mean, std=std, **kwargs)


class DistributedStratifiedTimesteps(TimestepSampler):
    """Distributed stratified sampling with synchronised stratum rotation (§3.8).

    ``[0, 1)`` (uniform space) is cut into ``K`` equal strata, ``K = num_strata or world_size``. At each
    step the map rank → stratum is a permutation drawn from ``(seed, step // rotate_every[, group])``: every
    rank computes the same permutation without communication (the report's broadcast permutation seed),
    and strata rotate so no rank is tied to a noise band. Within its stratum a rank's ``B`` samples are
    sub-stratified: ``B`` equal sub-intervals, one uniform draw in each, in shuffled order (so position in
    the micro-batch carries no noise level). The union over the K ranks at one step hits each of the
    ``K·B`` equal bins exactly once.

    With ``num_strata < world_size`` ranks form groups of ``num_strata`` consecutive ranks, each group
    covering all strata with its own permutation.

    Args:
        num_strata: ``K``; ``None`` uses the world size.
        rotate_every: steps between permutation changes (1: every step).
        **kwargs: base distribution / shift options of :class:`TimestepSampler`.
    """

    name = "stratified"

    def __init__(self, num_strata: int | None = None, rotate_every: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_strata is not None and num_strata < 1:
            raise ValueError("num_strata must be >= 1")
        if rotate_every < 1:
            raise ValueError("rotate_every must be >= 1")
        self.num_strata = num_strata
        self.rotate_every = int(rotate_every)

    def stratum(self, *, step: int, rank: int, world_size: int, seed: int) -> tuple[int, int]:
        """``(stratum index, K)`` of ``rank`` at ``step``."""
        k = self.num_strata or world_size
        group, member = divmod(rank, k)
        gen = torch_generator(seed, self.name, "perm", step // self.rotate_every, group)
        perm = torch.randperm(k, generator=gen)
        return int(perm[member]), k

    def uniform(self, batch_size: int, *, step: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
        stratum, k = self.stratum(step=step, rank=rank, world_size=world_size, seed=seed)
        gen = torch_generator(seed, self.name, "draw", step, rank)
        sub = torch.randperm(batch_size, generator=gen).to(torch.float64)
        jitter = torch.rand(batch_size, generator=gen, dtype=torch.float64)
        return (stratum + (sub + jitter) / batch_size) / k
