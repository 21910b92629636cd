"""The pixel head (issue 15, :mod:`rededit.models.pixel_head`).

* off (the default) builds nothing: same state dict, no hook, bit-identical outputs;
* on, a fresh backbone still starts at exactly "return Picture 1" and only ``pixel_head.*`` is added;
* a "pixel" is one group of channels in ``pixel_unshuffle``'s layout: with the demo's space-to-depth autoencoder
  and ``pixels = 16`` the head's change at an RGB pixel depends on that pixel's values in Picture 1, not on its
  neighbours' — the property that lets a change follow an outline inside a token;
* it needs the x0 + source-residual mode, and ``pixels`` must divide the latent channels;
* an export with the head reloads (``load_editor``) and predicts identically.
"""

from __future__ import annotations

import pytest
import torch

from rededit.models.pixel_head import PixelHead
from rededit.models.vae import PixelSpaceToDepthVAE
from test_edit_gate import _stage, assert_export_reloads, assert_off_builds_nothing, build, x0_of
from test_fireedit_options import inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_off_builds_nothing() -> None:
    assert_off_builds_nothing("pixel_head", "norm_out")


def test_on_adds_only_its_weights_and_starts_from_picture_1() -> None:
    plain, on = build(), build(pixel_head={"features": 4, "hidden": 8})
    missing, unexpected = on.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pixel_head.") for k in missing) and missing
    args = inputs()
    assert torch.equal(on(*args), plain(*args))
    assert torch.allclose(x0_of(on, args), args[1][0], atol=1e-5)
    assert not on.transformer.norm_out._forward_hooks


def test_the_head_changes_the_prediction_once_trained() -> None:
    on = build(pixel_head=True)
    args = inputs()
    before = x0_of(on, args)
    torch.nn.init.normal_(on.pixel_head.mlp[-1].weight, std=0.5)
    after = x0_of(on, args)
    assert (after - before).abs().max() > 1e-2
    x, _, sigma, text, mask = args
    t2i = on(x, [], sigma, text, mask)  # no Picture 1: the head reads zeros for it
    assert torch.isfinite(t2i).all()


@pytest.mark.parametrize("noisy", [False, True])
def test_a_pixel_is_an_rgb_pixel_of_the_space_to_depth_autoencoder(noisy: bool) -> None:
    vae = PixelSpaceToDepthVAE(factor=4, scale=2.0)
    head = PixelHead(dim=8, patch_size=2, latent_channels=48, pixels=16, features=2, hidden=8, noisy=noisy)
    torch.nn.init.normal_(head.mlp[-1].weight)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    hidden = torch.randn(1, 4, 8)  # 2×2 tokens of a 4×4 latent
    x_t, sigma = torch.randn(1, 48, 4, 4), torch.tensor([0.5])
    base, _ = head(hidden, vae.encode(image), x_t, sigma)
    moved = image.clone()
    moved[0, :, 5, 9] += 0.7  # one RGB pixel of Picture 1
    diff = (vae.decode(head(hidden, vae.encode(moved), x_t, sigma)[0]) - vae.decode(base)).abs().sum(1)[0]
    assert diff[5, 9] > 0
    diff[5, 9] = 0
    assert torch.count_nonzero(diff) == 0  # no other pixel's change moved


def test_needs_the_residual_mode_and_a_channel_split() -> None:
    with pytest.raises(ValueError, match="source_residual"):
        build(pixel_head=True, source_residual=False)
    with pytest.raises(ValueError, match="divide"):
        build(pixel_head={"pixels": 3})


def test_export_with_the_head_reloads_identically(tmp_path) -> None:
    override = "backbone.pixel_head={pixels:16,features:4}"
    stage, cfg = _stage(tmp_path / "on", override)
    assert_export_reloads(stage, cfg, "pixel_head", override, tmp_path)


def test_an_adapter_run_freezes_the_base_output_heads() -> None:
    from rededit.models.adapters import apply_adapter

    backbone = build(pixel_head={"features": 4}, edit_gate=True)
    apply_adapter(backbone, {"type": "lora", "rank": 2, "alpha": 2, "target_modules": ["attn.to_q"]})
    assert not any(p.requires_grad for p in backbone.pixel_head.parameters())
    assert not any(p.requires_grad for p in backbone.edit_gate.parameters())
    assert any(p.requires_grad for n, p in backbone.named_parameters() if "lora_A" in n)


def test_per_pixel_gate_targets_and_compositing_follow_the_rgb_pixels() -> None:
    """``pixel_head.gate``: the gate logits are per RGB pixel ``[B, 16, h, w]``; the mask loss's targets and the
    compositing use the space-to-depth autoencoder's pixel layout, so closing one pixel's gate keeps exactly that
    pixel of Picture 1."""
    from rededit.models.edit_gate import EditGate, mask_targets

    vae = PixelSpaceToDepthVAE(factor=4, scale=2.0)
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 5, 9] = 1.0
    m = mask_targets(mask, (4, 4), pixels=16)
    assert m.shape == (1, 16, 4, 4) and m.sum() == 1
    assert torch.equal(m.repeat(1, 3, 1, 1) > 0, vae.encode(mask.expand(1, 3, 16, 16)) > 0)
    gate = EditGate(dim=8, patch_size=2)
    delta = torch.randn(1, 48, 4, 4)
    logits = torch.where(m > 0, 30.0, -30.0)  # open only at pixel (5, 9)
    change = vae.decode(gate.composite(delta, logits)) - vae.decode(torch.zeros_like(delta))
    moved = change.abs().sum(1)[0] > 1e-6
    assert moved[5, 9] and moved.sum() == 1
    on = build(pixel_head={"gate": True, "pixels": 1}, edit_gate=True)
    x, refs, sigma, text, mask_ = inputs()
    on(x, refs, sigma, text, mask_)
    assert on.last_gate_logits.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"needs backbone\.edit_gate"):
        build(pixel_head={"gate": True})
