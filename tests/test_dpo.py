"""DPO (report §3.6.1, eq. 2): the pure loss against Diffusion-DPO, and DPOModule on the tiny corpus.

* ω = 1, λ = 0 equals the Diffusion-DPO reference code's formula (``inside = −0.5·β_code·(model_diff −
  ref_diff)``) with β_code = 2β, written out independently here.
* Policy = reference gives log 2; the gradient ratio between the win and lose errors is −ω; λ adds exactly
  λ to ∂/∂L_w.
* DPOModule: win and lose share ε and σ; a 2-step run on pairs with a `rejected` column logs every
  ``dpo/*`` key each step, trains the policy and leaves the frozen reference (outside the state dict)
  untouched; rows without a pair are refused under ``missing_rejected=error``.
"""

from __future__ import annotations

import math

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import compose, read_step_metric, train_overrides
from rededit.losses import dpo_loss, dpo_stats
from rededit.train import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _errors(b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, generator=g) * 0.5 + 0.1 for _ in range(4)]


def test_standard_diffusion_dpo_at_omega_one_lambda_zero() -> None:
    lw, ll, rw, rl = _errors()
    beta = 37.0
    # Diffusion-DPO reference code: model_diff = L_w − L_l, ref_diff = R_w − R_l,
    # inside = −0.5·β_code·(model_diff − ref_diff), loss = −logsigmoid(inside).
    beta_code = 2 * beta
    inside = -0.5 * beta_code * ((lw - ll) - (rw - rl))
    want = -F.logsigmoid(inside)
    got = dpo_loss(lw, ll, rw, rl, beta)
    torch.testing.assert_close(got, want)
    assert got.shape == (6,)


def test_log2_when_policy_equals_reference() -> None:
    lw, ll, _, _ = _errors()
    got = dpo_loss(lw, ll, lw.clone(), ll.clone(), beta=1000.0, omega=3.0)
    torch.testing.assert_close(got, torch.full_like(lw, math.log(2)))


@pytest.mark.parametrize("omega", [1.0, 2.0, 5.0])
def test_gradient_ratio_win_over_lose_is_minus_omega(omega) -> None:
    lw, ll, rw, rl = _errors(seed=1)
    lw.requires_grad_(True)
    ll.requires_grad_(True)
    dpo_loss(lw, ll, rw, rl, beta=3.0, omega=omega).sum().backward()
    torch.testing.assert_close(lw.grad / ll.grad, torch.full_like(lw, -omega))
    # Direction: lowering the win error and raising the lose error both lower the loss.
    assert (lw.grad > 0).all() and (ll.grad < 0).all()


def test_lambda_adds_sft_term() -> None:
    lw, ll, rw, rl = _errors(seed=2)
    base = dpo_loss(lw, ll, rw, rl, beta=5.0, omega=2.0)
    torch.testing.assert_close(dpo_loss(lw, ll, rw, rl, beta=5.0, omega=2.0, lam=0.3), base + 0.3 * lw)
    a = lw.clone().requires_grad_(True)
    b = lw.clone().requires_grad_(True)
    dpo_loss(a, ll, rw, rl, beta=5.0, omega=2.0, lam=0.3).sum().backward()
    dpo_loss(b, ll, rw, rl, beta=5.0, omega=2.0).sum().backward()
    torch.testing.assert_close(a.grad - b.grad, torch.full_like(lw, 0.3))


def test_reference_is_not_differentiated_and_shapes_are_checked() -> None:
    lw, ll, rw, rl = _errors()
    rw.requires_grad_(True)
    dpo_loss(lw, ll, rw, rl, beta=1.0).sum().backward() if lw.requires_grad else None
    assert rw.grad is None
    with pytest.raises(ValueError, match="ref_loss_l"):
        dpo_loss(lw, ll, rw, rl[:3], beta=1.0)


def test_stats_margin_and_accuracy() -> None:
    lw = torch.tensor([0.1, 0.5])
    ll = torch.tensor([0.5, 0.1])
    ref = torch.tensor([0.3, 0.3])
    s = dpo_stats(lw, ll, ref, ref, beta=2.0)
    torch.testing.assert_close(s["win_diff"], torch.tensor(0.0))  # (−0.2 + 0.2) / 2
    torch.testing.assert_close(s["reward_margin"], torch.tensor(0.0))  # (0.8 − 0.8) / 2
    assert float(s["implicit_acc"]) == 0.5


# ---------------------------------------------------------------------------------------------- stage
@pytest.fixture(scope="module")
def pair_manifest(tiny_corpus, tmp_path_factory):
    """The tiny corpus with a `rejected` column: each row's Picture 1 when it has the target's size (a
    no-op edit, the classic negative), else the target flipped left-right."""
    from PIL import Image

    root = tiny_corpus.parent
    table = pq.read_table(tiny_corpus)
    rows = table.to_pylist()
    out_dir = tmp_path_factory.mktemp("pairs")
    rejected = []
    for row in rows:
        target = Image.open(root / row["target"]).convert("RGB")
        src = Image.open(root / row["references"][0]).convert("RGB") if row["references"] else None
        neg = src if src is not None and src.size == target.size else target.transpose(Image.FLIP_LEFT_RIGHT)
        path = out_dir / f"{row['id']}_rejected.png"
        neg.save(path)
        rejected.append(str(path))
    import pyarrow as pa

    col = pa.array(rejected, pa.string())
    if "rejected" in table.column_names:  # the synth writer emits every optional column (null here)
        table = table.set_column(table.column_names.index("rejected"), pa.field("rejected", pa.string()), col)
    else:
        table = table.append_column(pa.field("rejected", pa.string()), col)
    out = root / "manifest_pairs.parquet"
    pq.write_table(table, out)
    return out


def test_win_and_lose_share_noise_and_sigma(pair_manifest, tmp_path) -> None:
    cfg = compose(train_overrides(pair_manifest, "stage=dpo", "data.allow_outside_root=true"), tmp_path)
    model, dm, _ = build(cfg)
    model.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["has_rejected"].all() and batch["rejected"].shape == batch["target"].shape
    seen = []
    orig = model.backbone.forward

    def spy(x_t, refs, sigma, *a, **k):
        seen.append((x_t.detach().clone(), sigma.detach().clone()))
        return orig(x_t, refs, sigma, *a, **k)

    model.backbone.forward = spy
    p = model.pair_losses(batch)
    (x_t, sigma), b = seen[0], len(batch["ids"])
    assert x_t.shape[0] == 2 * b
    torch.testing.assert_close(sigma[:b], sigma[b:])
    x_w, _ = model.encode_images(batch)
    x_l = model.vae.encode(batch["rejected"]).float()
    s = sigma[:b].view(-1, 1, 1, 1)
    # Same ε: x_t^w − (1−σ) x_w == x_t^l − (1−σ) x_l.
    torch.testing.assert_close(x_t[:b] - (1 - s) * x_w, x_t[b:] - (1 - s) * x_l, atol=1e-5, rtol=1e-5)
    assert not p["online"].any()
    # Policy = reference at the start: the errors agree.
    torch.testing.assert_close(p["loss_w"], p["ref_loss_w"])
    # Rows without a pair: refused by name under `error`, sampled from the reference otherwise.
    unpaired = {k: v for k, v in batch.items() if k not in ("rejected", "has_rejected")}
    model.missing_rejected = "error"
    with pytest.raises(ValueError, match="without a `rejected` image"):
        model.compute_loss(unpaired)
    model.missing_rejected = "reference_sample"
    x_l_online, online = model.encode_rejected(
        unpaired, x_w, *model.encode_images(batch)[1:], *model.text_condition(batch)
    )
    assert online.all() and x_l_online.shape == x_w.shape and torch.isfinite(x_l_online).all()


@pytest.fixture(scope="module")
def dpo_run(pair_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_run")
    overrides = ("stage=dpo", "stage.omega=2.0", "stage.lam=0.1", "stage.warmup_steps=0")
    cfg = compose(train_overrides(pair_manifest, *overrides, "data.allow_outside_root=true"), out)
    L.seed_everything(cfg.seed)
    model, dm, trainer = build(cfg)
    model.configure_model()
    ref_before = {k: v.clone() for k, v in model.reference.state_dict().items()}
    init = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer.fit(model, datamodule=dm)
    return out, cfg, model, trainer, ref_before, init


def test_dpo_trains_policy_keeps_reference_and_logs(dpo_run) -> None:
    out, _, model, trainer, ref_before, init = dpo_run
    assert trainer.global_step == 2
    for key in ("win_diff", "lose_diff", "ref_loss_w", "ref_loss_l", "implicit_acc", "reward_margin"):
        assert sorted(read_step_metric(out, f"dpo/{key}_step")) == [1, 2], key
    assert read_step_metric(out, "dpo/online_negative_frac_step") == {1: 0.0, 2: 0.0}
    assert all(torch.equal(v, ref_before[k]) for k, v in model.reference.state_dict().items())
    assert any(not torch.equal(v, init[k]) for k, v in model.backbone.state_dict().items())
    assert not any("reference" in k for k in model.state_dict())
    # Step 1: policy = reference, so the DPO part is log 2 and the SFT term adds λ·L_w.
    assert read_step_metric(out, "dpo/win_diff_step")[1] == pytest.approx(0.0, abs=1e-6)
    loss_w = read_step_metric(out, "dpo/loss_w_step")[1]
    assert read_step_metric(out)[1] == pytest.approx(math.log(2) + 0.1 * loss_w, rel=1e-5)
    # Step 2: the policy moved, so the diffs are no longer 0.
    assert read_step_metric(out, "dpo/win_diff_step")[2] != 0.0


def test_dpo_checkpoint_has_no_reference_but_checks_its_fingerprint(dpo_run) -> None:
    out, cfg, *_ = dpo_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["dpo_reference_fingerprint"] is not None
    assert not any("reference" in k for k in ckpt["state_dict"])
    L.seed_everything(cfg.seed)  # as rededit.train.run does: the same initial weights are rebuilt
    model, _, _ = build(cfg)
    model.on_load_checkpoint(ckpt)
    ckpt["dpo_reference_fingerprint"] += 1.0
    with pytest.raises(RuntimeError, match="reference"):
        build(cfg)[0].on_load_checkpoint(ckpt)


def test_pair_losses_pass_the_region_boxes_to_policy_and_reference(pair_manifest, tmp_path) -> None:
    """With backbone region tokens, DPO's forwards see the batch's boxes as training does (twice: win, lose)."""
    cfg = compose(
        train_overrides(
            pair_manifest, "stage=dpo", "data.allow_outside_root=true", "backbone.region_tokens=true"
        ),
        tmp_path,
    )
    model, dm, _ = build(cfg)
    model.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.get("object_boxes") is not None
    seen: dict[str, list] = {"policy": [], "reference": []}
    for name, module in (("policy", model.backbone), ("reference", model.reference)):
        orig = module.forward

        def spy(*a, _orig=orig, _name=name, **k):
            seen[_name].append(k.get("regions"))
            return _orig(*a, **k)

        module.forward = spy
    model.pair_losses(batch)
    b = len(batch["ids"])
    want = model.backbone.batch_regions(batch)
    for name in ("policy", "reference"):
        (regions,) = seen[name]
        assert regions is not None and len(regions) == 2 * b, name
        for got, w in zip(regions, [*want, *want]):
            assert (got is None) == (w is None) and (w is None or torch.equal(got, w))
