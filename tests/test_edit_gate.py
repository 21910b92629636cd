"""The edit gate and its localisation loss (issue 15, :mod:`rededit.models.edit_gate`).

* off (the default) builds nothing: same state dict, no hook, bit-identical outputs;
* on, a fresh tiny backbone starts at exactly "return Picture 1" (the ungated output, bit for bit);
* the gate multiplies the change Δ: x̂0 − z_ref1 = sigmoid(g)·Δ (½ at init, → 0 for a closed gate); T2I rows and
  ``{gate: false}`` keep the ungated output;
* ``stage.weighting.mask_loss``: nothing changes at λ = 0; at λ > 0 the per-sample loss grows by λ·(G2) on
  samples with a real mask only, gradients reach the head and the transformer, and (G2) decreases when trained;
* an export with the gate reloads (``load_editor``) and predicts identically; training logs ``train/mask_loss``.
"""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from conftest import compose, read_step_metric, train_overrides
from rededit.flow.weighting import loss_weight
from rededit.models.backbone import EditBackbone
from rededit.models.edit_gate import mask_loss, mask_targets
from test_fireedit_options import build as build_tiny
from test_fireedit_options import inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def build(**kw) -> EditBackbone:
    """The FireEdit tests' tiny backbone, in the x0 + source-residual mode the gate needs."""
    return build_tiny(**{"prediction": "x0", "source_residual": True, "zero_init_output": True, **kw})


def x0_of(backbone: EditBackbone, args) -> torch.Tensor:
    x, refs, sigma, text, mask = args
    return backbone.predicted_x0(x, backbone(x, refs, sigma, text, mask), sigma)


def trained_pair(**gate) -> tuple[EditBackbone, EditBackbone]:
    """(plain, gated) sharing one transformer whose ``proj_out`` is no longer zero (Δ ≠ 0)."""
    plain = build()
    torch.nn.init.normal_(plain.transformer.proj_out.weight, std=0.2)
    gated = build(edit_gate=gate or True)
    gated.load_state_dict(plain.state_dict(), strict=False)
    return plain, gated


def assert_off_builds_nothing(option: str, hooked: str) -> EditBackbone:
    """``option=False`` builds nothing: no attribute, the plain state dict, bit-identical outputs (with a
    non-zero output layer) and no hook left on ``transformer.<hooked>``; returns the backbone built off."""
    plain, off = build(), build(**{option: False})
    assert getattr(off, option) is None and list(off.state_dict()) == list(plain.state_dict())
    torch.nn.init.normal_(plain.transformer.proj_out.weight, std=0.2)
    off.load_state_dict(plain.state_dict(), strict=True)
    args = inputs()
    assert torch.equal(off(*args), plain(*args))
    assert not getattr(off.transformer, hooked)._forward_hooks
    return off


def test_off_builds_nothing() -> None:
    assert assert_off_builds_nothing("edit_gate", "norm_out").last_gate_logits is None


def test_on_adds_only_its_head_and_starts_from_picture_1() -> None:
    plain, on = build(), build(edit_gate=True)
    missing, unexpected = on.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["edit_gate.head.bias", "edit_gate.head.weight"]
    args = inputs()
    assert torch.equal(on(*args), plain(*args))  # Δ = 0 at init, whatever the gate
    assert torch.allclose(x0_of(on, args), args[1][0], atol=1e-5)
    assert on.last_gate_logits.shape == (2, 1, 8, 8)
    assert torch.equal(torch.sigmoid(on.last_gate_logits), torch.full((2, 1, 8, 8), 0.5))
    assert not on.transformer.norm_out._forward_hooks  # the capture hook lives for one call only


def test_gate_multiplies_the_change() -> None:
    plain, gated = trained_pair()
    args = inputs()
    ref = args[1][0]
    delta = x0_of(plain, args) - ref
    assert delta.abs().max() > 0.1
    torch.testing.assert_close(x0_of(gated, args) - ref, 0.5 * delta, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # a per-pixel gate: close the left half, open the right half
        gated.edit_gate.head.bias.zero_()
        gated.edit_gate.head.weight.zero_()
    logits = torch.full((2, 1, 8, 8), -30.0)
    logits[..., 4:] = 30.0
    torch.testing.assert_close(
        gated.edit_gate.composite(delta, logits)[..., :4], torch.zeros_like(delta[..., :4])
    )
    torch.testing.assert_close(gated.edit_gate.composite(delta, logits)[..., 4:], delta[..., 4:])
    with torch.no_grad():
        gated.edit_gate.head.bias.fill_(-30.0)  # closed everywhere: Picture 1 back
    torch.testing.assert_close(x0_of(gated, args), ref, atol=1e-5, rtol=1e-5)
    x, _, sigma, text, mask = args  # T2I: no Picture 1, no gate
    assert torch.equal(gated(x, [], sigma, text, mask), plain(x, [], sigma, text, mask))


def test_head_only_keeps_the_output_and_gives_logits() -> None:
    plain, head_only = trained_pair(gate=False)
    with torch.no_grad():
        head_only.edit_gate.head.weight.normal_()
    args = inputs()
    assert torch.equal(head_only(*args), plain(*args))
    assert head_only.last_gate_logits.std() > 0


def test_gate_needs_the_source_residual() -> None:
    with pytest.raises(ValueError, match="edit_gate needs"):
        build(source_residual=False, edit_gate=True)
    with pytest.raises(ValueError, match="edit_gate must be"):
        build(edit_gate="yes")


def test_mask_loss_is_bce_on_the_area_averaged_mask() -> None:
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :16, :16] = 1.0
    m = mask_targets(mask, (8, 8))
    assert m[0, 0, 0, 0] == 1 and m[0, 0, 7, 7] == 0 and m.shape == (2, 1, 8, 8)
    perfect = torch.where(m > 0.5, 20.0, -20.0)
    use = torch.tensor([True, False])
    loss = mask_loss(perfect, mask, use)
    assert loss[0] < 1e-6 and loss[1] == 0
    assert mask_loss(torch.zeros(2, 1, 8, 8), mask, use)[0] == pytest.approx(
        torch.log(torch.tensor(2.0)).item()
    )


def test_mask_loss_trains_the_head() -> None:
    """(G2) alone, a few Adam steps on one batch: it decreases and reaches the transformer."""
    _, gated = trained_pair()
    x, refs, sigma, text, tmask = inputs()
    edit = torch.zeros(2, 1, 64, 64)
    edit[0, :, 8:40, 16:48] = 1.0
    edit[1, :, 32:, :24] = 1.0
    use = torch.ones(2, dtype=torch.bool)
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        gated(x, refs, sigma, text, tmask)
        loss = mask_loss(gated.last_gate_logits, edit, use).mean()
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert gated.edit_gate.head.weight.grad.abs().sum() > 0
        losses.append(loss.item())
        opt.step()
    assert gated.transformer.transformer_blocks[0].img_mlp.net[0].proj.weight.grad.abs().sum() > 0
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------------------- stage wiring
def _stage(tmp_path, *overrides: str):
    from hydra.utils import instantiate

    cfg = compose(["backbone.transformer_config.num_layers=2", *overrides], tmp_path)
    torch.manual_seed(0)
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()
    torch.nn.init.normal_(stage.backbone.transformer.proj_out.weight, std=0.1)  # Δ ≠ 0
    return stage, cfg


def _batch():
    g = torch.Generator().manual_seed(0)
    edit = torch.zeros(3, 1, 32, 32)
    edit[0, :, :16, :16] = 1.0
    edit[1, :, 8:24, 8:24] = 1.0
    return {
        "target": torch.rand(3, 3, 32, 32, generator=g) * 2 - 1,
        "references": [torch.rand(3, 3, 32, 32, generator=g) * 2 - 1],
        "text_emb": torch.randn(3, 4, 384, generator=g),
        "text_mask": torch.ones(3, 4, dtype=torch.bool),
        "edit_mask": torch.where(torch.tensor([True, True, False]).reshape(3, 1, 1, 1), edit, 1.0),
        "has_edit_mask": torch.tensor([True, True, False]),  # sample 2: no mask (filled with ones by collate)
        "epoch": 0,
        "step": 0,
        "ids": ["a", "b", "c"],
    }


@pytest.fixture(scope="module")
def gate_stages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    on = _stage(tmp / "on", "backbone.edit_gate=true", "+stage.weighting.mask_loss=2.0")
    zero = _stage(tmp / "zero", "backbone.edit_gate=true")
    zero[0].backbone.load_state_dict(on[0].backbone.state_dict())
    return on, zero


def test_stage_mask_loss_off_at_lambda_0(gate_stages) -> None:
    (_, _), (zero, _) = gate_stages
    assert zero.mask_loss_weight == 0.0
    loss, parts = zero.flow_loss(_batch())
    assert "mask_loss" not in parts
    torch.testing.assert_close(loss.detach(), loss_weight(parts["sigma"], **zero.weighting) * parts["mse"])


def test_stage_adds_lambda_times_the_mask_loss(gate_stages) -> None:
    (on, _), (zero, _) = gate_stages
    on.backbone.zero_grad()
    loss, parts = on.flow_loss(_batch())
    base, _ = zero.flow_loss(_batch())
    assert parts["mask_loss"][2] == 0 and (parts["mask_loss"][:2] > 0).all()
    torch.testing.assert_close(loss.detach(), base + 2.0 * parts["mask_loss"])
    (loss - base.detach()).sum().backward()  # the mask term alone
    assert on.backbone.edit_gate.head.weight.grad.abs().sum() > 0


def test_stage_mask_loss_needs_a_gate(tmp_path) -> None:
    stage, _ = _stage(tmp_path, "+stage.weighting.mask_loss=1.0")
    with pytest.raises(ValueError, match=r"needs backbone\.edit_gate"):
        stage.flow_loss(_batch())


def assert_export_reloads(stage, cfg, option: str, override: str, tmp_path) -> None:
    """Export ``stage``'s backbone (built with ``override``) with random weights in its ``option.*`` part (an EMA
    state); the export reloads (``load_editor``) with the part built and predicts exactly as a freshly built
    backbone holding that state."""
    from rededit.inference.editor import load_editor
    from rededit.stages.checkpoints import EXPORT_EXTRAS, export_editor

    ema = {k: v.clone() for k, v in stage.backbone.state_dict().items()}
    for key in [k for k in ema if k.startswith(f"{option}.")]:
        ema[key] = torch.randn_like(ema[key])
    out = export_editor(
        stage.backbone, tmp_path / "export", config_yaml=OmegaConf.to_yaml(cfg, resolve=True), ema_state=ema
    )
    assert (out / EXPORT_EXTRAS).is_file()
    editor = load_editor(out)
    assert getattr(editor.backbone, option) is not None
    reference = _stage(tmp_path / "ref", override)
    reference[0].backbone.load_state_dict(ema, strict=True)
    g = torch.Generator().manual_seed(3)
    x, ref = torch.randn(2, 48, 8, 8, generator=g), torch.randn(2, 48, 8, 8, generator=g)
    text, sigma = torch.randn(2, 4, 384, generator=g), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert torch.equal(
            editor.backbone(x, [ref], sigma, text, None), reference[0].backbone(x, [ref], sigma, text, None)
        )
    raw = load_editor(out, raw=True).backbone.state_dict()
    own = {k: v for k, v in stage.backbone.state_dict().items() if k.startswith(f"{option}.")}
    assert own and all(torch.equal(raw[k], v) for k, v in own.items())


def test_export_with_the_gate_reloads_identically(gate_stages, tmp_path) -> None:
    (stage, cfg), _ = gate_stages
    assert_export_reloads(stage, cfg, "edit_gate", "backbone.edit_gate=true", tmp_path)


def test_training_logs_the_mask_loss(tiny_corpus, tmp_path) -> None:
    from rededit.train import run

    overrides = train_overrides(
        tiny_corpus, "backbone.edit_gate={gate:false}", "+stage.weighting.mask_loss=1.0"
    )
    cfg = compose([*overrides, "backbone.transformer_config.num_layers=1"], tmp_path)
    run(cfg)
    logged = read_step_metric(tmp_path, "train/mask_loss")
    assert logged and all(0 < v < 5 for v in logged.values())


def test_gate_split_trains_the_ungated_prediction_on_the_edited_pixels(gate_stages, tmp_path) -> None:
    """(G3): masked samples' flow term is the ungated prediction's error on their edited pixels only; the
    unmasked sample keeps the composite loss; the gate learns only from (G2)."""
    (on, _), _ = gate_stages
    split, _ = _stage(
        tmp_path,
        "backbone.edit_gate=true",
        "+stage.weighting.mask_loss=2.0",
        "+stage.weighting.gate_split=true",
    )
    split.backbone.load_state_dict(on.backbone.state_dict())
    batch = _batch()
    loss, parts = split.flow_loss(batch)
    base, _ = on.flow_loss(batch)
    w = loss_weight(parts["sigma"], **split.weighting)
    torch.testing.assert_close(loss[2], base[2])  # no mask: unchanged
    # by hand: z_ref1 + Δ against x0 on the mask, in velocity space
    bb = split.backbone
    x0_edit = bb.last_ungated_x0
    v_edit = bb.velocity_from_x0(parts["x_t"], x0_edit, parts["sigma"])
    v = bb.velocity_target(
        parts["x0"],
        (parts["x_t"] - (1 - parts["sigma"]).reshape(-1, 1, 1, 1) * parts["x0"])
        / parts["sigma"].reshape(-1, 1, 1, 1),
        parts["sigma"],
    )
    m = mask_targets(batch["edit_mask"], tuple(v.shape[-2:]))
    want = ((v_edit - v).pow(2).mean(1, keepdim=True) * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    torch.testing.assert_close(
        loss[:2], w[:2] * want[:2] + 2.0 * parts["mask_loss"][:2], rtol=1e-4, atol=1e-5
    )
    # pixels outside the mask do not reach the flow term: the gate head gets gradient from (G2) only
    split.backbone.zero_grad()
    want[:2].sum().backward()  # the flow term of the masked samples (equal to the stage's, checked above)
    assert (
        split.backbone.edit_gate.head.weight.grad is None
        or split.backbone.edit_gate.head.weight.grad.abs().max() == 0
    )
    with pytest.raises(InstantiationException, match=r"gate_split needs stage\.weighting\.mask_loss"):
        _stage(tmp_path / "bad", "backbone.edit_gate=true", "+stage.weighting.gate_split=true")
