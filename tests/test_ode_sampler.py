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


def _diffusers_reference(
    transformer, noise, refs, text, mask, neg_text, neg_mask, steps, cfg_scale, config=QWEN_IMAGE_SCHEDULER
):
    """The denoising loop of ``QwenImageEditPlusPipeline.__call__`` on latents, written against diffusers (the
    latents in ``noise``'s dtype, as the pipeline keeps them in ``prompt_embeds.dtype``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    b, _, h, w = noise.shape
    latents = pack_latents(noise)
    image_latents = torch.cat([pack_latents(r) for r in refs], dim=1)
    img_shapes = [[(1, h // 2, w // 2), *[(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in refs]]] * b
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
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


# A scheduler config as a pipeline folder's scheduler/scheduler_config.json may hold, every value away from
# Qwen-Image's constants (so a sampler that ignored the folder would differ).
FOLDER_SCHEDULER = {**QWEN_IMAGE_SCHEDULER, "max_shift": 1.3, "base_shift": 0.2, "shift_terminal": 0.05}


@pytest.mark.parametrize(
    "config",
    [
        QWEN_IMAGE_SCHEDULER,
        FOLDER_SCHEDULER,
        {**FOLDER_SCHEDULER, "time_shift_type": "linear"},
        {"use_dynamic_shifting": False, "shift": 3.0},  # SD3-style static shift, diffusers' other defaults
    ],
)
def test_schedule_sigmas_follow_the_folder_config(config) -> None:
    """Issue 19: the σ schedule is the one the folder's scheduler gives (diffusers' set_timesteps), not constants."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    from rededit.flow.path import schedule_sigmas, scheduler_settings

    settings = scheduler_settings(config)
    for steps, seq_len in ((2, 64), (4, 300), (28, 4096)):  # 1 step: diffusers divides 0 by 0 (NaN)
        sched = FlowMatchEulerDiscreteScheduler(**config)
        mu = calculate_shift(
            seq_len,
            sched.config.base_image_seq_len,
            sched.config.max_image_seq_len,
            sched.config.base_shift,
            sched.config.max_shift,
        )
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert torch.equal(schedule_sigmas(steps, seq_len, settings), sched.sigmas)  # to the bit


def test_scheduler_settings_refuse_what_the_sampler_does_not_do() -> None:
    from rededit.flow.path import scheduler_settings

    assert scheduler_settings(None) == QWEN_IMAGE_SCHEDULER
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        scheduler_settings({**QWEN_IMAGE_SCHEDULER, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="DDIMScheduler"):
        scheduler_settings({"_class_name": "DDIMScheduler"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_folder_scheduler_and_latents_dtype_match_the_pipeline_loop(dtype, cfg_scale) -> None:
    """Issue 19: an editor from a pipeline folder samples with the folder's scheduler config and the pipeline's
    numerics (latents in the model dtype between steps, the transformer fed ``(σ·1000).to(dtype) / 1000``, CFG in
    the model dtype): equal to diffusers' scheduler loop bit for bit, in bf16 as in fp32. A loop that kept the
    latents in fp32 (rededit's loop before issue 19) differs in bf16."""
    torch.manual_seed(0)
    backbone = EditBackbone(TINY).eval().to(dtype)
    backbone.scheduler_config = FOLDER_SCHEDULER  # what a pipeline folder's scheduler/ gives (EditBackbone)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 8, 6, generator=g).to(dtype)
    refs = [torch.randn(1, 4, 8, 6, generator=g).to(dtype), torch.randn(1, 4, 4, 4, generator=g).to(dtype)]
    text = torch.randn(1, 6, 32, generator=g).to(dtype)
    neg_text = torch.randn(1, 3, 32, generator=g).to(dtype)
    kwargs = {"noise": noise, "references": refs, "text_emb": text, "text_mask": None, "steps": 5}
    ours = euler_sample(backbone, **kwargs, neg_text_emb=neg_text, neg_text_mask=None, cfg_scale=cfg_scale)
    with torch.no_grad():
        ref = _diffusers_reference(
            backbone.transformer, noise, refs, text, None, neg_text, None, 5, cfg_scale, FOLDER_SCHEDULER
        )
    assert ours.dtype == dtype
    assert torch.equal(ours, ref), float((ours.float() - ref.float()).abs().max())
    # the folder's config is what was used: Qwen-Image's constants give another result
    backbone.scheduler_config = QWEN_IMAGE_SCHEDULER
    assert not torch.equal(euler_sample(backbone, **kwargs), ref)
    if dtype == torch.bfloat16:  # fp32 latents between steps, as before issue 19, are not the pipeline's
        backbone.scheduler_config = None
        fp32_state = euler_sample(
            backbone, **kwargs, neg_text_emb=neg_text, cfg_scale=cfg_scale, sigmas=_folder_sigmas(5, noise)
        )
        assert not torch.equal(fp32_state.to(dtype), ref)


def _folder_sigmas(steps, noise):
    from rededit.flow.path import schedule_sigmas, scheduler_settings

    h, w = noise.shape[-2:]
    return schedule_sigmas(steps, (h // 2) * (w // 2), scheduler_settings(FOLDER_SCHEDULER))
