"""FireEdit's region-aware backbone options (issue 10): region tokens, TATI, HVCA.

* off (the default) builds nothing: same state dict keys and bit-identical outputs as the plain backbone;
* TATI and HVCA on, freshly built, equal "off" bitwise (zero-initialised), and still receive gradients;
* region tokens change the prediction when the boxes change, gradients reach their projection, and a
  sample's prediction does not depend on the other samples' boxes or text padding;
* the stage passes the batch's ``object_boxes`` through ``flow_loss`` and ``generate``; exports keep the
  options' (EMA) weights; each option composes from Hydra and trains under ``fast_dev_run``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_TRANSFORMER, compose, train_overrides
from rededit.models.backbone import EditBackbone
from rededit.models.fireedit import append_tokens, normalize_boxes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPTIONS = ("region_tokens", "tati", "hvca")
BOX = torch.tensor([[0.1, 0.2, 0.6, 0.7]])


def build(**kw) -> EditBackbone:
    torch.manual_seed(0)
    return EditBackbone(transformer_config=dict(TINY_TRANSFORMER), **kw)


def inputs(b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    ref = torch.randn(b, 4, 8, 8, generator=g)
    sigma = torch.linspace(0.2, 0.9, b)
    text = torch.randn(b, 5, 32, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False  # sample 0 is padded
    return x, [ref], sigma, text, mask


@pytest.fixture(scope="module")
def plain() -> EditBackbone:
    return build()


def test_off_builds_nothing(plain) -> None:
    off = build(region_tokens=False, tati=False, hvca=False)
    assert off.fireedit == dict.fromkeys(OPTIONS, False)
    assert list(off.state_dict()) == list(plain.state_dict())
    assert all(
        not (blk._forward_hooks or blk._forward_pre_hooks) for blk in off.transformer.transformer_blocks
    )
    off.load_state_dict(plain.state_dict(), strict=True)
    args = inputs()
    # regions given to a backbone without region tokens are ignored
    assert torch.equal(off(*args, regions=[BOX, None]), plain(*args))


@pytest.mark.parametrize("option", OPTIONS)
def test_on_adds_only_its_own_parameters(plain, option) -> None:
    on = build(**{option: True})
    missing, unexpected = on.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(f"{option}.") for k in missing)


@pytest.mark.parametrize("option", ["tati", "hvca"])
@pytest.mark.parametrize("with_refs", [True, False])
def test_zero_init_equals_off_and_trains(plain, option, with_refs) -> None:
    on = build(**{option: True})
    on.load_state_dict(plain.state_dict(), strict=False)
    x, refs, sigma, text, mask = inputs()
    refs = refs if with_refs else []
    out = on(x, refs, sigma, text, mask)
    assert torch.equal(out, plain(x, refs, sigma, text, mask))
    if not with_refs:
        return
    out.pow(2).mean().backward()
    last = on.tati.mlp[-1] if option == "tati" else on.hvca.layers[0].to_out
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0, (
        "zero-init layer gets no gradient"
    )


def test_tati_gate_is_time_dependent_once_trained() -> None:
    on = build(tati=True)
    sig = torch.tensor([0.1, 0.9])
    assert torch.equal(on.tati.gate(sig), torch.ones(2, 32))
    torch.nn.init.normal_(on.tati.mlp[-1].weight)
    g = on.tati.gate(sig)
    assert ((g > 0) & (g < 2)).all() and not torch.allclose(g[0], g[1])


def test_hvca_layers_act_and_copies_are_independent(plain) -> None:
    on = build(hvca={"every": 1, "scales": [1, 2, 4]})
    on.load_state_dict(plain.state_dict(), strict=False)
    assert len(on.hvca.layers) == len(on.transformer.transformer_blocks)
    args = inputs()
    base = on(*args)
    twin = copy.deepcopy(on)  # DPO/NFT reference copies: the copy's hooks must use the copy's HVCA
    torch.nn.init.normal_(twin.hvca.layers[1].to_out.weight, std=0.1)
    assert not torch.allclose(twin(*args), base)
    assert torch.equal(on(*args), base)


def test_hvca_under_gradient_checkpointing(plain) -> None:
    """The context travels in the block arguments, so recomputed blocks see it: same output and gradients."""
    runs = []
    for ckpt in (False, True):
        on = build(hvca={"every": 1}, gradient_checkpointing=ckpt)
        on.load_state_dict(plain.state_dict(), strict=False)
        for layer in on.hvca.layers:
            torch.nn.init.normal_(layer.to_out.weight, std=0.1, generator=torch.Generator().manual_seed(3))
        on.train()
        out = on(*inputs())
        out.pow(2).mean().backward()
        runs.append(
            (out.detach(), {n: p.grad.clone() for n, p in on.named_parameters() if p.grad is not None})
        )
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("hvca.") for k in grads_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_region_tokens_follow_the_boxes(plain) -> None:
    on = build(region_tokens=True)
    on.load_state_dict(plain.state_dict(), strict=False)
    args = inputs()
    # no box anywhere: nothing is appended, the plain prediction
    assert torch.equal(on(*args, regions=[None, None]), plain(*args))
    a = on(*args, regions=[BOX, BOX])
    b = on(*args, regions=[BOX, torch.tensor([[0.5, 0.5, 0.9, 0.9]])])
    assert not torch.allclose(a[1], b[1]), "moving a box does not change the prediction"
    assert torch.allclose(a[0], b[0], atol=1e-6), "another sample's box changed this sample"
    a[1].pow(2).mean().backward()
    assert on.region_tokens.proj[0].weight.grad.abs().sum() > 0
    assert on.region_tokens.type_embedding.grad.abs().sum() > 0


def test_region_tokens_are_padding_invariant(plain) -> None:
    on = build(region_tokens=True)
    x, refs, sigma, text, mask = inputs(b=3)
    regions = [BOX, torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.3, 0.3, 1.0, 1.0]]), None]
    batch = on(x, refs, sigma, text, mask, regions=regions)
    for i in range(3):
        n = int(mask[i].sum())
        single = on(
            x[i : i + 1],
            [refs[0][i : i + 1]],
            sigma[i : i + 1],
            text[i : i + 1, :n],
            None,
            regions=[regions[i]],
        )
        assert torch.allclose(single, batch[i : i + 1], atol=1e-5), f"sample {i} depends on its batch"


def test_append_tokens_puts_valid_tokens_first() -> None:
    text = torch.arange(4.0).reshape(1, 4, 1)
    seq, mask = append_tokens(
        text,
        torch.tensor([[True, True, False, False]]),
        torch.tensor([[[9.0], [8.0]]]),
        torch.tensor([[True, False]]),
    )
    assert seq.flatten().tolist() == [0.0, 1.0, 9.0, 2.0, 3.0, 8.0]
    assert mask.flatten().tolist() == [True, True, True, False, False, False]


def test_normalize_boxes_checks_shapes() -> None:
    out = normalize_boxes([torch.tensor([[8.0, 16.0, 32.0, 64.0]]), None, torch.zeros(0)], (64, 32))
    assert (
        torch.allclose(out[0], torch.tensor([[0.25, 0.25, 1.0, 1.0]])) and out[1] is None and out[2] is None
    )
    with pytest.raises(ValueError, match="sample 0"):
        normalize_boxes([torch.zeros(2, 3)], (8, 8))


# ----------------------------------------------------------------------------------------- stage wiring
def _stage(tmp_path, *overrides: str):
    from hydra.utils import instantiate

    cfg = compose(["backbone.transformer_config.num_layers=2", *overrides], tmp_path)
    torch.manual_seed(0)
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()
    # The tiny preset zero-initialises proj_out (prediction = Picture 1): give it weights so inputs matter.
    torch.nn.init.normal_(stage.backbone.transformer.proj_out.weight, std=0.1)
    return stage, cfg


ALL_ON = ("backbone.region_tokens=true", "backbone.tati=true", "backbone.hvca=true")


@pytest.fixture(scope="module")
def stage_on(tmp_path_factory):
    """A 2-block stage with all three options on (TATI/HVCA at zero init do not block region-token grads)."""
    return _stage(tmp_path_factory.mktemp("stage_on"), *ALL_ON)


def _batch(stage, boxes):
    g = torch.Generator().manual_seed(0)
    return {
        "target": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "references": [torch.rand(2, 3, 32, 32, generator=g) * 2 - 1],
        "text_emb": torch.randn(2, 4, 384, generator=g),
        "text_mask": torch.ones(2, 4, dtype=torch.bool),
        "object_boxes": boxes,
        "epoch": 0,
        "step": 0,
        "ids": ["a", "b"],
    }


def test_stage_passes_boxes_to_the_backbone(stage_on) -> None:
    stage, _ = stage_on
    stage.backbone.zero_grad()
    with_boxes = _batch(
        stage, [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([[8.0, 8.0, 32.0, 24.0]])]
    )
    loss, _ = stage.flow_loss(with_boxes)
    loss.mean().backward()
    assert stage.backbone.region_tokens.proj[0].weight.grad.abs().sum() > 0
    moved = _batch(stage, [torch.tensor([[16.0, 16.0, 32.0, 32.0]]), torch.tensor([[8.0, 8.0, 32.0, 24.0]])])
    assert not torch.allclose(stage.flow_loss(moved)[0][0], loss[0].detach())


def test_generate_uses_object_boxes(stage_on) -> None:
    stage, _ = stage_on

    class Enc(torch.nn.Module):  # a fixed text encoder: generate() encodes the instruction
        def encode(self, texts, images=None):
            return torch.ones(len(texts), 3, 384), torch.ones(len(texts), 3, dtype=torch.bool)

    previous, stage._text_encoder = stage._text_encoder, [Enc()]
    refs = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    kw = dict(height=32, width=32, steps=2, cfg_scale=1.0)
    none = stage.generate(refs, ["x"], **kw)
    a = stage.generate(refs, ["x"], object_boxes=[torch.tensor([[0.0, 0.0, 16.0, 16.0]])], **kw)
    b = stage.generate(refs, ["x"], object_boxes=[torch.tensor([[16.0, 16.0, 32.0, 32.0]])], **kw)
    assert not torch.allclose(a, b) and not torch.allclose(a, none)
    assert stage.backbone._context_regions is None
    stage._text_encoder = previous


def test_export_keeps_option_weights(stage_on, tmp_path) -> None:
    from rededit.inference.editor import load_editor
    from rededit.stages.checkpoints import EXPORT_EXTRAS, export_editor, load_backbone_state

    stage, cfg = stage_on
    ema = {
        k: v + 0.5 if not k.startswith("transformer.") else v.clone()
        for k, v in stage.backbone.state_dict().items()
    }
    out = export_editor(
        stage.backbone, tmp_path / "export", config_yaml=OmegaConf.to_yaml(cfg, resolve=True), ema_state=ema
    )
    assert (out / EXPORT_EXTRAS).is_file()
    state, weights = load_backbone_state(out)
    assert weights == "ema" and torch.equal(state["tati.mlp.2.bias"], ema["tati.mlp.2.bias"])
    editor = load_editor(out)
    for k, v in editor.backbone.state_dict().items():
        assert torch.allclose(v, ema[k]), k
    raw = load_editor(out, raw=True)
    assert torch.equal(
        raw.backbone.state_dict()["tati.mlp.2.bias"], stage.backbone.state_dict()["tati.mlp.2.bias"]
    )


# ----------------------------------------------------------------------------------------- Hydra
@pytest.mark.parametrize("preset", ["tiny", "small", "qwen_image"])
def test_presets_default_off(preset, tmp_path) -> None:
    cfg = compose([f"backbone={preset}"], tmp_path)
    assert all(cfg.backbone[o] is False for o in OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
def test_option_composes(option, tmp_path) -> None:
    from hydra.utils import instantiate

    cfg = compose([f"backbone.{option}=true", "backbone.transformer_config.num_layers=2"], tmp_path)
    backbone = instantiate(cfg.backbone)(latent_channels=48)
    assert backbone.fireedit == {o: o == option for o in OPTIONS}


def test_study_variant_selects_one_option(tmp_path) -> None:
    cfg = compose(["+ablation=fireedit", "experiment=ablation_cpu"], tmp_path)
    for variant in ("baseline", *OPTIONS):  # the switches are interpolations of the swept variant
        cfg.ablation.variant = variant
        on = {o for o in OPTIONS if cfg.backbone[o]}
        assert on == (set() if variant == "baseline" else {variant})


def test_fast_dev_run_with_all_options(tiny_corpus, tmp_path, monkeypatch) -> None:
    from rededit.models.fireedit import RegionTokens
    from rededit.train import run

    boxes_seen = []
    original = RegionTokens.forward

    def spy(self, source, regions, batch_size):
        boxes_seen.append(sum(r is not None for r in regions))
        return original(self, source, regions, batch_size)

    monkeypatch.setattr(RegionTokens, "forward", spy)
    cfg = compose(
        train_overrides(
            tiny_corpus,
            "backbone.region_tokens=true",
            "backbone.tati=true",
            "backbone.hvca={every:1}",
            "debug=fast_dev_run",
        ),
        tmp_path,
    )
    metrics = run(cfg)["metrics"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert sum(boxes_seen) > 0, "the corpus's object_boxes never reached the region tokens"


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
def test_fast_dev_run_each_option(option, tiny_corpus, tmp_path) -> None:
    from rededit.train import run

    cfg = compose(train_overrides(tiny_corpus, f"backbone.{option}=true", "debug=fast_dev_run"), tmp_path)
    assert torch.isfinite(torch.tensor(run(cfg)["metrics"]["train/loss"]))
