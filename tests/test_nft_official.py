"""DiffusionNFT as its authors train it (issue 21): ``stage.nft.form=official`` next to the report's eq. (3).

* The official form (:func:`nft_loss_official` + :func:`nft_kl`, r from :func:`optimality_probability` with the
  batch std) equals an independent transcription of NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` (its
  per-prompt stat tracker with ``global_std``, the advantage clip, the x₀-space adaptive weights, the c/β scale
  and the KL to the reference), value and gradient, on fixed tensors of both layouts.
* β does not change the step size: at ``v_θ = v_old`` the gradient of the official form is
  ``−2σ·clip(A)·d/(w·N)`` for every β and c, and that of ``nft_loss(..., inverse_beta=True)`` is
  ``2(2r − 1)(v_old − v)/N`` for every β (eq. (3) as printed scales it by β). In the stage, one NFT step's
  parameter gradient is the same for β = 1 and β = 0.2 in both forms.
* The KL reference: built only for ``form=official`` with ``kl_weight > 0``, a frozen copy of the initial
  backbone outside the module tree; the loss gains ``kl_weight · mean‖v_θ − v_ref‖²`` (logged as ``nft/kl``);
  a checkpoint records its fingerprint and a resume against another reference is refused. Slow tier: under
  2-rank fsdp2 the reference is a sharded twin of the init_from weights (per-rank losses, KL included, equal a
  single-process step with the deep-copied reference).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose, train_overrides
from rededit.losses import nft_kl, nft_loss, nft_loss_official, optimality_probability
from rededit.rewards.base import Reward
from rededit.train import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class LumaReward(Reward):
    """Test reward: mean luma of the edit in [0, 1]."""

    name = "luma"

    def forward(self, images, batch):
        return {"reward": images.mean(dim=(1, 2, 3))}


# ------------------------------------------------------------------------------- the official trainer, transcribed
def _official_advantages(prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    """``PerPromptStatTracker(global_std=True).update`` (flow_grpo/stat_tracking.py): per-prompt mean, the std of
    every reward of the batch + 1e-4."""
    prompts_a = np.array(prompts)
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for prompt in np.unique(prompts_a):
        sel = prompts_a == prompt
        mean = np.mean(rewards[sel], axis=0, keepdims=True)
        std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        advantages[sel] = (rewards[sel] - mean) / std
    return advantages


def _official_loss(
    forward_prediction: torch.Tensor,
    old_prediction: torch.Tensor,
    ref_forward_prediction: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beta: float,
    adv_clip_max: float,
    kl_beta: float,
) -> torch.Tensor:
    """The training loss of ``train_nft_sd3.py`` for one micro-batch and timestep, step by step as it is
    written there (``config.beta`` = β, ``config.train.beta`` = ``kl_beta``, ``adv_mode = "all"``)."""
    dims = tuple(range(1, x0.ndim))
    t = timesteps / 1000.0
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    xt = (1 - t_expanded) * x0 + t_expanded * noise
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=dims)
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double())
            .mean(dim=dims, keepdim=True)
            .clip(min=0.00001)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=dims)
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    loss = policy_loss
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=dims)
    loss += kl_beta * torch.mean(kl_div_loss)
    return loss


def _fixed_tensors(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    return {
        "x0": torch.randn(shape, generator=g),
        "noise": torch.randn(shape, generator=g),
        "v_theta": torch.randn(shape, generator=g),
        "v_old": torch.randn(shape, generator=g),
        "v_ref": torch.randn(shape, generator=g),
        # Trainer timesteps in [0, 1000), σ = t / 1000 as the official trainer divides them.
        "timesteps": torch.tensor([937.0, 512.0, 250.0, 40.0, 800.0, 120.0])[:b],
        # Two prompts of three samples; the 9.0 outlier gives |A| > 1 (clipped at c = 1, not at c = 5).
        "rewards": torch.tensor([0.2, 0.9, 0.4, 9.0, 0.1, 0.5])[:b],
    }


@pytest.mark.parametrize("shape", [(6, 4, 3, 5), (6, 7, 8)], ids=["BChw", "BND"])
@pytest.mark.parametrize("beta,adv_clip", [(1.0, 5.0), (0.1, 5.0), (0.5, 1.0)])
def test_official_form_matches_the_official_trainer(shape, beta, adv_clip) -> None:
    t = _fixed_tensors(shape)
    prompts = ["a", "a", "a", "b", "b", "b"]
    kl_weight = 1e-2

    adv_official = torch.from_numpy(_official_advantages(prompts, t["rewards"].double().numpy())).float()
    v_off = t["v_theta"].clone().requires_grad_(True)
    want = _official_loss(
        v_off, t["v_old"], t["v_ref"], t["x0"], t["noise"], t["timesteps"], adv_official,
        beta=beta, adv_clip_max=adv_clip, kl_beta=kl_weight,
    )  # fmt: skip
    want.backward()

    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    r, adv, valid = optimality_probability(t["rewards"], groups, adv_clip=adv_clip, scale="global")
    assert valid.all()
    torch.testing.assert_close(adv, adv_official.clamp(-adv_clip, adv_clip), rtol=1e-5, atol=1e-6)
    sigma = t["timesteps"] / 1000.0
    s = sigma.view(-1, *([1] * (len(shape) - 1)))
    x_t = (1 - s) * t["x0"] + s * t["noise"]
    v_ours = t["v_theta"].clone().requires_grad_(True)
    policy = nft_loss_official(v_ours, t["v_old"], x_t, t["x0"], sigma, r, beta, adv_clip=adv_clip)
    got = policy.mean() + kl_weight * nft_kl(v_ours, t["v_ref"]).mean()
    got.backward()

    assert policy.shape == (shape[0],)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v_ours.grad, v_off.grad, rtol=1e-4, atol=1e-7)
    if adv_clip == 1.0:
        assert (adv.abs() == 1.0).any()  # the clip was exercised


def test_official_form_without_adaptive_weights_is_the_scaled_x0_mse() -> None:
    t = _fixed_tensors((6, 4, 3, 5))
    r = torch.linspace(0, 1, 6)
    sigma = t["timesteps"] / 1000.0
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * t["x0"] + s * t["noise"]
    beta, c = 0.3, 5.0
    got = nft_loss_official(
        t["v_theta"], t["v_old"], x_t, t["x0"], sigma, r, beta, adv_clip=c, adaptive_weighting=False
    )
    pos = x_t - s * (beta * t["v_theta"] + (1 - beta) * t["v_old"])
    neg = x_t - s * ((1 + beta) * t["v_old"] - beta * t["v_theta"])
    mse = lambda a: (a - t["x0"]).pow(2).flatten(1).mean(1)  # noqa: E731
    torch.testing.assert_close(got, c / beta * (r * mse(pos) + (1 - r) * mse(neg)))


def test_official_form_checks_its_inputs() -> None:
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="x_t"):
        nft_loss_official(x, x, torch.zeros(2, 3, 5), x, torch.ones(2), torch.ones(2), 1.0, adv_clip=5.0)
    with pytest.raises(ValueError, match="beta and adv_clip"):
        nft_loss_official(x, x, x, x, torch.ones(2), torch.ones(2), 0.0, adv_clip=5.0)
    with pytest.raises(ValueError, match="differ"):
        nft_kl(x, torch.zeros(2, 3, 5))


# ----------------------------------------------------------------------------------------------- β and the step
@pytest.mark.parametrize("adv_clip", [2.0, 5.0])
def test_official_gradient_at_the_old_policy_depends_on_neither_beta_nor_clip(adv_clip) -> None:
    """Documented in rededit.losses.nft: at v_θ = v_old, ∂L/∂v_θ = −2σ·clip(A)·d/(w·N), d = x̂0_old − x0."""
    t = _fixed_tensors((6, 4, 3, 5), seed=3)
    sigma = t["timesteps"] / 1000.0
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * t["x0"] + s * t["noise"]
    adv = torch.tensor([-1.5, -0.5, 0.0, 0.3, 1.0, 1.9])  # inside ±2: the clip does not act
    r = 0.5 + adv / (2 * adv_clip)
    d = x_t - s * t["v_old"] - t["x0"]
    w = d.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    n = d[0].numel()
    want = -2 * s * adv.view(-1, 1, 1, 1) * d / (w * n)
    for beta in (0.05, 0.3, 1.0):
        v = t["v_old"].clone().requires_grad_(True)
        nft_loss_official(v, t["v_old"], x_t, t["x0"], sigma, r, beta, adv_clip=adv_clip).sum().backward()
        torch.testing.assert_close(v.grad, want, rtol=1e-4, atol=1e-7)


def test_report_form_gradient_at_the_old_policy_is_beta_free_with_inverse_beta() -> None:
    """eq. (3): 2β(2r − 1)(v_old − v)/N; eq. (3)/β (``inverse_beta``, the stage's report form): 2(2r − 1)(v_old − v)/N."""
    g = torch.Generator().manual_seed(4)
    v, v_old = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    r = torch.tensor([0.0, 0.3, 0.8, 1.0])
    unit = 2 * (2 * r - 1).view(-1, 1, 1) * (v_old - v) / (6 * 8)
    for beta in (0.1, 0.5, 1.0):
        a = v_old.clone().requires_grad_(True)
        nft_loss(a, v_old, v, r, beta, inverse_beta=True).sum().backward()
        torch.testing.assert_close(a.grad, unit)
        b = v_old.clone().requires_grad_(True)
        nft_loss(b, v_old, v, r, beta).sum().backward()
        torch.testing.assert_close(b.grad, beta * unit)


# ----------------------------------------------------------------------------------------------------- the stage
def _stage(tiny_corpus, out, *extra: str):
    overrides = (
        "stage=nft",
        "stage.reward={_target_: test_nft_official.LumaReward}",
        "stage.group_size=2",
        "stage.rollout_steps=1",
        *extra,
    )
    cfg = compose(train_overrides(tiny_corpus, *overrides, budget=256), out)
    model, dm, _ = build(cfg)
    model.configure_model()
    # The untrained tiny backbone predicts the same x̂0 for every x_t (flat groups, zero loss): perturb it so
    # rollouts depend on their noise, then rebuild the old policy and the reference from it.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model._old[0] = None
    model._ref[0] = None
    model.configure_model()
    dm.setup("fit")
    return model, next(iter(dm.train_dataloader()))


@pytest.fixture(scope="module")
def official_stage(tiny_corpus, tmp_path_factory):
    return _stage(tiny_corpus, tmp_path_factory.mktemp("nft_official"), "stage.nft.form=official")


def _grads(model, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss, parts = model.nft_step(batch)
    loss.backward()
    grads = [p.grad.flatten() for p in model.backbone.parameters() if p.grad is not None]
    return torch.cat(grads), parts["logs"]


@pytest.mark.parametrize("form", ["report", "official"])
def test_stage_step_gradient_does_not_depend_on_beta(official_stage, form) -> None:
    """First step (policy = old policy = reference): the same parameter gradient for β = 1 and β = 0.2."""
    model, batch = official_stage
    model.nft_form = form
    try:
        model.nft_beta = 1.0
        g1, logs = _grads(model, batch)
        model.nft_beta = 0.2
        g2, _ = _grads(model, batch)
    finally:
        model.nft_form, model.nft_beta = "official", 1.0
    assert logs["nft/r_std"] > 0 and g1.norm() > 0  # a real signal, not two zero gradients
    torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-6 * float(g1.abs().max()))


def test_kl_reference_is_a_frozen_copy_built_only_when_used(official_stage, tiny_corpus, tmp_path) -> None:
    model, _ = official_stage
    ref = model.reference
    assert ref is not None and model.uses_reference and model.kl_weight == pytest.approx(1e-4)
    assert not any(p.requires_grad for p in ref.parameters())
    assert not any(k.startswith(("_ref", "reference")) for k in model.state_dict())
    for (n, p), (_, q) in zip(model.backbone.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n  # the initial weights (perturbed before it was built)
    report, _ = _stage(tiny_corpus, tmp_path / "report")
    assert report.nft_form == "report" and report.reference is None
    no_kl, _ = _stage(tiny_corpus, tmp_path / "nokl", "stage.nft.form=official", "stage.nft.kl_weight=0")
    assert no_kl.reference is None and not no_kl.uses_reference


def test_kl_term_is_added_to_the_loss_and_logged(official_stage) -> None:
    model, batch = official_stage
    saved = [p.detach().clone() for p in model.backbone.parameters()]
    try:
        with torch.no_grad():  # the policy leaves the reference (the old policy stays where it was)
            gen = torch.Generator().manual_seed(1)
            for p in model.backbone.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        with torch.no_grad():
            model.kl_weight = 0.5
            with_kl, parts = model.nft_step(batch)
            model.kl_weight = 0.0  # uses_reference off: the same step without the KL term
            without, _ = model.nft_step(batch)
    finally:
        model.kl_weight = 1e-4
        with torch.no_grad():
            for p, s in zip(model.backbone.parameters(), saved):
                p.copy_(s)
    kl = parts["logs"]["nft/kl"]
    assert kl > 0 and parts["logs"]["nft/old_kl"] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(with_kl, without + 0.5 * kl)


def test_checkpoint_records_the_reference_and_refuses_another(official_stage) -> None:
    model, _ = official_stage
    ckpt = {"state_dict": {}}
    model.on_save_checkpoint(ckpt)
    assert ckpt["nft_reference_fingerprint"] == pytest.approx(model._reference_fingerprint)
    ckpt["nft_reference_fingerprint"] *= 1.01
    ckpt.pop("nft_old_policy")
    with pytest.raises(RuntimeError, match=r"KL reference rebuilt from stage\.init_from differs"):
        model.on_load_checkpoint(ckpt)


def test_unknown_nft_option_is_refused(tiny_corpus, tmp_path) -> None:
    with pytest.raises(Exception, match="unknown keys"):
        _stage(tiny_corpus, tmp_path, "+stage.nft.kl=1")
    with pytest.raises(Exception, match="form must be one of"):
        _stage(tiny_corpus, tmp_path, "stage.nft.form=paper")


# ------------------------------------------------------------------------------------------ under FSDP2 (slow)
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1200)
def test_kl_reference_is_a_sharded_twin_of_the_initial_weights_under_fsdp2(
    tiny_corpus, tmp_path, monkeypatch
) -> None:
    """2-rank fsdp2, official form with a KL weight: each rank's loss (KL included) equals a single-process step on
    the same weights and batch with the deep-copied reference, at step 1 (policy = reference) and step 2 (the
    policy has moved, the sharded reference kept the init_from weights: KL > 0)."""
    import test_strategies_multiprocess as mp

    official = ("stage.nft.form=official", "stage.nft.kl_weight=0.5")
    monkeypatch.setitem(mp.RL_STAGES, "nft", (*mp.RL_STAGES["nft"], *official))
    init = mp._perturbed_init(tmp_path / "init.ckpt")
    run = tmp_path / "run"
    proc = mp.launch(run, mp._rl_overrides("nft", tiny_corpus, init, 2), "--dump-batches")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NFT: sharded KL reference built from the initial backbone" in proc.stdout + proc.stderr
    rec = mp.records(run)
    for g in (0, 1):
        want = mp._single_process_step("nft", tiny_corpus, init, run, g)
        for rank in (0, 1):
            got = rec[(g + 1, rank)]
            assert got["loss"] == pytest.approx(want[rank]["loss"], rel=1e-4, abs=1e-6), (g, rank)
    assert rec[(1, 0)]["metrics"]["nft/kl"] == pytest.approx(0.0, abs=1e-10)
    assert rec[(2, 0)]["metrics"]["nft/kl"] > 0
