"""euler_sample vs an independent loop over diffusers' scheduler + raw transformer (Edit-Plus pipeline style)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_TRANSFORMER
from rededit.flow.path import QWEN_IMAGE_SCHEDULER, calculate_mu
from rededit.flow.sampler import cfg_combine, euler_sample
from rededit.models.backbone import EditBackbone
from rededit.models.packing import pack_latents, unpack_latents
from rededit.models.vae import PixelSpaceToDepthVAE

TINY = TINY_TRANSFORMER


def _diffusers_reference(transformer, noise, refs, text, mask, neg_text, neg_mask, steps, cfg_scale):
    """The denoising loop of ``QwenImageEditPlusPipeline.__call__`` on latents, written against diffusers."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    b, _, h, w = noise.shape
    latents = pack_latents(noise)
    image_latents = torch.cat([pack_latents(r) for r in refs], dim=1)
    img_shapes = [[(1, h // 2, w // 2), *[(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in refs]]] * b
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    mu = calculate_shift(
        latents.shape[1],
        scheduler.config.base_image_seq_len,
        scheduler.config.max_image_seq_len,
        scheduler.config.base_shift,
        scheduler.config.max_shift,
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        inp = torch.cat([latents, image_latents], dim=1)
        timestep = t.expand(b).to(latents.dtype)
        pred = transformer(
            hidden_states=inp,
            timestep=timestep / 1000,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=text,
            img_shapes=img_shapes,
            return_dict=False,
        )[0][:, : latents.size(1)]
        if cfg_scale > 1:
            neg = transformer(
                hidden_states=inp,
                timestep=timestep / 1000,
                encoder_hidden_states_mask=neg_mask,
                encoder_hidden_states=neg_text,
                img_shapes=img_shapes,
                return_dict=False,
            )[0][:, : latents.size(1)]
            comb = neg + cfg_scale * (pred - neg)
            pred = comb * (torch.norm(pred, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return unpack_latents(latents, h, w)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_euler_sample_matches_diffusers_scheduler_loop(cfg_scale: float) -> None:
    torch.manual_seed(0)
    backbone = EditBackbone(TINY).eval()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 8, 6, generator=g)
    refs = [torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    text = torch.randn(2, 6, 32, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    neg_text = torch.randn(2, 3, 32, generator=g)
    neg_mask = torch.ones(2, 3, dtype=torch.bool)

    ours = euler_sample(
        backbone,
        noise=noise,
        references=refs,
        text_emb=text,
        text_mask=mask,
        neg_text_emb=neg_text,
        neg_text_mask=neg_mask,
        steps=5,
        cfg_scale=cfg_scale,
    )
    with torch.no_grad():
        ref = _diffusers_reference(
            backbone.transformer, noise, refs, text, mask, neg_text, neg_mask, 5, cfg_scale
        )
    assert ours.shape == noise.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # The sampler moved the latents (a broken loop that returns the noise would not).
    assert (ours - noise).abs().mean() > 0.1


def test_cfg_changes_result_and_mu_override() -> None:
    torch.manual_seed(0)
    backbone = EditBackbone(TINY).eval()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 4, 4, 4, generator=g)
    text = torch.randn(1, 3, 32, generator=g)
    neg = torch.randn(1, 3, 32, generator=g)
    kwargs = {"noise": noise, "references": [], "text_emb": text, "text_mask": None, "steps": 3}
    plain = euler_sample(backbone, **kwargs)
    # cfg_scale <= 1 ignores the negative prompt, like the pipeline.
    assert torch.equal(plain, euler_sample(backbone, **kwargs, neg_text_emb=neg, cfg_scale=1.0))
    guided = euler_sample(backbone, **kwargs, neg_text_emb=neg, cfg_scale=4.0)
    assert (guided - plain).abs().max() > 1e-4
    default_mu = calculate_mu(4)
    assert torch.equal(plain, euler_sample(backbone, **kwargs, mu=default_mu))
    assert not torch.equal(plain, euler_sample(backbone, **kwargs, mu=default_mu + 1.0))


def test_cfg_combine_preserves_conditional_norm() -> None:
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(2, 4, 4, 4, generator=g)
    neg = torch.randn(2, 4, 4, 4, generator=g)
    out = cfg_combine(cond, neg, 5.0)
    torch.testing.assert_close(pack_latents(out).norm(dim=-1), pack_latents(cond).norm(dim=-1))
    torch.testing.assert_close(cfg_combine(cond, neg, 1.0), cond)


def test_decodes_with_vae() -> None:
    torch.manual_seed(0)
    cfg = dict(TINY, in_channels=48 * 4, out_channels=48)
    backbone = EditBackbone(cfg).eval()
    vae = PixelSpaceToDepthVAE(factor=4)
    noise = torch.randn(1, 48, 4, 4, generator=torch.Generator().manual_seed(0))
    img = euler_sample(
        backbone, noise=noise, references=[], text_emb=torch.zeros(1, 2, 32), text_mask=None, steps=2, vae=vae
    )
    assert img.shape == (1, 3, 16, 16)


def test_x0_backbone_final_step_lands_on_prediction() -> None:
    torch.manual_seed(0)
    backbone = EditBackbone(TINY, prediction="x0").eval()
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 4, 4, 4, generator=g)
    text = torch.randn(2, 3, 32, generator=g)
    kwargs = {"references": [], "text_emb": text, "text_mask": None}
    # Schedule [1, 0.01, 0]: the last step starts below x0_sigma_min and must still return x̂0 exactly.
    out = euler_sample(backbone, noise=noise, sigmas=torch.tensor([1.0, 0.01, 0.0]), **kwargs)
    with torch.no_grad():
        x0_first = backbone.predicted_x0(noise, backbone(noise, [], torch.ones(2), text, None), torch.ones(2))
        x_mid = x0_first + 0.01 * (noise - x0_first)
        sigma = torch.full((2,), 0.01)
        x0_last = backbone.predicted_x0(x_mid, backbone(x_mid, [], sigma, text, None), sigma)
    torch.testing.assert_close(out, x0_last, rtol=1e-5, atol=1e-5)
