"""Long-tail check-and-fill (report §2.4): instruction index, density report, gap query, image retrieval, fill."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rededit.data.manifest import Manifest
from rededit.data.schema import manifest_schema
from rededit.datagen.engine.longtail import (
    ColourLayoutEmbedder,
    HashingTextEncoder,
    InstructionIndex,
    build_image_index,
    build_instruction_index,
    cluster_embeddings,
    density_report,
    fill_from_report,
    fill_gap,
    query_images,
)

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}


class ColourWordEmbedder:
    """Deterministic joint text/image embedding: mean RGB of an image; a colour word's RGB for a text."""

    embedder_id = "test-colour-words"

    def encode_images(self, images):
        return np.stack(
            [np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0) - 100.0 for im in images]
        )

    def encode(self, texts):
        out = []
        for t in texts:
            rgb = next(v for k, v in COLOURS.items() if k in t.lower())
            out.append(np.asarray(rgb, np.float32) - 100.0)
        return np.stack(out)


def _rows(tasks_texts):
    rows = []
    for i, (task, text) in enumerate(tasks_texts):
        rows.append({f.name: None for f in manifest_schema()} | {
            "id": f"r{i}", "task": task, "instruction": text, "target": "t.png", "target_width": 8,
            "target_height": 8, "references": ["s.png"], "reference_widths": [8], "reference_heights": [8],
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=manifest_schema())


def _skewed():
    data = [
        ("color", f"change the colour of the {c} circle to {d}") for c in COLOURS for d in COLOURS if c != d
    ]
    data += [("add", f"add a {c} square on the left") for c in COLOURS] * 2
    data += [("viewpoint", "flip the image horizontally")]
    return _rows(data)


def test_hashing_encoder_is_deterministic_and_lexical():
    enc = HashingTextEncoder(64)
    a, b = enc.encode(["add a red square", "add a red square"]), enc.encode(["remove the blue circle"])
    assert a.shape == (2, 64) and np.array_equal(a[0], a[1]) and np.any(a[0] != b[0])
    zh = enc.encode(["添加红色方块", "删除蓝色圆形"])
    assert np.count_nonzero(zh[0]) > 3  # Han characters are tokens, not one opaque word


def test_index_density_report_and_gap_query(tmp_path):
    table = _skewed().append_column(
        "drop_reason", pa.array([None] * 19 + ["dedup:exact"] + [None] * 1, pa.string())
    )
    enc = HashingTextEncoder(128)
    idx = build_instruction_index(table, tmp_path / "idx", enc)
    assert idx.info["n_entries"] == 20 and idx.info["n_rows"] == 20  # the dropped row is not indexed
    loaded = InstructionIndex.load(tmp_path / "idx")
    assert loaded.index.ntotal == 20 and loaded.info["embedder_id"] == enc.embedder_id
    assert np.allclose(np.linalg.norm(loaded.embeddings(), axis=1), 1.0, atol=1e-5)
    assert not list((tmp_path / "idx").glob(".*.tmp"))  # atomic writes leave no temp files

    rep = density_report(tmp_path / "idx", n_clusters=3, min_per_task=5, min_per_cluster=2,
                         expected_tasks=["remove"], seed=0)  # fmt: skip
    by_task = {r["task"]: r for r in rep["tasks"]}
    assert by_task["color"]["rows"] == 12 and not by_task["color"]["gap"]
    assert (
        by_task["viewpoint"]["rows"] == 1
        and by_task["viewpoint"]["gap"]
        and by_task["viewpoint"]["need"] == 4
    )
    assert by_task["remove"]["rows"] == 0 and by_task["remove"]["gap"]  # expected but absent
    assert {g["task"] for g in rep["gaps"] if g["kind"] == "task"} == {"viewpoint", "remove"}
    assert sum(c["entries"] for c in rep["clusters"]) == 20
    md = (tmp_path / "idx" / "report.md").read_text()
    assert "| viewpoint | 1 |" in md and "**gap**" in md
    assert json.loads((tmp_path / "idx" / "report.json").read_text())["gaps"] == json.loads(
        json.dumps(rep["gaps"])
    )
    # same seed → same clusters
    assert (
        density_report(tmp_path / "idx", n_clusters=3, min_per_task=5, min_per_cluster=2, seed=0)["clusters"]
        == rep["clusters"]
    )

    q = loaded.density(["flip the image horizontally", "change the colour of the red circle to blue"], enc,
                       radius=0.5, min_count=3)  # fmt: skip
    assert q[0]["count"] == 1 and q[0]["gap"] and q[0]["tasks"] == {"viewpoint": 1}
    assert q[1]["count"] >= 3 and not q[1]["gap"] and set(q[1]["tasks"]) == {"color"}
    assert q[1]["nearest"][0][1] == "r1" and q[1]["nearest"][0][0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="built with"):
        loaded.density(["x"], HashingTextEncoder(64))
    with pytest.raises(ValueError, match="no column"):
        build_instruction_index(table, tmp_path / "bad", enc, columns=["nope"])


def test_compressed_index_and_sampled_report(tmp_path):
    """The scale-out path: a trained FAISS factory index, k-means on a sample, chunked assignment."""
    table = _skewed()
    enc = HashingTextEncoder(64)
    idx = build_instruction_index(table, tmp_path / "ivf", enc, index_factory="IVF2,Flat", train_size=21)
    assert (
        idx.info["index_factory"] == "IVF2,Flat"
        and InstructionIndex.load(tmp_path / "ivf").index.ntotal == 21
    )
    rep = density_report(tmp_path / "ivf", n_clusters=3, min_per_task=5, max_train_points=10, chunk_size=4)
    assert sum(c["entries"] for c in rep["clusters"]) == 21 and rep["n_rows"] == 21
    assert {r["task"]: r["rows"] for r in rep["tasks"]} == {"color": 12, "add": 8, "viewpoint": 1}
    flat = density_report(
        build_instruction_index(table, tmp_path / "flat", enc).folder, n_clusters=3, min_per_task=5
    )
    assert flat["tasks"] == rep["tasks"]
    q = InstructionIndex.load(tmp_path / "ivf").density(["flip the image horizontally"], enc, radius=0.9)
    assert q[0]["tasks"] == {"viewpoint": 1}


def test_cluster_embeddings_separates_groups():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 16)) * 0.05 + np.eye(16)[0]
    b = rng.normal(size=(20, 16)) * 0.05 + np.eye(16)[1]
    assign, cent = cluster_embeddings(np.concatenate([a, b]), 2, seed=1)
    assert cent.shape == (2, 16) and len(set(assign[:20])) == 1 and len(set(assign[20:])) == 1
    assert assign[0] != assign[20]
    assert cluster_embeddings(a[:3], 10, seed=1)[1].shape[0] == 3  # k capped at N


def test_image_query_by_text_and_seed_image(tmp_path):
    uris = []
    for name, rgb in COLOURS.items():
        for j in range(2):
            img = Image.new("RGB", (16, 16), tuple(max(0, v - 10 * j) for v in rgb))
            uris.append(f"pool/{name}{j}.png")
            (tmp_path / "pool").mkdir(exist_ok=True)
            img.save(tmp_path / uris[-1])
    emb = ColourWordEmbedder()
    build_image_index(uris, tmp_path, emb, tmp_path / "img_idx")
    hits = query_images(tmp_path / "img_idx", emb, text="a street with a yellow car", k=2)
    assert {u for u, _ in hits} == {"pool/yellow0.png", "pool/yellow1.png"}
    seed = Image.new("RGB", (16, 16), COLOURS["green"])
    assert query_images(tmp_path / "img_idx", emb, image=seed, k=1)[0][0] == "pool/green0.png"
    # the model-free descriptor does image→image but has no text side
    cl = ColourLayoutEmbedder(grid=4)
    build_image_index(uris, tmp_path, cl, tmp_path / "cl_idx")
    assert query_images(tmp_path / "cl_idx", cl, image=seed, k=1)[0][0] == "pool/green0.png"
    with pytest.raises(ValueError, match="no text side"):
        query_images(tmp_path / "cl_idx", cl, text="green")
    with pytest.raises(ValueError, match="exactly one"):
        query_images(tmp_path / "cl_idx", cl)
    with pytest.raises(ValueError, match="built with"):
        query_images(tmp_path / "cl_idx", emb, image=seed)


def test_fill_gap_appends_synth_rows_atomically_and_resumes(tiny_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.parent, corpus)
    path = corpus / "manifest.parquet"
    old = pq.read_table(path)
    old = old.append_column("drop_reason", pa.array([None] * old.num_rows, pa.string()))
    pq.write_table(old, path)  # an engine-processed manifest with an extra column
    res = fill_gap(path, "viewpoint", 3, seed=5, min_side=64, max_side=64, zh_prob=0.0)
    assert res.n_added == 3 and not res.skipped
    new = pq.read_table(path)
    assert new.num_rows == old.num_rows + 3
    assert new.slice(0, old.num_rows).equals(old)  # old rows untouched, in order
    added = new.slice(old.num_rows).to_pylist()
    assert all(r["task"] == "viewpoint" and r["id"].startswith("fill-viewpoint-s5-") for r in added)
    assert all(r["source"].endswith("/longtail-fill") and r["drop_reason"] is None for r in added)
    assert len(set(new.column("id").to_pylist())) == new.num_rows
    # the appended rows resolve and validate like any other
    assert len(Manifest.open(path, check_files=True)) == new.num_rows
    # re-running the same fill adds nothing (resume after an interruption)
    again = fill_gap(path, "viewpoint", 3, seed=5, min_side=64, max_side=64)
    assert again.skipped and pq.read_table(path).num_rows == new.num_rows
    with pytest.raises(ValueError, match="no synthetic template"):
        fill_gap(path, "portrait", 3, seed=5)
    # fill from a report: only task gaps with a template are filled, capped
    rep = {"gaps": [{"kind": "task", "task": "text", "rows": 1, "need": 50}, {"kind": "task", "task": "portrait", "rows": 0, "need": 9},
                    {"kind": "cluster", "cluster": 0, "task": "add", "rows": 1, "need": 3}]}  # fmt: skip
    out = fill_from_report(path, rep, seed=1, max_per_task=2, min_side=64, max_side=64)
    assert [(r.task, r.n_added) for r in out] == [("text", 2)]


def test_longtail_cli(tiny_corpus, tmp_path, capsys, monkeypatch):
    import rededit.cli.data as cli
    from rededit.cli.data import main

    monkeypatch.setattr(cli, "COMMANDS", ("longtail",))  # only this command is under test

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.parent, corpus)
    m, idx = corpus / "manifest.parquet", tmp_path / "idx"
    n_before = pq.read_table(m).num_rows
    assert main(["longtail", "index", "--manifest", str(m), "--out", str(idx), "--embedder", "hashing:64",
                 "--columns", "instruction,instruction_concise"]) == 0  # fmt: skip
    assert main(["longtail", "report", "--index", str(idx), "--clusters", "4", "--min-per-task", "6",
                 "--tasks", "add,remove,portrait"]) == 0  # fmt: skip
    rep = json.loads((idx / "report.json").read_text())
    assert "portrait" in {g["task"] for g in rep["gaps"]}
    capsys.readouterr()
    assert main(["longtail", "query", "--index", str(idx), "--embedder", "hashing:64", "--text", "rotate the image",
                 "--radius", "0.3", "--min-count", "1"]) == 0  # fmt: skip
    q = json.loads(capsys.readouterr().out)
    assert q[0]["query"] == "rotate the image" and q[0]["nearest"]
    assert main(["longtail", "fill", "--manifest", str(m), "--report", str(idx / "report.json"), "--n", "1",
                 "--min-side", "64", "--max-side", "64"]) == 0  # fmt: skip
    n_task_gaps = sum(g["kind"] == "task" and g["task"] != "portrait" for g in rep["gaps"])
    assert pq.read_table(m).num_rows == n_before + n_task_gaps
    assert main(["longtail", "index", "--manifest", str(m), "--out", str(tmp_path / "img"), "--images"]) == 0
    capsys.readouterr()
    target = corpus / pq.read_table(m).column("target")[0].as_py()
    assert (
        main(["longtail", "query", "--index", str(tmp_path / "img"), "--image", str(target), "--k", "1"]) == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert main(["longtail", "query", "--index", str(tmp_path / "nope"), "--text", "x"]) == 2
    assert main(["longtail", "fill", "--manifest", str(m), "--task", "add"]) == 2  # --n missing


@pytest.mark.slow
def test_minilm_index_finds_paraphrases(tmp_path):
    """The embedded MiniLM encoder measures density by meaning: a paraphrase with no shared content word
    still lands in the radius, where the lexical hashing encoder sees nothing."""
    from rededit.datagen.engine.longtail import MiniLMSentenceEncoder

    table = _rows([("remove", "erase the dog from the photo"), ("remove", "delete the dog"),
                   ("color", "make the car red"), ("stylize", "turn it into a watercolour painting")])  # fmt: skip
    enc = MiniLMSentenceEncoder()
    idx = build_instruction_index(table, tmp_path / "m", enc)
    assert idx.info["dim"] == 384 and idx.info["embedder_id"].startswith("minilm:")
    q = idx.density(["get rid of the puppy in the picture"], enc, radius=0.5, min_count=2)[0]
    assert q["tasks"] == {"remove": 2} and not q["gap"]
    h = HashingTextEncoder(256)
    hidx = build_instruction_index(table, tmp_path / "h", h)
    assert hidx.density(["get rid of the puppy in the picture"], h, radius=0.5)[0]["count"] == 0


def _tiny_clip(folder):
    """A tiny random CLIP (transformers) + word-level tokenizer saved like a real local checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "red", "green", "blue", "yellow", "street", "with", "car"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        folder
    )
    cfg = CLIPConfig(
        text_config={"vocab_size": len(words), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )  # fmt: skip
    CLIPModel(cfg).eval().save_pretrained(folder)


@pytest.mark.slow
def test_clip_joint_embedder_tiny_random_checkpoint(tmp_path):
    from rededit.datagen.engine.filters.embedders import PixelEmbedder
    from rededit.datagen.engine.longtail import CLIPJointEmbedder, EngineImageEmbedder

    _tiny_clip(tmp_path / "clip")
    emb = CLIPJointEmbedder(tmp_path / "clip", input_size=32)
    (tmp_path / "pool").mkdir()
    uris = []
    for name, rgb in COLOURS.items():
        uris.append(f"pool/{name}.png")
        Image.new("RGB", (40, 30), rgb).save(tmp_path / uris[-1])
    build_image_index(uris, tmp_path, emb, tmp_path / "idx")
    t = emb.encode(["a red car", "a street with a blue car"])
    assert t.shape == (2, 8) and np.allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(t, emb.encode(["a red car", "a street with a blue car"]))
    hits = query_images(tmp_path / "idx", emb, text="a red car", k=4)
    assert sorted(u for u, _ in hits) == sorted(uris) and all(-1.0 <= s <= 1.0 + 1e-5 for _, s in hits)
    seed = Image.open(tmp_path / "pool/blue.png")
    assert query_images(tmp_path / "idx", emb, image=seed, k=1)[0][0] == "pool/blue.png"
    # the id follows the files, not the folder path
    shutil.copytree(tmp_path / "clip", tmp_path / "moved")
    assert CLIPJointEmbedder(tmp_path / "moved", input_size=32).embedder_id == emb.embedder_id
    # any dedup-stage embedder plugs in for image→image
    px = EngineImageEmbedder(PixelEmbedder(size=8))
    build_image_index(uris, tmp_path, px, tmp_path / "px")
    assert query_images(tmp_path / "px", px, image=seed, k=1)[0][0] == "pool/blue.png"
    with pytest.raises(FileNotFoundError):
        CLIPJointEmbedder(tmp_path / "nope")
