"""DiffusionNFT (report §3.6.2, eq. 3): the pure loss, reward normalisation, SDE sampler and NFTModule.

* eq. (3) against a direct computation on ``[B, N, D]`` and ``[B, C, h, w]`` velocities; a gradient step
  on v_θ (starting at v_old, as after every soft update) moves it toward v for r = 1, away for r = 0.
* r from per-prompt group statistics: clipped advantages mapped onto [0, 1], NaN rewards invalid.
* The old policy's soft update follows η_n = min(η_max, rate·n) and writes the old module in place.
* The SDE sampler at zero noise is the Euler ODE sampler.
* NFTModule: a 2-step run with an online rollout and a test reward (mean brightness) logs reward, r stats
  and hack monitors every step, keeps rollouts a function of (seed, step, rank), updates the old policy,
  and checkpoints it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import compose, read_step_metric, train_overrides
from rededit.losses import nft_loss, optimality_probability
from rededit.rewards.base import Reward
from rededit.stages.nft import OldPolicyEMA, repeat_batch
from rededit.train import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class BrightnessReward(Reward):
    """Test reward: mean luma of the edit, in [0, 1]; NaN for tasks named in ``skip``."""

    name = "brightness"

    def __init__(self, skip: tuple[str, ...] = ()):
        super().__init__()
        self.skip = tuple(skip)

    def forward(self, images, batch):
        luma = images.mean(dim=(1, 2, 3))
        skip = torch.tensor([t in self.skip for t in batch["tasks"]], device=images.device)
        return {"reward": torch.where(skip, torch.nan, luma), "luma": luma}


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("shape", [(3, 5, 8), (3, 4, 2, 2)], ids=["BND", "BChw"])
def test_nft_loss_matches_direct_formula(shape) -> None:
    g = torch.Generator().manual_seed(0)
    v_theta, v_old, v = (torch.randn(shape, generator=g) for _ in range(3))
    r = torch.tensor([0.0, 0.3, 1.0])
    beta = 0.7
    got = nft_loss(v_theta, v_old, v, r, beta)
    want = []
    for i in range(3):
        pos = (1 - beta) * v_old[i] + beta * v_theta[i]
        neg = (1 + beta) * v_old[i] - beta * v_theta[i]
        want.append(r[i] * ((pos - v[i]) ** 2).mean() + (1 - r[i]) * ((neg - v[i]) ** 2).mean())
    torch.testing.assert_close(got, torch.stack(want))


@pytest.mark.parametrize("r_value,closer", [(1.0, True), (0.0, False)])
def test_nft_gradient_pushes_toward_target_for_r1_away_for_r0(r_value, closer) -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 6, 8, generator=g)
    start = torch.randn(4, 6, 8, generator=g)
    v_theta = start.clone().requires_grad_(True)
    v_old = start.clone()  # right after a soft update the old policy equals the policy
    nft_loss(v_theta, v_old, v, torch.full((4,), r_value), beta=1.0).sum().backward()
    # The gradient is exactly 2β(2r − 1)(v_θ − v)/N.
    torch.testing.assert_close(v_theta.grad, 2 * (2 * r_value - 1) * (start - v) / (6 * 8))
    stepped = start - 10.0 * v_theta.grad
    before, after = (start - v).pow(2).sum(), (stepped - v).pow(2).sum()
    assert (after < before) == closer
    # r = ½: no push either way.
    v_theta.grad = None
    nft_loss(v_theta, v_old, v, torch.full((4,), 0.5), beta=1.0).sum().backward()
    assert v_theta.grad.abs().max() < 1e-6


def test_nft_loss_checks_shapes() -> None:
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="same shape"):
        nft_loss(x, torch.zeros(2, 3, 5), x, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="r must be"):
        nft_loss(x, x, x, torch.zeros(3), 1.0)


def test_optimality_probability_group_statistics() -> None:
    rewards = torch.tensor([0.1, 0.3, 0.5, 10.0, 10.0, 10.0, 0.2, float("nan"), 0.4])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    r, adv, valid = optimality_probability(rewards, groups, adv_clip=2.0)
    std0 = torch.tensor([0.1, 0.3, 0.5]).std(unbiased=False)
    torch.testing.assert_close(adv[:3], (torch.tensor([0.1, 0.3, 0.5]) - 0.3) / (std0 + 1e-4))
    torch.testing.assert_close(r[:3], 0.5 + adv[:3] / 4)
    # A group of equal rewards carries no preference (r = ½) whatever its level.
    torch.testing.assert_close(r[3:6], torch.full((3,), 0.5))
    assert valid.tolist() == [True] * 7 + [False, True] and r[7] == 0.5
    # Group 2's std is over its two valid rewards: ±1 std, inside the clip.
    torch.testing.assert_close(adv[[6, 8]], torch.tensor([-1.0, 1.0]), atol=1e-3, rtol=0)
    # Clipping saturates at 0 / 1.
    r1, _, _ = optimality_probability(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long))
    assert r1[-1] == 1.0 and (r1[:3] >= 0).all() and r1.max() <= 1
    with pytest.raises(ValueError, match="scale"):
        optimality_probability(rewards, groups, scale="batch")


def test_old_policy_soft_update_schedule_and_in_place_write() -> None:
    ema = OldPolicyEMA(decay=0.5, rate=0.1)
    assert [ema.decay_at(n) for n in (0, 1, 3, 5, 50)] == pytest.approx([0.0, 0.1, 0.3, 0.5, 0.5])

    class Holder(torch.nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.backbone = torch.nn.Linear(2, 2)
            torch.nn.init.constant_(self.backbone.weight, value)
            torch.nn.init.constant_(self.backbone.bias, value)

    policy, old = Holder(1.0), Holder(0.0)
    ema.shadow = {n: p.data for n, p in old.backbone.named_parameters()}
    ema.update(policy)  # η_0 = 0: the old policy jumps to the policy
    assert torch.equal(old.backbone.weight, policy.backbone.weight)
    torch.nn.init.constant_(policy.backbone.weight, 2.0)
    ema.update(policy)  # η_1 = 0.1
    torch.testing.assert_close(old.backbone.weight, torch.full((2, 2), 0.1 * 1.0 + 0.9 * 2.0))


def test_repeat_batch_groups_samples() -> None:
    batch = {
        "ids": ["a", "b"],
        "epoch": 0,
        "step": 3,
        "target": torch.arange(2.0).view(2, 1),
        "references": [torch.arange(2.0).view(2, 1)],
        "ocr_target": ["x", None],
    }
    out = repeat_batch(batch, 3)
    assert out["ids"] == ["a"] * 3 + ["b"] * 3 and out["ocr_target"] == ["x"] * 3 + [None] * 3
    assert out["target"].view(-1).tolist() == [0, 0, 0, 1, 1, 1] and out["step"] == 3
    assert out["references"][0].shape == (6, 1)


# ------------------------------------------------------------------------------------------------ stage
@pytest.fixture(scope="module")
def nft_run(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("nft_run")
    overrides = (
        "stage=nft",
        "stage.reward={_target_: test_nft.BrightnessReward}",
        "stage.group_size=2",
        "stage.rollout_steps=2",
        "stage.old_decay_rate=0.1",
        "optimizer.lr=1e-3",
    )
    cfg = compose(train_overrides(tiny_corpus, *overrides, budget=256), out)
    L.seed_everything(cfg.seed)
    model, dm, trainer = build(cfg)
    model.configure_model()
    # The untrained tiny backbone (x0-prediction, source residual, zero-initialised output) predicts the
    # same x̂0 for every x_t, so all G rollouts of a prompt would coincide (flat groups, zero loss): perturb
    # it so rollouts depend on their noise, as a trained editor's do. Then rebuild the old policy from it.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model._old[0] = None
    model.configure_model()
    trainer.fit(model, datamodule=dm)
    return out, cfg, model, dm, trainer


def test_nft_online_run_logs_rewards_r_stats_and_monitors(nft_run) -> None:
    out, _, model, _, trainer = nft_run
    assert trainer.global_step == 2
    keys = ("reward/mean", "reward/std", "reward/luma", "nft/r_mean", "nft/r_std", "nft/valid_frac")
    keys += ("monitor/brightness", "monitor/saturation", "monitor/edge_density", "nft/policy_old_mse")
    for key in keys:
        assert sorted(read_step_metric(out, f"{key}_step")) == [1, 2], key
    # Reward = mean brightness and the monitor's brightness measure the same images.
    assert read_step_metric(out, "reward/mean_step")[1] == pytest.approx(
        read_step_metric(out, "reward/luma_step")[1]
    )
    # Rollouts of one prompt differ (different noise), so r spreads around ½.
    assert read_step_metric(out, "nft/r_std_step")[1] > 0
    assert read_step_metric(out, "nft/r_mean_step")[1] == pytest.approx(0.5, abs=1e-4)
    # Step 1 starts with the policy equal to the old policy; step 2 after an η_0 = 0 update: equal again.
    assert read_step_metric(out, "nft/policy_old_mse_step")[1] == pytest.approx(0.0, abs=1e-10)
    assert read_step_metric(out, "nft/policy_old_mse_step")[2] == pytest.approx(0.0, abs=1e-10)
    # After the last step (η_1 = 0.1) the old policy is between the two: not equal to the policy.
    assert model.old_ema.num_updates == 2
    diffs = [
        (p - q).abs().max().item()
        for (n, p), (_, q) in zip(model.backbone.named_parameters(), model.old_policy.named_parameters())
        if p.requires_grad
    ]
    assert max(diffs) > 0
    assert not any("old" in k or "reward" in k for k in model.state_dict())


def test_nft_rollout_is_a_function_of_seed_step_rank(nft_run) -> None:
    _, _, model, dm, _ = nft_run
    batch = next(iter(dm.train_dataloader()))
    _, refs = model.encode_images(batch)
    emb, mask = model.text_condition(batch)
    f = model.vae.downsample
    shape = (len(batch["ids"]), model.vae.latent_channels, *(s // f for s in batch["target"].shape[-2:]))
    a = model.rollout(batch, refs, emb, mask, shape)
    b = model.rollout(batch, refs, emb, mask, shape)
    c = model.rollout({**batch, "step": batch["step"] + 1}, refs, emb, mask, shape)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nft_checkpoint_restores_old_policy(nft_run) -> None:
    out, cfg, model, _, _ = nft_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["nft_old_policy"]
    assert state["num_updates"] == 2
    L.seed_everything(cfg.seed + 1)  # a different random init: the old policy must come from the checkpoint
    fresh, _, _ = build(cfg)
    fresh.on_load_checkpoint(ckpt)
    for (n, p), (_, q) in zip(fresh.old_policy.named_parameters(), model.old_policy.named_parameters()):
        torch.testing.assert_close(p, q.cpu(), msg=n)
    assert fresh.old_ema.num_updates == 2
    # The shadow aliases the old policy: one more update writes into the module.
    before = next(fresh.old_policy.parameters()).clone()
    fresh.old_ema.update(fresh)
    assert not torch.equal(next(fresh.old_policy.parameters()), before)


def test_sde_sampler_without_noise_is_the_ode(nft_run) -> None:
    from rededit.flow.sampler import euler_sample
    from rededit.flow.sde import sde_sample

    _, _, model, _, _ = nft_run
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, model.vae.latent_channels, 8, 8, generator=g)
    emb, mask = torch.randn(2, 5, 384, generator=g), torch.ones(2, 5, dtype=torch.bool)
    refs = [torch.randn(2, model.vae.latent_channels, 8, 8, generator=g)]
    kw = dict(noise=noise, references=refs, text_emb=emb, text_mask=mask, steps=3)
    ode = euler_sample(model.backbone, **kw)
    torch.testing.assert_close(sde_sample(model.backbone, noise_level=0.0, **kw), ode)
    noisy = sde_sample(model.backbone, noise_level=0.7, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.isfinite(noisy).all() and not torch.allclose(noisy, ode)


def test_text_area_monitor_reads_the_ocr_rewards_boxes() -> None:
    """With an OCR reward in the mix, the text-area hack monitor is its reading (not NaN); without, NaN."""
    from types import SimpleNamespace

    from rededit.stages.nft import NFTModule

    images = torch.rand(2, 3, 16, 16)
    area = torch.tensor([0.25, 0.5])
    ocr = SimpleNamespace(
        reward=lambda im, b: {"reward": torch.ones(2), "ocr_text_area": area}, monitors=True
    )
    _, monitors = NFTModule.score(ocr, images, {})
    assert torch.equal(monitors["text_area_fraction"], area)
    plain = SimpleNamespace(reward=lambda im, b: {"reward": torch.ones(2)}, monitors=True)
    _, monitors = NFTModule.score(plain, images, {})
    assert torch.isnan(monitors["text_area_fraction"]).all()


def test_nft_step_passes_the_region_boxes_to_rollout_policy_and_old_policy(tiny_corpus, tmp_path) -> None:
    """With backbone region tokens, the rollout and both loss forwards see the batch's boxes, G-repeated."""
    overrides = (
        "stage=nft",
        "stage.reward={_target_: test_nft.BrightnessReward}",
        "stage.group_size=2",
        "stage.rollout_steps=1",
        "backbone.region_tokens=true",
    )
    cfg = compose(train_overrides(tiny_corpus, *overrides, budget=256), tmp_path)
    model, dm, _ = build(cfg)
    model.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.get("object_boxes") is not None
    want = model.backbone.batch_regions(batch)
    want_g = [r for r in want for _ in range(2)]
    seen: dict[str, list] = {"policy": [], "old": []}
    for name, module in (("policy", model.backbone), ("old", model.old_policy)):
        orig = module.forward

        def spy(*a, _orig=orig, _module=module, _name=name, **k):
            regions = k.get("regions")
            seen[_name].append(_module._context_regions if regions is None else regions)
            return _orig(*a, **k)

        module.forward = spy
    model.nft_step(batch)
    assert seen["policy"] and seen["old"]
    for name, calls in seen.items():
        for regions in calls:  # the rollout's sampler forwards (context) and the loss forwards (argument)
            assert regions is not None and len(regions) == len(want_g), name
            for got, w in zip(regions, want_g):
                assert (got is None) == (w is None) and (w is None or torch.equal(got, w))
