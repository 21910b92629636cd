"""Flow path, shift, timestep samplers (§3.8 stratified), loss weighting and the §3.3 curriculum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rededit.flow.curriculum import ProgressiveTimestepCurriculum
from rededit.flow.path import (
    QWEN_IMAGE_SCHEDULER,
    calculate_mu,
    eps_from_velocity,
    expand_like,
    inference_sigmas,
    interpolate,
    shift_sigma,
    velocity_target,
    x0_from_velocity,
)
from rededit.flow.timesteps import DistributedStratifiedTimesteps, LogitNormalTimesteps, UniformTimesteps
from rededit.flow.weighting import SCHEMES, loss_weight


# ----------------------------------------------------------------------------------------------- path
def test_path_closed_forms_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t = interpolate(x0, eps, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], eps[2])
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma), x0)
    torch.testing.assert_close(eps_from_velocity(x_t, v, sigma), eps)
    # v is the derivative of the path in σ.
    h = 1e-6
    fd = (interpolate(x0, eps, sigma[1] + h) - interpolate(x0, eps, sigma[1] - h)) / (2 * h)
    torch.testing.assert_close(fd, v, rtol=1e-6, atol=1e-6)
    assert expand_like(sigma, x0).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        expand_like(torch.ones(2), x0)


def test_shift_and_mu_match_diffusers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    cfg = QWEN_IMAGE_SCHEDULER
    for seq_len in (64, 256, 1024, 4096, 8192):
        ref = calculate_shift(
            seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
        )
        assert calculate_mu(seq_len) == pytest.approx(ref, abs=1e-12)
    assert calculate_mu(256) == pytest.approx(0.5) and calculate_mu(8192) == pytest.approx(0.9)

    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(t, 0.7), sched.time_shift(0.7, 1.0, t))
    assert shift_sigma(0.0, 0.7) == 0.0 and shift_sigma(1.0, 0.7) == pytest.approx(1.0)
    torch.testing.assert_close(shift_sigma(t, 0.0), t)
    # logit(shift(σ)) = logit(σ) + μ
    torch.testing.assert_close(torch.logit(shift_sigma(t, 0.7)), torch.logit(t) + 0.7)

    # Full inference schedule = scheduler.set_timesteps with the pipeline's sigmas.
    for steps in (2, 4, 28):
        mu = calculate_mu(1024)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        torch.testing.assert_close(inference_sigmas(steps, mu), sched.sigmas, rtol=0, atol=1e-6)
    # diffusers' terminal stretch divides 0 by 0 for a 1-step schedule (NaN); ours stays [1, 0].
    assert inference_sigmas(1, calculate_mu(1024)).tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ samplers
def test_stratified_union_hits_every_bin_once_and_rotates() -> None:
    k, b = 4, 8
    sampler = DistributedStratifiedTimesteps()
    strata_by_rank: dict[int, set[int]] = {r: set() for r in range(k)}
    for step in range(12):
        sigmas = torch.cat([sampler.sample(b, step=step, rank=r, world_size=k, seed=7) for r in range(k)])
        bins = torch.floor(sigmas.double() * k * b).long()
        assert sorted(bins.tolist()) == list(range(k * b)), f"step {step}"
        for r in range(k):
            strata_by_rank[r].add(sampler.stratum(step=step, rank=r, world_size=k, seed=7)[0])
            s = sampler.sample(b, step=step, rank=r, world_size=k, seed=7)
            lo, _ = sampler.stratum(step=step, rank=r, world_size=k, seed=7)
            assert ((s >= lo / k) & (s < (lo + 1) / k)).all()
    assert all(len(v) > 1 for v in strata_by_rank.values()), "strata must rotate across steps"


def test_stratified_determinism_and_step_dependence() -> None:
    sampler = DistributedStratifiedTimesteps()
    a = sampler.sample(6, step=3, rank=1, world_size=2, seed=0)
    assert torch.equal(a, sampler.sample(6, step=3, rank=1, world_size=2, seed=0))
    assert not torch.equal(a, sampler.sample(6, step=4, rank=1, world_size=2, seed=0))
    assert not torch.equal(a, sampler.sample(6, step=3, rank=1, world_size=2, seed=1))
    assert a.dtype == torch.float32 and a.shape == (6,)
    # Micro-batch order is shuffled: the sub-bin index is not the position.
    bins = torch.floor(torch.stack([sampler.sample(8, step=s, rank=0, world_size=1) for s in range(5)]) * 8)
    assert any(not torch.equal(row, torch.arange(8.0)) for row in bins)


def test_stratified_with_logit_normal_base_covers_quantiles() -> None:
    k, b = 2, 16
    sampler = DistributedStratifiedTimesteps(base="logit_normal", mean=0.0, std=1.0)
    sig = torch.cat([sampler.sample(b, step=0, rank=r, world_size=k) for r in range(k)]).double()
    # Map back through the logit-normal CDF: one draw per uniform bin.
    u = 0.5 * (1 + torch.erf(torch.logit(sig) / math.sqrt(2)))
    assert sorted(torch.floor(u * k * b).long().tolist()) == list(range(k * b))


def test_uniform_sampler_determinism_and_range() -> None:
    s = UniformTimesteps()
    a = s.sample(1000, step=0, rank=0, seed=3)
    assert torch.equal(a, s.sample(1000, step=0, rank=0, seed=3))
    assert not torch.equal(a, s.sample(1000, step=0, rank=1, world_size=2, seed=3))
    assert a.min() > 0 and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.03


def test_logit_normal_moments() -> None:
    s = LogitNormalTimesteps(mean=0.5, std=0.8)
    sig = torch.cat([s.sample(4096, step=i, seed=0) for i in range(4)]).double()
    z = torch.logit(sig)
    assert abs(z.mean().item() - 0.5) < 0.05
    assert abs(z.std().item() - 0.8) < 0.05


def test_dynamic_shift_composes() -> None:
    base = UniformTimesteps()
    shifted = UniformTimesteps(shift="dynamic")
    u = base.sample(64, step=0, seed=1)
    s = shifted.sample(64, step=0, seed=1, seq_len=4096)
    torch.testing.assert_close(s.double(), shift_sigma(u.double(), calculate_mu(4096)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="seq_len"):
        shifted.sample(4, step=0)
    fixed = UniformTimesteps(shift_mu=1.0)
    assert fixed.sample(512, step=0).mean() > 0.6
    with pytest.raises(ValueError):
        UniformTimesteps(shift="dynamic", shift_mu=1.0)


# ----------------------------------------------------------------------------------------- weighting
@pytest.mark.parametrize("scheme", SCHEMES)
def test_weighting_mean_one_under_uniform_sigma(scheme: str) -> None:
    # Gauss–Legendre quadrature of E_{σ~U(0,1)}[w(σ)] (smooth integrands: 200 nodes are plenty).
    x, wq = np.polynomial.legendre.leggauss(200)
    sigma = torch.tensor(0.5 * (x + 1))
    weights = loss_weight(sigma, scheme, mean=0.0, std=1.0).double()
    assert float((weights * torch.tensor(0.5 * wq)).sum()) == pytest.approx(1.0, abs=1e-4)


def test_logit_normal_weight_shape() -> None:
    w = loss_weight(torch.tensor([0.02, 0.5, 0.98]), "logit_normal")
    assert w[1] > 1.5 and w[0] < 0.1 and w[2] < 0.1
    x, wq = np.polynomial.legendre.leggauss(200)
    shifted = loss_weight(torch.tensor(0.5 * (x + 1)), "logit_normal", mean=1.0, std=0.5).double()
    assert float((shifted * torch.tensor(0.5 * wq)).sum()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="unknown"):
        loss_weight(torch.tensor([0.5]), "bogus")


# ---------------------------------------------------------------------------------------- curriculum
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_curriculum_starts_high_and_anneals_to_base(schedule: str) -> None:
    base = DistributedStratifiedTimesteps()
    cur = ProgressiveTimestepCurriculum(base, start_bias=1.5, anneal_steps=100, schedule=schedule)
    early = torch.cat([cur.sample(64, step=0, rank=r, world_size=4) for r in range(4)])
    assert early.mean() > 0.6
    assert cur.weight_at(0) == 1.0 and cur.weight_at(100) == 0.0 and cur.weight_at(500) == 0.0
    assert 0 < cur.weight_at(50) < 1
    mid = torch.cat([cur.sample(64, step=50, rank=r, world_size=4) for r in range(4)])
    assert 0.5 < mid.mean() < early.mean()
    for step in (100, 250):
        for r in range(4):
            assert torch.equal(
                cur.sample(16, step=step, rank=r, world_size=4),
                base.sample(16, step=step, rank=r, world_size=4),
            )


def test_curriculum_state_round_trip() -> None:
    cur = ProgressiveTimestepCurriculum(UniformTimesteps(), anneal_steps=10)
    cur.sample(4, step=7)
    state = cur.state_dict()
    fresh = ProgressiveTimestepCurriculum(UniformTimesteps(), anneal_steps=10)
    fresh.load_state_dict(state)
    assert fresh.step == 7
    assert torch.equal(fresh.sample(4), cur.sample(4, step=7))
    # apply() on pre-drawn σ is what sample() does after the base draw.
    base = UniformTimesteps().sample(4, step=7)
    assert torch.equal(cur.apply(base, 7), cur.sample(4, step=7))
    assert torch.equal(cur.apply(base, 10), base)
