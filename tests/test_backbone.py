"""EditBackbone: sequence building, masking invariance, zero_cond_t, x0 conversion, frozen tail, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_TRANSFORMER
from rededit.models.backbone import EditBackbone

TINY = TINY_TRANSFORMER
C, D = 4, 32


def _backbone(**kwargs) -> EditBackbone:
    torch.manual_seed(0)
    bb = EditBackbone(TINY, **kwargs)
    return bb.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(b: int = 2, refs: tuple[tuple[int, int], ...] = ((8, 8),), length: int = 5, seed: int = 0):
    g = _gen(seed)
    x = torch.randn(b, C, 8, 8, generator=g)
    references = [torch.randn(b, C, h, w, generator=g) for h, w in refs]
    sigma = torch.rand(b, generator=g)
    text = torch.randn(b, length, D, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    return x, references, sigma, text, mask


@pytest.mark.parametrize("refs", [(), ((8, 8),), ((8, 8), (4, 6))])
def test_forward_shapes_with_0_1_2_references(refs) -> None:
    bb = _backbone()
    x, references, sigma, text, mask = _inputs(refs=refs)
    v = bb(x, references, sigma, text, mask)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_latent_channel_mismatch_is_loud() -> None:
    with pytest.raises(ValueError, match="align conf/vae"):
        EditBackbone(TINY, latent_channels=48)
    cfg = {k: v for k, v in TINY.items() if k not in ("in_channels", "out_channels")}
    assert EditBackbone(cfg, latent_channels=4).latent_channels == 4


def test_batch_composition_and_padding_invariance() -> None:
    bb = _backbone()
    g = _gen(1)
    lengths = [3, 7, 5]
    b, max_len = len(lengths), max(lengths)
    x = torch.randn(b, C, 8, 8, generator=g)
    ref = torch.randn(b, C, 8, 8, generator=g)
    sigma = torch.rand(b, generator=g)
    text = torch.randn(b, max_len, D, generator=g)
    mask = torch.zeros(b, max_len, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        text[i, n:] = 100.0 * torch.randn(max_len - n, D, generator=g)  # garbage in padding must not leak
    with torch.no_grad():
        batched = bb(x, [ref], sigma, text, mask)
        for i, n in enumerate(lengths):
            alone = bb(
                x[i : i + 1], [ref[i : i + 1]], sigma[i : i + 1], text[i : i + 1, :n], mask[i : i + 1, :n]
            )
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        # The mask is really what protects the short samples: without it the padding changes them.
        unmasked = bb(x, [ref], sigma, text, None)
    assert (unmasked[0] - batched[0]).abs().max() > 1e-3


def test_references_and_text_influence_output() -> None:
    bb = _backbone()
    x, references, sigma, text, mask = _inputs()
    with torch.no_grad():
        v = bb(x, references, sigma, text, mask)
        v_ref = bb(x, [references[0] + 1.0], sigma, text, mask)
        v_txt = bb(x, references, sigma, text + 1.0, mask)
        v_sig = bb(x, references, sigma * 0.5, text, mask)
    for other in (v_ref, v_txt, v_sig):
        assert (other - v).abs().max() > 1e-4


def test_zero_cond_t_changes_output_only_when_enabled() -> None:
    bb = _backbone()
    x, references, sigma, text, mask = _inputs()
    with torch.no_grad():
        off = bb(x, references, sigma, text, mask)
        bb.set_zero_cond_t(True)
        on = bb(x, references, sigma, text, mask)
        # At σ = 0 target and references share the same conditioning, so the option is a no-op there.
        on0 = bb(x, references, torch.zeros(2), text, mask)
        bb.set_zero_cond_t(False)
        off_again = bb(x, references, sigma, text, mask)
        off0 = bb(x, references, torch.zeros(2), text, mask)
        # Without references there are no tokens to condition differently.
        no_ref_off = bb(x, [], sigma, text, mask)
        bb.set_zero_cond_t(True)
        no_ref_on = bb(x, [], sigma, text, mask)
    assert torch.equal(off, off_again)
    assert (on - off).abs().max() > 1e-4
    torch.testing.assert_close(on0, off0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(no_ref_on, no_ref_off, rtol=1e-5, atol=1e-6)
    # Constructor flag = runtime toggle (no parameters are involved).
    assert bb.transformer.config.zero_cond_t is True
    built_on = _backbone(zero_cond_t=True)
    with torch.no_grad():
        torch.testing.assert_close(built_on(x, references, sigma, text, mask), on)


def test_x0_prediction_conversion_closed_form() -> None:
    bb = _backbone()
    x, references, _, text, mask = _inputs()
    sigma = torch.tensor([0.5, 0.01])  # the second one is below x0_sigma_min
    with torch.no_grad():
        raw = bb(x, references, sigma, text, mask)  # v-mode returns the raw network output
        bb.prediction = "x0"
        v = bb(x, references, sigma, text, mask)
        v_zero = bb(x, references, torch.zeros(2), text, mask)
    denom = torch.tensor([0.5, bb.x0_sigma_min]).view(2, 1, 1, 1)
    torch.testing.assert_close(v, (x - raw) / denom)
    # Exact inversion above the floor: x_t − σ v = x̂0.
    torch.testing.assert_close(x[0] - 0.5 * v[0], raw[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(v_zero).all()
    # Below the floor the helpers stay consistent: x̂0 is recovered, the exact ODE velocity is (x − x̂0)/σ,
    # and the training target is zero-loss exactly at x̂0 = x0.
    torch.testing.assert_close(bb.predicted_x0(x, v, sigma), raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.exact_velocity(v, sigma), (x - raw) / sigma.view(2, 1, 1, 1))
    eps = (x - (1 - sigma.view(2, 1, 1, 1)) * raw) / sigma.view(
        2, 1, 1, 1
    )  # the ε that makes x = x_σ(raw, ε)
    torch.testing.assert_close(bb.velocity_target(raw, eps, sigma), v, rtol=1e-4, atol=1e-4)
    bb.prediction = "v"
    torch.testing.assert_close(bb.velocity_target(raw, eps, sigma), eps - raw)
    assert torch.equal(bb.exact_velocity(v, sigma), v)
    with pytest.raises(ValueError, match="prediction"):
        EditBackbone(TINY, prediction="eps")


def test_freeze_unused_text_tail_leaves_every_trainable_param_with_a_gradient() -> None:
    bb = _backbone()
    bb.train()
    x, references, sigma, text, mask = _inputs()
    # Before freezing: the listed tensors get no gradient or an exact zero (they cannot affect the loss).
    bb(x, references, sigma, text, mask).square().mean().backward()
    listed = set(bb.unused_text_tail_names())
    params = dict(bb.transformer.named_parameters())
    for name in listed:
        assert params[name].grad is None or not params[name].grad.any(), name
    assert any(params[n].grad is None for n in listed)
    bb.zero_grad(set_to_none=True)

    frozen = bb.freeze_unused_text_tail()
    assert set(frozen) == listed
    assert any(".attn.to_add_out." in n for n in frozen) and any(".txt_mlp." in n for n in frozen)
    bb(x, references, sigma, text, mask).square().mean().backward()
    for name, p in bb.transformer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.any(), f"{name} is trainable but got no gradient"
        else:
            assert p.grad is None
    # Frozen tensors stay in the state dict (checkpoints keep them).
    assert set(frozen) <= {k.removeprefix("transformer.") for k in bb.state_dict()}


def test_parameter_groups_decay_only_matrices() -> None:
    bb = _backbone()
    bb.freeze_unused_text_tail()
    groups = bb.trainable_parameter_groups(weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in bb.named_parameters()}
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert any(n.endswith("bias") for n in no_decay_names)
    assert any("norm_q" in n for n in no_decay_names)  # RMSNorm scales
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in bb.parameters() if p.requires_grad)
    torch.optim.AdamW(groups, lr=1e-3)  # valid optimizer groups


def test_gradient_checkpointing_gives_same_gradients() -> None:
    ref = _backbone()
    ckpt = copy.deepcopy(ref)
    ckpt.set_gradient_checkpointing(True)
    assert ckpt.transformer.gradient_checkpointing
    x, references, sigma, text, mask = _inputs(refs=((8, 8), (4, 6)))
    ref.train()
    ckpt.train()
    losses = []
    for model in (ref, ckpt):
        loss = model(x, references, sigma, text, mask).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads = dict(ckpt.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None
        else:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-7)


def test_rebuild_rope_keeps_outputs() -> None:
    bb = _backbone()
    x, references, sigma, text, mask = _inputs()
    with torch.no_grad():
        before = bb(x, references, sigma, text, mask)
        bb.rebuild_rope()
        after = bb(x, references, sigma, text, mask)
    assert torch.equal(before, after)


def test_presets_instantiate_consistently(tmp_path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    vae = instantiate(OmegaConf.load("conf/vae/pixel.yaml"))
    for preset in ("tiny", "small"):
        cfg = OmegaConf.load(f"conf/backbone/{preset}.yaml")
        build = instantiate(cfg)
        bb = build(latent_channels=vae.latent_channels)  # what the stage does in configure_model()
        z = vae.encode(torch.zeros(1, 3, 32, 32))
        v = bb(z, [z], torch.tensor([0.5]), torch.zeros(1, 3, 384), torch.ones(1, 3, dtype=torch.bool))
        assert v.shape == z.shape
    assert (
        2e6
        < sum(p.numel() for p in instantiate(OmegaConf.load("conf/backbone/tiny.yaml"))().parameters())
        < 8e6
    )

    # qwen_image: loads a local folder and checks the architecture it finds.
    cfg = OmegaConf.load("conf/backbone/qwen_image.yaml")
    assert OmegaConf.is_missing(cfg, "pretrained_path") and cfg.prediction == "v"
    _backbone().transformer.save_pretrained(tmp_path / "transformer")
    cfg.pretrained_path = str(tmp_path)
    cfg.torch_dtype = "float32"
    with pytest.raises(ValueError, match="num_layers"):
        instantiate(cfg)()
    cfg.expected_config = {"num_layers": 2, "axes_dims_rope": [4, 6, 6]}
    loaded = instantiate(cfg)()
    # zero_cond_t is the folder's (saved off here), not forced on by the preset (issue 19)
    assert not loaded.zero_cond_t and loaded.gradient_checkpointing
    ref = _backbone(zero_cond_t=False)
    x, references, sigma, text, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, references, sigma, text, mask), ref(x, references, sigma, text, mask)
        )


def test_zero_init_with_source_residual_starts_at_returning_picture_1() -> None:
    """A fresh tiny editor with zero_init_output + source_residual predicts x̂0 = Picture 1 (latents)."""
    bb = _backbone(prediction="x0", source_residual=True, zero_init_output=True)
    x_t, refs, sigma, emb, mask = _inputs(b=2, refs=((8, 8), (4, 6)))
    sigma = sigma.clamp_min(0.2)  # above x0_sigma_min the x0 ↔ v conversion is exact
    x0_hat = bb.predicted_x0(x_t, bb(x_t, refs, sigma, emb, mask), sigma)
    torch.testing.assert_close(x0_hat, refs[0], atol=1e-5, rtol=1e-5)
    # A Picture 1 of another shape is resized onto the target grid; with no reference the base is 0.
    small = [torch.randn(2, refs[0].shape[1], 4, 4)]
    x0_small = bb.predicted_x0(x_t, bb(x_t, small, sigma, emb, mask), sigma)
    torch.testing.assert_close(x0_small, EditBackbone.residual_base(small[0], (8, 8)), atol=1e-5, rtol=1e-5)
    x0_t2i = bb.predicted_x0(x_t, bb(x_t, [], sigma, emb, mask), sigma)
    torch.testing.assert_close(x0_t2i, torch.zeros_like(x_t), atol=1e-5, rtol=1e-5)
    # Zero-initialised output still trains: the final projection gets a gradient.
    bb(x_t, refs, sigma, emb, mask).pow(2).mean().backward()
    assert bb.transformer.proj_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="source_residual"):
        _backbone(prediction="v", source_residual=True)


def _variant_folder(root, zero_cond_t: bool):
    """A pipeline-shaped folder: model_index.json, transformer/ (tiny, with or without zero_cond_t as 2511 / 2509
    write it) and scheduler/ (a config with a marker value)."""
    import json

    from tiny_pipeline import QWEN_SCHEDULER_CONFIG, build_transformer

    build_transformer(zero_cond_t).save_pretrained(root / "transformer")
    (root / "scheduler").mkdir()
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", **QWEN_SCHEDULER_CONFIG, "max_shift": 0.77}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    return root


def _variant_cfg(preset: str, folder):
    """conf/backbone/<preset> composed (defaults list applied), pointed at ``folder``, architecture keys of the
    20B model dropped from expected_config (the folder holds a tiny transformer), the variant's own kept."""
    from omegaconf import OmegaConf

    from conftest import compose

    composed = compose(
        [f"backbone={preset}", f"backbone.pretrained_path={folder}", "backbone.torch_dtype=float32"]
    )
    cfg = OmegaConf.create(OmegaConf.to_container(composed.backbone))
    cfg.expected_config = {k: v for k, v in cfg.expected_config.items() if k == "zero_cond_t"}
    return cfg


def test_variant_presets_read_the_folder_and_refuse_a_mismatch(tmp_path, caplog) -> None:
    """Issue 19: the folder's zero_cond_t wins (2509: off, 2511: on) and a preset that disagrees with the folder
    is an error naming the key, the folder's config file and both values, raised before any weight is read."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    f2509 = _variant_folder(tmp_path / "edit2509", zero_cond_t=False)
    f2511 = _variant_folder(tmp_path / "edit2511", zero_cond_t=True)

    assert instantiate(_variant_cfg("qwen_image_edit_2509", f2509))().zero_cond_t is False
    b2511 = instantiate(_variant_cfg("qwen_image_edit_2511", f2511))()
    assert b2511.zero_cond_t is True and all(blk.zero_cond_t for blk in b2511.transformer.transformer_blocks)
    # the generic preset forces nothing: each folder's value
    assert instantiate(_variant_cfg("qwen_image", f2511))().zero_cond_t is True
    assert instantiate(_variant_cfg("qwen_image", f2509))().zero_cond_t is False
    # the pipeline folder and its scheduler config come along (the Euler sampler reads them)
    assert b2511.pipeline_folder == f2511 and b2511.scheduler_config["max_shift"] == 0.77

    with pytest.raises(ValueError) as err:
        instantiate(_variant_cfg("qwen_image_edit_2509", f2511))()
    msg = str(err.value)
    assert "zero_cond_t" in msg and str(f2511 / "transformer" / "config.json") in msg
    assert (
        "expects zero_cond_t=False" in msg and "has zero_cond_t=True" in msg and "qwen_image_edit_2509" in msg
    )
    with pytest.raises(ValueError, match=r"expects zero_cond_t=True .* has zero_cond_t=False"):
        instantiate(_variant_cfg("qwen_image_edit_2511", f2509))()
    # checked from config.json alone: a folder without weights fails on the key, not on the missing weights
    (tmp_path / "no_weights" / "transformer").mkdir(parents=True)
    (tmp_path / "no_weights" / "transformer" / "config.json").write_text('{"zero_cond_t": true}')
    with pytest.raises(ValueError, match="expects zero_cond_t=False"):
        instantiate(_variant_cfg("qwen_image_edit_2509", tmp_path / "no_weights"))()
    # an explicit value overrides the folder, loudly
    cfg = _variant_cfg("qwen_image", f2509)
    cfg.zero_cond_t = True
    with caplog.at_level("WARNING", logger="rededit"):
        assert instantiate(cfg)().zero_cond_t is True
    assert "overrides zero_cond_t=False" in caplog.text

    # the tiny CPU backbone is unchanged: no folder, no scheduler config, its preset's zero_cond_t
    tiny = instantiate(OmegaConf.load("conf/backbone/tiny.yaml"))(latent_channels=48)
    assert tiny.zero_cond_t is True and tiny.scheduler_config is None and tiny.pipeline_folder is None
