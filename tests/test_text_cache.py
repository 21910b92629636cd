"""Text-embedding cache: content keys, shard round trips, corruption → miss, cached-vs-online batches,
and the resumable ``rededit-data encode-text`` command."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rededit.cli import data_encode_text
from rededit.data.schema import manifest_schema
from rededit.data.text_cache import (
    TextEmbeddingCache,
    cache_keys,
    condition_image_hash,
    encode_with_cache,
    image_content_hash,
    text_cache_key,
)
from rededit.models.text_encoder import MiniLMTextEncoder


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(max_length=32)


def test_key_changes_with_every_component():
    base = {
        "cache_id": "enc:a:v1",
        "text": "Put Picture 1 in Picture 2",
        "reference_hashes": ["h1", "h2"],
        "max_length": 64,
        "dtype": "float32",
        "template": "qwen-image-edit-plus",
    }
    k = text_cache_key(**base)
    assert k == text_cache_key(**base) and len(k) == 64
    variants = [
        {"cache_id": "enc:b:v1"},
        {"cache_id": "enc:a:v2"},  # template version
        {"text": "Put Picture 2 in Picture 1"},  # SIA re-indexed text
        {"text": "Put Picture 1 in Picture 2 "},  # whitespace matters to the tokenizer
        {"reference_hashes": ["h2", "h1"]},  # reference order
        {"reference_hashes": ["h1"]},  # dropped reference
        {"reference_hashes": ["h1", "h3"]},  # different image content
        {"max_length": 65},
        {"dtype": "bfloat16"},
        {"template": "qwen-image-t2i"},  # text-to-image vs edit template
    ]
    keys = {text_cache_key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) and k not in keys
    assert image_content_hash(b"abc") != image_content_hash(b"abd")
    img = torch.zeros(3, 4, 6, dtype=torch.uint8)
    assert condition_image_hash(img) != condition_image_hash(img.reshape(3, 6, 4))  # shape counts
    assert condition_image_hash(img) != condition_image_hash(img + 1)


def test_put_get_round_trip_and_shards(tmp_path):
    cache = TextEmbeddingCache(tmp_path / "c", cache_id="enc", shard_size=2)
    entries = {f"k{i}": torch.randn(i + 1, 8) for i in range(5)}
    entries["bf"] = torch.randn(3, 8).to(torch.bfloat16)
    assert cache.put_many(entries) == 6
    assert len(cache) == 6 and "k3" in cache and "nope" not in cache
    assert len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 3
    for k, v in entries.items():
        got = cache.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v)
    assert cache.get("nope") is None
    assert cache.put_many({"k0": torch.zeros(1, 8)}) == 0  # content keys: existing entries are kept
    # a second handle (another process) sees everything through the index
    other = TextEmbeddingCache(tmp_path / "c", cache_id="enc")
    assert len(other) == 6 and torch.equal(other.get("k4"), entries["k4"])
    assert set(other.get_many(["k1", "nope", "k2"])) == {"k1", "nope", "k2"}
    # a lost index is rebuilt from the shard headers
    (tmp_path / "c" / "index.json").write_text("{broken")
    assert len(TextEmbeddingCache(tmp_path / "c", cache_id="enc")) == 6


def test_cache_id_guard(tmp_path):
    TextEmbeddingCache(tmp_path, cache_id="enc-a")
    with pytest.raises(ValueError, match="allow_mixed"):
        TextEmbeddingCache(tmp_path, cache_id="enc-b")
    TextEmbeddingCache(tmp_path, cache_id="enc-b", allow_mixed=True)
    assert json.loads((tmp_path / "meta.json").read_text())["cache_ids"] == ["enc-a", "enc-b"]


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_corrupt_or_missing_shard_is_a_miss(tmp_path):
    cache = TextEmbeddingCache(tmp_path, cache_id="enc", shard_size=1)
    cache.put_many({"a": torch.randn(4, 8), "b": torch.randn(5, 8), "c": torch.randn(6, 8)})
    shard_a, shard_b = (tmp_path / cache._index[k] for k in ("a", "b"))
    raw = bytearray(shard_a.read_bytes())
    raw[-3] ^= 0xFF  # flip a payload byte: only the checksum can tell
    shard_a.write_bytes(bytes(raw))
    shard_b.write_bytes(shard_b.read_bytes()[:40])  # truncated
    (tmp_path / cache._index["c"]).unlink()
    handler = _ListHandler()
    logger = logging.getLogger("rededit.data.text_cache")
    logger.addHandler(handler)
    try:
        got = cache.get_many(["a", "b", "c"])
    finally:
        logger.removeHandler(handler)
    assert got == {"a": None, "b": None, "c": None}
    assert len(handler.messages) == 3 and all("miss" in m for m in handler.messages)


def test_encode_with_cache_hits_equal_online(minilm, tmp_path):
    texts = ["make the sky purple", "remove the person on the left", "add a red hat to the dog", "sky"]
    direct, dmask = minilm.encode(texts)
    cache = TextEmbeddingCache(tmp_path, cache_id=minilm.cache_id)
    # nothing cached: online, and written back
    emb, mask = encode_with_cache(minilm, texts, None, cache, write_back=True)
    assert torch.equal(mask, dmask) and torch.allclose(emb, direct, atol=1e-6)
    assert len(cache) == 4
    # all hits: the cached unpadded entries reassemble the same padded batch
    emb, mask = encode_with_cache(minilm, texts, None, cache)
    assert torch.equal(mask, dmask) and torch.allclose(emb, direct, atol=1e-6)
    # mixed: two hits + two misses (encoded together online, not written back)
    mixed = [texts[0], "turn the car blue", texts[2], "a brand new instruction about a lighthouse"]
    ref, rmask = minilm.encode(mixed)
    emb, mask = encode_with_cache(minilm, mixed, None, cache)
    assert torch.equal(mask, rmask)
    for i in range(4):  # padding invariance: valid tokens agree across batch compositions
        n = int(mask[i].sum())
        torch.testing.assert_close(emb[i, :n], ref[i, :n], atol=1e-5, rtol=1e-5)
    assert len(cache) == 4


def test_stale_entries_are_never_reused(minilm, tmp_path):
    cache = TextEmbeddingCache(tmp_path, cache_id=minilm.cache_id)
    (key,) = cache_keys(minilm, ["Put Picture 1 in Picture 2"], [[]])
    # a poisoned entry under the right key is returned (proves the lookup path is live) ...
    cache.put_many({key: torch.full((5, 384), 7.0)})
    emb, _ = encode_with_cache(minilm, ["Put Picture 1 in Picture 2"], None, cache)
    assert torch.all(emb == 7.0)
    # ... but any change of text (SIA re-index) or encoder misses it and encodes online
    emb, _ = encode_with_cache(minilm, ["Put Picture 2 in Picture 1"], None, cache)
    assert not torch.any(emb == 7.0)
    other = MiniLMTextEncoder(max_length=16)
    cache2 = TextEmbeddingCache(tmp_path, cache_id=other.cache_id, allow_mixed=True)
    emb, _ = encode_with_cache(other, ["Put Picture 1 in Picture 2"], None, cache2)
    assert not torch.any(emb == 7.0)
    # an entry of the wrong width is a miss, not a crash
    cache.put_many({cache_keys(minilm, ["odd"], [[]])[0]: torch.ones(3, 5)})
    emb, mask = encode_with_cache(minilm, ["odd"], None, cache)
    assert emb.shape[-1] == 384 and mask.sum() == 3


def data_main(argv: list[str]) -> int:
    """The ``rededit-data`` dispatch for this one command (independent of the other commands' modules)."""
    parser = argparse.ArgumentParser(prog="rededit-data")
    data_encode_text.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def _manifest(path: Path) -> Path:
    cols = ["instruction_concise", "instruction_zh"]
    rows = []
    for i, (instr, concise, zh) in enumerate(
        [
            ("make the sky purple", "purple sky", "把天空变成紫色"),
            ("remove the car", None, "去掉汽车"),
            ("make the sky purple", "", None),  # duplicate text: one entry
            ("add snow", "snow", "加雪"),
        ]
    ):
        rows.append(
            {
                "id": f"r{i}",
                "task": "edit",
                "instruction": instr,
                "instruction_concise": concise,
                "instruction_zh": zh,
                "target": "t.png",
                "target_width": 16,
                "target_height": 16,
                "references": ["r.png"],
                "reference_widths": [16],
                "reference_heights": [16],
            }
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema(cols)), path)
    return path


def test_encode_text_cli_resumable(minilm, tmp_path, capsys):
    manifest = _manifest(tmp_path / "manifest.parquet")
    cache_dir = tmp_path / "cache"
    args = [
        "encode-text",
        "--manifest",
        str(manifest),
        "--cache",
        str(cache_dir),
        "--max-length",
        "32",
        "--batch-size",
        "2",
        "--shard-size",
        "3",
        "--no-validate",
    ]
    assert data_main([*args, "--columns", "instruction"]) == 0
    assert "encoded 3, already cached 1, empty skipped 0" in capsys.readouterr().out
    assert data_main(args) == 0  # all default columns: the instructions are already there
    # new: "purple sky", "snow" and the three Chinese texts; empty: two nulls and one ""
    assert "encoded 5, already cached 4, empty skipped 3" in capsys.readouterr().out
    assert data_main(args) == 0
    assert "encoded 0, already cached 9, empty skipped 3" in capsys.readouterr().out
    cache = TextEmbeddingCache(cache_dir, cache_id=minilm.cache_id)
    assert len(cache) == 8
    # the entries are exactly what training would look up
    texts = ["purple sky", "去掉汽车"]
    emb, mask = encode_with_cache(minilm, texts, None, cache)
    direct, dmask = minilm.encode(texts)
    for i in range(2):
        n = int(mask[i].sum())
        assert n == int(dmask[i].sum())
        torch.testing.assert_close(emb[i, :n], direct[i, :n], atol=1e-5, rtol=1e-5)
    assert data_main([*args, "--columns", "nope"]) == 2


def _qwen_corpus(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Qwen2.5-VL folder and a 3-row manifest: a reference at its bucket's shape, one that the tiny
    bucket set crops (100x40 → a 2:1 bucket), and a text-to-image row."""
    import numpy as np
    from PIL import Image

    from test_text_encoder import _build_tiny_qwen

    model_dir = tmp_path / "qwen"
    _build_tiny_qwen(model_dir)
    rng = np.random.default_rng(0)
    sizes = {"a.png": (64, 64), "wide.png": (100, 40), "t.png": (64, 64)}
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)

    def row(i, refs, text):
        return {
            "id": f"r{i}",
            "task": "edit" if refs else "t2i",
            "instruction": text,
            "target": "t.png",
            "target_width": 64,
            "target_height": 64,
            "references": refs,
            "reference_widths": [sizes[r][0] for r in refs],
            "reference_heights": [sizes[r][1] for r in refs],
        }

    rows = [
        row(0, ["a.png"], "make Picture 1 red"),
        row(1, ["wide.png"], "make Picture 1 red"),
        row(2, [], "a red circle on a blue background"),
    ]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema([])), manifest)
    return model_dir, manifest


def _qwen_batches(manifest: Path, enc, cache: Path | None) -> dict[str, tuple[torch.Tensor, list]]:
    """Every row's text embedding (valid tokens) and served references through the training loader."""
    from rededit.data.datamodule import EditDataModule

    dm = EditDataModule(
        str(manifest),
        "tiny",
        4096,
        split=None,
        max_batch_size=1,
        text_encoder=enc,
        text_cache=str(cache) if cache else None,
        world_size=1,
        rank=0,
    )
    dm.setup("fit")
    out = {}
    for batch in dm.train_dataloader():
        assert len(batch["ids"]) == 1
        emb, mask = batch["text_emb"][0], batch["text_mask"][0]
        out[batch["ids"][0]] = (emb[mask], [r[0] for r in batch["references"]])
    return out


def test_qwen_cache_hit_equals_online_encoding(tmp_path, capsys):
    """Parity 2 (issue 19), Qwen-VL path end to end on a tiny random model: ``encode-text`` encodes each
    reference as the training loader serves it (cover-cropped to its bucket), so every training lookup of
    the cache hits and equals the online encoding of the same sample, also for a reference the bucket crops
    (before: the CLI encoded the full image, another condition size and even another number of vision
    tokens). A changed reference image is a miss."""
    from rededit.data.text_cache import cache_keys, condition_image_hash
    from rededit.models.text_encoder import QwenVLTextEncoder

    model_dir, manifest = _qwen_corpus(tmp_path)
    args = [
        "encode-text",
        "--manifest",
        str(manifest),
        "--cache",
        str(tmp_path / "cache"),
        "--encoder",
        "qwen_vl",
        "--encoder-path",
        str(model_dir),
        "--dtype",
        "float32",
        "--max-length",
        "256",
        "--buckets",
        "tiny",
        "--no-validate",
    ]
    assert data_main(args) == 0
    # same text, different reference images: two entries (a caption-keyed cache would have one), + the T2I row
    assert "encoded 3, already cached 0" in capsys.readouterr().out

    enc = QwenVLTextEncoder(str(model_dir), max_length=256, dtype=torch.float32)
    calls = []
    encode_prepared = enc.encode_prepared
    enc.encode_prepared = lambda texts, prepared: calls.append(len(texts)) or encode_prepared(texts, prepared)
    hits = _qwen_batches(manifest, enc, tmp_path / "cache")
    assert calls == [] and sorted(hits) == ["r0", "r1", "r2"]  # every sample a cache hit
    online = _qwen_batches(manifest, enc, None)
    assert sum(calls) == 3
    for rid in hits:
        # same tokens; values equal up to the float noise of the batch the CLI encoded them in (~1e-7)
        assert hits[rid][0].shape == online[rid][0].shape, rid
        torch.testing.assert_close(hits[rid][0], online[rid][0], atol=1e-5, rtol=1e-5)
    # r1's 100x40 (2.5:1) reference is cover-cropped to its bucket (88x48): the text embedding sees that crop
    (served,) = online["r1"][1]
    assert tuple(served.shape[-2:]) == (48, 88)
    from rededit.data.images import load_image, to_tensor

    full = to_tensor(load_image("wide.png", tmp_path))
    assert enc.condition_image(full).shape != enc.condition_image(served).shape
    emb_full = enc.encode_sequences(["make Picture 1 red"], [[full]])[0]
    assert emb_full.shape != hits["r1"][0].shape or not torch.equal(emb_full, hits["r1"][0])
    # the keys are those of the condition images actually encoded; another image is a miss
    cache = TextEmbeddingCache(tmp_path / "cache", cache_id=enc.cache_id)
    (key,) = cache_keys(enc, ["make Picture 1 red"], [[condition_image_hash(enc.condition_image(served))]])
    assert key in cache
    other = torch.rand_like(served) * 2 - 1
    miss, _ = encode_with_cache(enc, ["make Picture 1 red"], None, cache, images=[[other]], write_back=True)
    assert len(cache) == 4 and not torch.equal(miss[0, : hits["r1"][0].shape[0]], hits["r1"][0])
    with pytest.raises(ValueError, match="reference images"):
        encode_with_cache(enc, ["make Picture 1 red"], [["0" * 64]], cache)  # hashes alone cannot encode


def test_training_finds_the_cache_encode_text_writes_by_default(minilm, tmp_path, caplog):
    """``encode-text`` without ``--cache`` writes beside the manifest and ``data.text_cache=auto`` (the
    default) reads it; ``null`` with a cache there trains online and says so. Before, the README's
    ``encode-text ... --cache outputs/data/text_cache`` then ``rededit-train`` silently ignored the cache."""
    from rededit.data.text_cache import default_cache_dir, resolve_cache_dir

    (tmp_path / "corpus").mkdir()
    manifest = _manifest(tmp_path / "corpus" / "manifest.parquet")
    assert resolve_cache_dir("auto", manifest) is None  # nothing there yet: online
    args = ["encode-text", "--manifest", str(manifest), "--max-length", "32", "--no-validate"]
    assert data_main(args) == 0
    beside = default_cache_dir(manifest)
    assert beside == tmp_path / "corpus" / "text_cache" and len(TextEmbeddingCache(beside)) > 0
    assert resolve_cache_dir("auto", manifest) == str(beside)
    assert resolve_cache_dir(tmp_path / "other", manifest) == str(tmp_path / "other")
    with caplog.at_level("WARNING", logger="rededit"):
        assert resolve_cache_dir(None, manifest) is None
    assert "encoding every text online although" in caplog.text and str(beside) in caplog.text


def test_a_cache_that_never_hits_says_so(minilm, tmp_path, caplog, monkeypatch):
    """A cache written for another setup (encoder, or for Qwen-VL other buckets) is all misses: training is
    right but pays the encoder on every step, so the conditioner says so once."""
    from rededit.data import text_conditioning
    from rededit.data.text_conditioning import TextConditioner

    monkeypatch.setattr(text_conditioning, "NO_HIT_WARN_AFTER", 4)
    cond = TextConditioner(minilm, root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    batch = {"ids": ["a", "b"], "texts": ["make it red", "add snow"], "references": []}
    with caplog.at_level("WARNING", logger="rededit"):
        cond(batch)
        assert "none of the first" not in caplog.text
        cond(batch)
        cond(batch)
    assert caplog.text.count("none of the first 4 lookups hit") == 1 and cond.stats == {
        "hits": 0,
        "misses": 6,
    }
    cond.cache.put_many(
        {
            k: v
            for k, v in zip(
                cache_keys(minilm, batch["texts"], [[], []]), minilm.encode_sequences(batch["texts"])
            )
        }
    )
    cond(batch)
    assert cond.stats == {"hits": 2, "misses": 6}
