"""A tiny random but complete Qwen-Image-Edit-Plus pipeline folder, built offline (issue 19 parity tests).

``build_tiny_pipeline(folder, zero_cond_t=...)`` saves, with each class's own ``save_pretrained``, what
``QwenImageEditPlusPipeline.from_pretrained`` reads from a published editor (Qwen-Image-Edit-2509/2511,
FireRed-Image-Edit-1.0): ``model_index.json``, ``transformer/`` (a 1-block ``QwenImageTransformer2DModel``),
``vae/`` (a 3-level ``AutoencoderKLQwenImage``, ×8 like the real one), ``text_encoder/`` (a 2-layer
``Qwen2_5_VLForConditionalGeneration``), ``tokenizer/`` and ``processor/`` (a byte-level BPE over a fixed
text with the Qwen special tokens, and the Qwen2-VL image processor) and ``scheduler/`` (Qwen-Image's
``FlowMatchEulerDiscreteScheduler`` config).

The BPE vocabulary size is picked so that the edit template's system prefix is exactly 64 tokens: the
pipeline drops a fixed 64 (``prompt_template_encode_start_idx``), as it does for the real tokenizer, while
rededit measures the prefix with the tokenizer it loads. Everything is seeded, so two builds are identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Qwen-Image's scheduler/scheduler_config.json (Qwen-Image, -Edit, -Edit-2509, -Edit-2511 ship this one).
QWEN_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The vocabulary size at which the BPE trained on _BPE_TEXT splits the template's system prefix into exactly
# the 64 tokens the pipeline drops (checked in build_tokenizer).
BPE_VOCAB = 457
PIPELINE_DROP_IDX = 64
_BPE_TEXT = "Picture 1: make the cat red and the sky blue"

TEXT_DIM = 32
Z_DIM = 4


def build_tokenizer():
    """A fast tokenizer whose split of the edit template's system prefix has exactly 64 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rededit.models.text_encoder import QWEN_EDIT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([QWEN_EDIT_TEMPLATE, _BPE_TEXT], trainer)
    prefix = QWEN_EDIT_TEMPLATE.split("{}")[0]
    n = len(tok.encode(prefix).ids)
    if n != PIPELINE_DROP_IDX:
        raise AssertionError(f"the tiny BPE splits the system prefix into {n} tokens, the pipeline drops 64")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return hf_tok


def build_text_encoder(tokenizer, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_DIM,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=112 * 112, **sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
    )


def build_vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(1)
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=Z_DIM,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 2.0, 0.8, 1.2],
    ).eval()


def build_transformer(zero_cond_t: bool):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(2)
    kwargs = {"zero_cond_t": True} if zero_cond_t else {}  # 2509's config.json has no zero_cond_t key
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=Z_DIM * 4,
        out_channels=Z_DIM,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
        **kwargs,
    ).eval()


def build_tiny_pipeline(folder: str | Path, *, zero_cond_t: bool = False) -> Path:
    """Save the tiny pipeline into ``folder`` (see the module docstring); returns ``folder``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    folder = Path(folder)
    tokenizer = build_tokenizer()
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        processor=build_processor(tokenizer),
        transformer=build_transformer(zero_cond_t),
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_t2i_pipeline(folder: str | Path) -> Path:
    """A tiny Qwen-Image *text-to-image* folder (``QwenImagePipeline``: no ``processor/``, 2509's transformer
    flags), the base FireRed-Image-Edit-1.0 was trained from; returns ``folder``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    folder = Path(folder)
    tokenizer = build_tokenizer()
    QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=build_transformer(False),
    ).save_pretrained(folder)
    return folder


def build_tiny_vl_folder(folder: str | Path, seed: int = 5) -> Path:
    """A plain tiny Qwen2.5-VL checkpoint folder (model, tokenizer and processor files at its root, as
    Qwen2.5-VL-7B-Instruct ships), with other text-encoder weights than the pipelines' (``seed``)."""
    folder = Path(folder)
    tokenizer = build_tokenizer()
    build_text_encoder(tokenizer, seed=seed).save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return folder
