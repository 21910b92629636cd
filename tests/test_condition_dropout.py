"""Condition dropout in training (issue 19): ``stage.text_drop_prob`` replaces a sample's text by the embedding
of the CFG negative prompt — exactly what diffusers' Qwen-Image pipelines encode as the negative branch of true
CFG — and ``stage.ref_drop_prob`` turns a batch into text-to-image. Rates, the exact negative embedding (tiny
random Qwen2.5-VL against QwenImageEditPlusPipeline / QwenImagePipeline) and determinism given
(seed, epoch, step, rank)."""

from __future__ import annotations

import pytest
import torch

from rededit.data.images import to_tensor
from rededit.models.text_encoder import MiniLMTextEncoder, QwenVLTextEncoder
from rededit.stages.base import DEFAULT_NEGATIVE_PROMPT, STEPS_PER_EPOCH_STRIDE, BaseStage, condition_drops
from test_text_encoder import _build_tiny_qwen, _pil, edit_plus_pipeline, pipeline_prompt_embeds, t2i_pipeline


def _stage(text_encoder, **kwargs) -> BaseStage:
    """A bare stage (no backbone built): enough for its condition dropout."""
    stage = BaseStage(
        backbone=lambda **_: None,
        vae=torch.nn.Identity(),
        text_encoder=text_encoder,
        timesteps=None,
        optimizer=torch.optim.AdamW,
        **kwargs,
    )
    return stage.train()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> QwenVLTextEncoder:
    folder = tmp_path_factory.mktemp("tiny_qwen_vl")
    _build_tiny_qwen(folder)
    return QwenVLTextEncoder(str(folder), max_length=128, dtype=torch.float32)


def _batch(encoder, texts, pictures, *, epoch=0, step=0) -> dict:
    """A collated batch as the loader makes it: references at their (shared) shape in [-1, 1], embeddings."""
    refs = [torch.stack([to_tensor(p[k]) for p in pictures]) for k in range(len(pictures[0]))]
    images = [[r[i] for r in refs] for i in range(len(texts))]
    emb, mask = encoder.encode(texts, images if encoder.uses_images else None)
    return {
        "ids": [f"s{i}" for i in range(len(texts))],
        "texts": list(texts),
        "references": refs,
        "text_emb": emb,
        "text_mask": mask,
        "epoch": epoch,
        "step": step,
    }


def test_drop_rate_and_determinism():
    """Each text drops with the configured probability and each batch's references with theirs; the draws are
    a function of (seed, epoch·stride + step, rank) only."""
    n_steps, b = 4000, 8
    texts = torch.stack(
        [condition_drops(0, s, 0, b, text_prob=0.05, ref_prob=0.1)[0] for s in range(n_steps)]
    )
    refs = [condition_drops(0, s, 0, b, text_prob=0.05, ref_prob=0.1)[1] for s in range(n_steps)]
    text_rate, ref_rate = float(texts.float().mean()), sum(refs) / n_steps
    print(f"text drop rate {text_rate:.4f} (p=0.05, n={n_steps * b}); ref drop rate {ref_rate:.4f} (p=0.1)")
    assert abs(text_rate - 0.05) < 0.006  # 5.4 standard errors
    assert abs(ref_rate - 0.1) < 0.025
    a = condition_drops(3, 5, 1, 64, text_prob=0.5, ref_prob=0.5)
    assert torch.equal(a[0], condition_drops(3, 5, 1, 64, text_prob=0.5, ref_prob=0.5)[0])
    for other in ((4, 5, 1), (3, 6, 1), (3, 5, 0), (3, 5 + STEPS_PER_EPOCH_STRIDE, 1)):
        assert not torch.equal(a[0], condition_drops(*other, 64, text_prob=0.5, ref_prob=0.5)[0])
    none = condition_drops(3, 5, 1, 64, text_prob=0.0, ref_prob=0.0)
    assert not none[0].any() and none[1] is False
    with pytest.raises(ValueError, match="text_drop_prob"):
        _stage(None, text_drop_prob=1.5)


def test_stage_drops_are_deterministic_given_seed_and_step():
    minilm = MiniLMTextEncoder(max_length=32)
    stage = _stage(minilm, text_drop_prob=0.5, seed=11)
    assert stage.negative_prompt == DEFAULT_NEGATIVE_PROMPT == " "
    texts = [f"make the shape number {i} red" for i in range(16)]
    picture = [[_pil(i, 16, 16)] for i in range(16)]

    def dropped(epoch, step):
        batch = _batch(minilm, texts, picture, epoch=epoch, step=step)
        out = stage.drop_conditions(batch, list(batch["references"]), batch["text_emb"], batch["text_mask"])
        return out

    refs, emb, mask, d = dropped(0, 7)
    expect, _ = condition_drops(11, 7, 0, 16, text_prob=0.5, ref_prob=0.0)
    assert torch.equal(d, expect) and 0 < int(d.sum()) < 16
    assert len(refs) == 1  # ref_drop_prob = 0: references kept
    again = dropped(0, 7)
    assert torch.equal(again[1], emb) and torch.equal(again[2], mask)
    assert not torch.equal(dropped(0, 8)[3], d) or not torch.equal(dropped(1, 7)[3], d)
    # MiniLM: the dropped rows hold the negative prompt's embedding (" " tokenises as "": [CLS] [SEP])
    neg, neg_mask = minilm.encode([" "])
    for i in range(16):
        n = int(mask[i].sum())
        if d[i]:
            assert n == int(neg_mask.sum()) == 2 and torch.equal(emb[i, :n], neg[0, :n])
        else:
            m = _batch(minilm, [texts[i]], [picture[i]])
            torch.testing.assert_close(emb[i, :n], m["text_emb"][0, :n], atol=1e-5, rtol=1e-5)


def test_dropped_text_is_the_pipelines_negative_embedding(qwen):
    """A dropped text is the pipeline's negative branch for the same sample: QwenImageEditPlusPipeline's
    ``encode_prompt(negative_prompt, condition images)`` with true CFG on, QwenImagePipeline's for a row
    without references. Kept rows are untouched."""
    edit, t2i = edit_plus_pipeline(qwen), t2i_pipeline(qwen)
    pictures = [_pil(1, 90, 60), _pil(2, 90, 60)]
    texts = ["make the circle in Picture 1 red", "replace the square with a star"]
    stage = _stage(qwen, text_drop_prob=0.5, seed=0)
    # find a step where exactly one of the two rows drops (drawn from the seed, nothing else)
    step = next(
        s
        for s in range(100)
        if condition_drops(0, s, 0, 2, text_prob=0.5, ref_prob=0)[0].tolist() == [True, False]
    )
    batch = _batch(qwen, texts, [[p] for p in pictures], step=step)
    refs, emb, mask, d = stage.drop_conditions(
        batch, list(batch["references"]), batch["text_emb"], batch["text_mask"]
    )
    assert d.tolist() == [True, False] and len(refs) == 1
    # the pipeline sees the same 8-bit picture (the served reference); its second encode_prompt is the negative
    served = batch["references"][0][0]
    calls = pipeline_prompt_embeds(edit, texts[0], [_pil_of(served)], negative_prompt=" ")
    (cond_pos, pos), (cond_neg, negative) = calls
    assert [c.size for c in cond_pos] == [c.size for c in cond_neg]
    # (the loader's embedding of the kept text is the pipeline's positive branch)
    torch.testing.assert_close(batch["text_emb"][0, : pos.shape[1]], pos[0], atol=1e-5, rtol=1e-5)
    n = negative.shape[1]
    assert int(mask[0].sum()) == n
    torch.testing.assert_close(emb[0, :n], negative[0], atol=1e-5, rtol=1e-5)
    alone = _stage(qwen, text_drop_prob=1.0).drop_conditions(
        {**batch, "texts": texts[:1], "references": [batch["references"][0][:1]]},
        [batch["references"][0][:1]],
        batch["text_emb"][:1],
        batch["text_mask"][:1],
    )
    assert torch.equal(alone[1][0, :n], negative[0])  # one row: bit-identical to the pipeline
    k = int(batch["text_mask"][1].sum())
    assert int(mask[1].sum()) == k and torch.equal(emb[1, :k], batch["text_emb"][1, :k])
    # a text-to-image row drops to QwenImagePipeline's negative
    t2i_batch = {**_batch(qwen, ["a red circle"], [[]]), "references": []}
    _, t_emb, t_mask, t_d = _stage(qwen, text_drop_prob=1.0).drop_conditions(
        t2i_batch, [], t2i_batch["text_emb"], t2i_batch["text_mask"]
    )
    t_neg, _ = t2i.encode_prompt(prompt=[" "], device=torch.device("cpu"))
    assert t_d.all() and t_mask.all() and t_emb.shape == t_neg.shape and torch.equal(t_emb, t_neg)


def test_reference_drop_turns_the_batch_into_text_to_image(qwen):
    """``ref_drop_prob``: the batch loses its references and its texts are re-encoded as QwenImagePipeline
    encodes a prompt (the T2I template, no image); dropped texts become its negative."""
    t2i = t2i_pipeline(qwen)
    texts = ["a blue square on grass", "two red circles"]
    batch = _batch(qwen, texts, [[_pil(3, 64, 64)], [_pil(4, 64, 64)]], step=2)
    refs, emb, mask, d = _stage(qwen, ref_drop_prob=1.0).drop_conditions(
        batch, list(batch["references"]), batch["text_emb"], batch["text_mask"]
    )
    assert refs == [] and not d.any()
    for i, text in enumerate(texts):
        ref, _ = t2i.encode_prompt(prompt=[text], device=torch.device("cpu"))
        n = ref.shape[1]
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(emb[i, :n], ref[0], atol=1e-5, rtol=1e-5)


def test_flow_loss_drops_only_in_training(tmp_path):
    """Through a real (tiny) stage: the backbone gets the negative embedding for a dropped sample in training
    and the sample's own text in validation."""
    from conftest import untrained_tiny_stage

    stage, _ = untrained_tiny_stage(tmp_path / "run", "stage.text_drop_prob=1.0")
    minilm = MiniLMTextEncoder(max_length=32)
    stage._text_encoder[0] = minilm
    pictures = [[_pil(5, 64, 64)], [_pil(6, 64, 64)]]
    batch = _batch(minilm, ["make it red", "make it blue"], pictures, step=1)
    batch |= {
        "target": torch.stack([to_tensor(_pil(7, 64, 64)), to_tensor(_pil(8, 64, 64))]),
        "edit_mask": torch.ones(2, 1, 64, 64),
        "has_edit_mask": torch.tensor([False, False]),
        "object_boxes": [None, None],
    }
    seen = []
    forward = stage.backbone.forward

    def spy(x_t, refs, sigma, text_emb, text_mask, **kw):
        seen.append(text_emb[text_mask.bool()].clone())
        return forward(x_t, refs, sigma, text_emb, text_mask, **kw)

    stage.backbone.forward = spy
    stage.train()
    _, parts = stage.flow_loss(batch)
    assert parts["text_dropped"].all()
    neg, neg_mask = minilm.encode([" "])
    torch.testing.assert_close(seen[-1], torch.cat([neg[0][neg_mask[0]]] * 2))
    stage.eval()
    _, parts = stage.flow_loss(batch)
    assert not parts["text_dropped"].any()
    torch.testing.assert_close(seen[-1], batch["text_emb"][batch["text_mask"]])


def _pil_of(t: torch.Tensor):
    from rededit.data.images import tensor_to_pil

    return tensor_to_pil(t)


def test_training_run_with_every_condition_dropped(tiny_corpus, tmp_path):
    """``rededit-train`` with both drops always on: every step trains on the negative text and no references
    (the backbone's text-to-image path), logs the drop rates and stays finite."""
    from conftest import compose, train_overrides
    from rededit.train import run

    overrides = train_overrides(
        tiny_corpus,
        "experiment=demo_pretrain",
        "stage.text_drop_prob=1.0",
        "stage.ref_drop_prob=1.0",
        steps=2,
    )
    metrics = run(compose(overrides, tmp_path))["metrics"]
    assert float(metrics["train/text_drop_frac"]) == 1.0 and float(metrics["train/ref_drop"]) == 1.0
    assert torch.isfinite(torch.tensor(float(metrics["train/loss"])))
