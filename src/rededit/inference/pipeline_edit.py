"""Editing with an editor that came from a diffusers pipeline folder, exactly as ``QwenImageEditPlusPipeline``
does it (issue 19): same images, prompt, negative prompt, steps, true-CFG scale and seed give the same image.

An editor loaded from a Qwen-Image-Edit(-Plus) folder, or from an export of one
(:func:`rededit.inference.editor.load_editor`), is served to users by that pipeline (or ComfyUI, which
follows it); every place where rededit prepared the inputs differently was a silent quality loss. What
:func:`pipeline_edit` reproduces from diffusers 0.42.1's ``QwenImageEditPlusPipeline.__call__``, and why:

* **VL condition images**: each input image, resized with PIL's Lanczos filter to
  ``calculate_dimensions(384², w / h)`` (``CONDITION_IMAGE_SIZE``), is what Qwen2.5-VL sees; the text encoder
  does that resize itself from the original PIL image (``QwenVLTextEncoder.condition_image``), so it is given
  the originals, not the VAE-sized references (resizing those again would resample twice).
* **VAE reference images**: each input image resized (not cropped: the pipeline keeps the whole picture and
  lets the aspect move by at most one 32-px step) with the same Lanczos filter to
  ``calculate_dimensions(1024², w / h)`` (``VAE_IMAGE_SIZE``), scaled to [-1, 1] as ``VaeImageProcessor.preprocess``
  does; rededit's own sizing (cover-crop to the trained buckets) would show the model other pixels.
* **Output size**: ``calculate_dimensions(1024², w / h)`` of the *last* input image unless ``height`` /
  ``width`` are given, then floored to a multiple of ``vae_scale_factor · 2`` (16): the pipeline's rule, so a
  rededit edit and a pipeline edit have the same size (rededit-edit's own rule writes Picture 1's size).
* **Noise**: ``torch.randn((1, 1, C, h, w), generator=torch.Generator().manual_seed(seed), dtype=...)``, the
  pipeline's ``randn_tensor`` with a CPU generator, packed as it packs; not rededit's per-item derived seed.
* **Text**: the prompt and the negative prompt encoded with the same condition images; the mask dropped when
  every token is valid (``encode_prompt`` does; the transformer then takes its unmasked attention path).
* **Latents dtype and schedule**: the text embedding's dtype between steps (``prompt_embeds.dtype``), and the
  folder's scheduler config (:mod:`rededit.flow.sampler`'s pipeline numerics).
* **Decode and 8-bit output**: ``latents / (1 / std) + mean`` in the VAE's dtype
  (:class:`~rededit.models.vae.QwenImageVAE`), then ``VaeImageProcessor.postprocess``:
  ``(x / 2 + 0.5).clamp(0, 1)``, ``× 255``, rounded.

Classifier-free guidance follows rededit's convention (a negative prompt of ``None`` takes the editor's
``negative_prompt``; CFG runs when the scale is above 1), where the pipeline runs CFG only when a negative
prompt is passed: give both explicitly to compare them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from rededit.flow.path import QWEN_IMAGE_SCHEDULER
from rededit.flow.sampler import euler_sample
from rededit.models.text_encoder import condition_size

#: ``QwenImageEditPlusPipeline``'s ``VAE_IMAGE_SIZE`` (diffusers 0.42.1) and the area of its default output
#: size (its ``CONDITION_IMAGE_SIZE`` is the text encoder's ``QWEN_CONDITION_AREA``). Sizes at an area come
#: from :func:`rededit.models.text_encoder.condition_size`, diffusers' ``calculate_dimensions``.
VAE_IMAGE_AREA = 1024 * 1024
OUTPUT_AREA = 1024 * 1024


def is_pipeline_editor(editor: Any) -> bool:
    """Whether the editor's transformer came from a diffusers pipeline folder (a published editor or a full
    export of one)."""
    return getattr(getattr(editor, "backbone", None), "pipeline_folder", None) is not None


def size_multiple(editor: Any) -> int:
    """``vae_scale_factor · 2``: the pipeline floors output sides to it."""
    return int(editor.vae.downsample) * int(editor.backbone.patch_size)


def pipeline_output_size(
    images: Sequence[Image.Image], multiple: int, height: int | None = None, width: int | None = None
) -> tuple[int, int]:
    """``(height, width)`` of the edit: the pipeline's default from the last image's aspect (~1024² px), or the
    given sides, floored to ``multiple``."""
    w_last, h_last = images[-1].size
    default_w, default_h = condition_size(w_last, h_last, OUTPUT_AREA)
    height = height or default_h
    width = width or default_w
    return height // multiple * multiple, width // multiple * multiple


def vae_image(img: Image.Image) -> torch.Tensor:
    """``[1, 3, h, w]`` float32 in [-1, 1]: ``VaeImageProcessor.preprocess(img, h, w)`` at
    ``calculate_dimensions(1024², w / h)`` (PIL Lanczos resize, ``/ 255``, ``2x − 1``)."""
    w, h = condition_size(img.width, img.height, VAE_IMAGE_AREA)
    resized = img.resize((w, h), resample=Image.Resampling.LANCZOS)
    arr = np.array(resized).astype(np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


@torch.no_grad()
def pipeline_edit(
    editor: Any,
    images: Sequence[Image.Image],
    prompt: str,
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """One edit as ``QwenImageEditPlusPipeline(image=images, prompt=prompt, negative_prompt=...,
    num_inference_steps=steps, true_cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed),
    height=height, width=width)`` makes it (module docstring).

    Args:
        editor: a stage from :func:`~rededit.inference.editor.load_editor` with a Qwen-VL text encoder and the
            Qwen-Image VAE (:func:`is_pipeline_editor`).
        images: Picture 1, 2, … (at least one; RGB PIL images at their own sizes).
        steps, cfg_scale, negative_prompt: ``None`` takes the editor's ``sample_steps``, ``cfg_scale``,
            ``negative_prompt``.

    Returns:
        the edit ``[3, H, W]`` in [0, 1] (float, before 8-bit rounding; ``tensor_to_pil(edit, (0, 1))`` rounds it as
        ``VaeImageProcessor.numpy_to_pil`` does).
    """
    if not images:
        raise ValueError("pipeline_edit needs at least one image (QwenImageEditPlusPipeline edits images)")
    images = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
    enc, vae, backbone = editor.text_encoder, editor.vae, editor.backbone
    if enc is None or not getattr(enc, "uses_images", False):
        raise ValueError("pipeline_edit needs a vision-language text encoder (text_encoder=qwen_vl)")
    device = next(backbone.parameters()).device
    vae.to(device)
    enc.to(device)
    was_training = backbone.training
    backbone.eval()
    height, width = pipeline_output_size(images, size_multiple(editor), height, width)

    # The text encoder resizes each original image to its condition size with the pipeline's filter.
    emb, mask = enc.encode([prompt], [list(images)])
    cfg = editor.cfg_scale if cfg_scale is None else float(cfg_scale)
    neg_emb = neg_mask = None
    if cfg > 1:
        neg = editor.negative_prompt if negative_prompt is None else negative_prompt
        neg_emb, neg_mask = enc.encode([neg], [list(images)])
    dtype = emb.dtype  # the pipeline's latents dtype: prompt_embeds.dtype

    def unmasked(m: torch.Tensor | None) -> torch.Tensor | None:
        # encode_prompt: `if prompt_embeds_mask.all(): prompt_embeds_mask = None`
        return None if m is None or bool(m.all()) else m.to(device)

    refs = [vae.encode(vae_image(im).to(device=device, dtype=dtype)) for im in images]
    f = int(vae.downsample)
    shape = (1, 1, int(vae.latent_channels), height // f, width // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)), dtype=dtype)[:, 0]
    latents = euler_sample(
        backbone,
        noise=noise.to(device),
        references=refs,
        text_emb=emb.to(device),
        text_mask=unmasked(mask),
        neg_text_emb=None if neg_emb is None else neg_emb.to(device),
        neg_text_mask=unmasked(neg_mask),
        steps=steps or editor.sample_steps,
        cfg_scale=cfg,
        # the pipeline's numerics even for a folder without scheduler/ (then Qwen-Image's config)
        scheduler=getattr(backbone, "scheduler_config", None) or QWEN_IMAGE_SCHEDULER,
        latents_dtype=dtype,
    )
    backbone.train(was_training)
    image = vae.decode(latents)[0]
    return (image * 0.5 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize
