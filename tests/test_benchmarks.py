"""Benchmark loaders on small fixture folders written here in each public format (never the real files)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rededit.eval.benchmarks import (
    BenchItem,
    GEditBench,
    ImgEditBench,
    REDEditBench,
    SyntheticBench,
    safe_id,
)


def _png_bytes(w: int, h: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ----------------------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory) -> Path:
    from rededit.datagen.synth.writer import synthesize

    return synthesize(
        tmp_path_factory.mktemp("bench_synth"), n=0, seed=0, bench_n=10, min_side=64, max_side=96
    )


def test_synthetic_bench_items_have_exact_ground_truth(synth_manifest) -> None:
    bench = SyntheticBench(synth_manifest)
    assert len(bench) == 10 and bench.has_ground_truth
    kinds = set()
    for item in bench:
        assert item.id.startswith("bench-") and item.target is not None
        if item.task == "t2i":
            assert item.references == []
        else:
            assert item.references and item.edit_mask is not None
            assert item.edit_mask.size == item.target.size and item.edit_mask.mode == "L"
            assert item.category != "t2i"
        if item.task == "text":
            assert item.ocr_target
        if item.object_boxes is not None:
            assert item.object_boxes.ndim == 2 and item.object_boxes.shape[1] == 4
        kinds.add(item.task)
    assert len(kinds) >= 5
    # Same corpus, same hash; restricting tasks changes it.
    assert SyntheticBench(synth_manifest).benchmark_hash == bench.benchmark_hash
    first = bench.records[0]["task"]
    assert SyntheticBench(synth_manifest, tasks=[first]).benchmark_hash != bench.benchmark_hash


def test_synthetic_bench_reversed_reference_order(synth_manifest) -> None:
    """The SIA ablation's test-time permutation: Pictures reversed, mentions re-indexed, nothing else."""
    plain = SyntheticBench(synth_manifest, tasks=["compose"])
    rev = SyntheticBench(synth_manifest, tasks=["compose"], reference_order="reversed")
    a, b = plain[0], rev[0]
    assert len(a.references) >= 2
    assert [r.tobytes() for r in b.references] == [r.tobytes() for r in a.references[::-1]]
    assert b.target.tobytes() == a.target.tobytes() and b.id == a.id
    k = len(a.references)
    assert "Picture 1" in a.instruction or "picture 1" in a.instruction.lower()
    assert b.instruction != a.instruction
    from rededit.data.alignment import reindex

    assert b.instruction == reindex(a.instruction, list(range(k))[::-1], num_refs=k)
    assert rev.benchmark_hash != plain.benchmark_hash
    with pytest.raises(ValueError, match="reference_order"):
        SyntheticBench(synth_manifest, reference_order="shuffled")


def test_synthetic_bench_resizes_to_buckets(synth_manifest) -> None:
    bench = SyntheticBench(synth_manifest, buckets="tiny")
    for item in bench:
        # Every image lands on a 64²-area bucket of the tiny set (sides multiples of 8), mask and boxes too.
        assert item.target.width * item.target.height <= 64 * 64 * 1.2
        assert item.target.width % 8 == 0 and item.target.height % 8 == 0
        if item.edit_mask is not None:
            assert item.edit_mask.size == item.target.size
            assert set(np.unique(np.asarray(item.edit_mask)).tolist()) <= {0, 255}
        if item.object_boxes is not None and len(item.object_boxes):
            b = item.object_boxes
            assert (b[:, 0::2] <= item.target.width + 1e-3).all() and (
                b[:, 1::2] <= item.target.height + 1e-3
            ).all()
    with pytest.raises(ValueError, match="no rows"):
        SyntheticBench(synth_manifest, split="nope")


# ------------------------------------------------------------------------------------------ REDEdit
def _redbench(root: Path) -> Path:
    rows = [
        {
            "id": "1",
            "source": "redbench/add/add-1.png",
            "a_to_b_instructions": "在桌子上加一个杯子",
            "a_to_b_instructions_eng": "Add a cup on the table",
            "task": "add",
        },
        {
            "id": "2",
            "source": "redbench/text/text-1.jpg",
            "a_to_b_instructions": "把招牌上的字改成“你好”",
            "a_to_b_instructions_eng": "Change the sign text to 'hello'",
            "task": "text",
        },
        {
            "id": "3",
            "source": "redbench/background/bg-1.png",
            "a_to_b_instructions": "把背景换成海滩",
            "a_to_b_instructions_eng": "Replace the background with a beach",
            "task": "background",
        },
    ]
    for k, r in enumerate(rows):
        _put(
            root / r["source"],
            _png_bytes(80 + 8 * k, 60, k, "JPEG" if r["source"].endswith("jpg") else "PNG"),
        )
    (root / "redbench.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    prompts = {
        t: f"You are a data rater for {t} edits. editing instruction is : <edit_prompt>."
        for t in ("add", "text", "background")
    }
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def test_redbench_loader(tmp_path) -> None:
    root = _redbench(tmp_path / "rb")
    bench = REDEditBench(root)
    assert len(bench) == 3 and not bench.has_ground_truth
    items = list(bench)
    assert [i.id for i in items] == ["1", "2", "3"]
    assert (
        items[0].instruction == "Add a cup on the table" and items[0].instruction_zh == "在桌子上加一个杯子"
    )
    assert items[1].text("zh").startswith("把招牌") and items[1].text("en").startswith("Change")
    assert items[2].references[0].size == (96, 60) and items[2].references[0].mode == "RGB"
    assert items[2].target is None and items[2].edit_mask is None
    # REDEdit-Bench task keys are the category keys of the default map.
    assert [i.category for i in items] == ["add", "text", "background"]
    assert set(bench.judge_prompts) == {"add", "text", "background"}

    h = bench.benchmark_hash
    _put(root / "redbench/add/add-1.png", _png_bytes(80, 60, 99))
    assert REDEditBench(root).benchmark_hash != h
    assert len(REDEditBench(root, tasks=["text"])) == 1


def test_redbench_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"redbench\.jsonl"):
        REDEditBench(tmp_path)
    root = _redbench(tmp_path / "rb")
    (root / "redbench/text/text-1.jpg").unlink()
    bench = REDEditBench(root)
    with pytest.raises(FileNotFoundError, match=r"text-1\.jpg"):
        bench[1]
    (root / "redbench.jsonl").write_text('{"id": "1", "task": "add"}\n')
    with pytest.raises(ValueError, match=r"redbench.jsonl:1"):
        REDEditBench(root)


# ------------------------------------------------------------------------------------------ ImgEdit
def test_imgedit_loader(tmp_path) -> None:
    root = tmp_path / "Benchmark" / "singleturn"
    data = {
        "1": {"id": "animal/000342021.jpg", "prompt": "Add a hat to the dog.", "edit_type": "add"},
        "2": {"id": "style/000000002.jpg", "prompt": "Make it a watercolour painting.", "edit_type": "style"},
        "3": {
            "id": "x.jpg",
            "image": "human/000000003.jpg",
            "prompt": "Remove the man.",
            "edit_type": "remove",
        },
    }
    for k, row in enumerate(data.values()):
        _put(root / (row.get("image") or row["id"]), _png_bytes(64, 48, k, "JPEG"))
    (root / "singleturn.json").write_text(json.dumps(data))
    (root / "judge_prompt.json").write_text(
        json.dumps({"add": "rate the addition", "style": "rate", "remove": "rate"})
    )

    bench = ImgEditBench(tmp_path / "Benchmark")  # finds singleturn/singleturn.json
    assert len(bench) == 3 and bench.judge_prompts["add"] == "rate the addition"
    items = list(bench)
    assert [i.task for i in items] == ["add", "style", "remove"]
    assert items[2].meta["image"] == "human/000000003.jpg" and items[2].references[0].size == (64, 48)
    assert items[0].category == "add"  # a REDEdit category key
    assert items[1].category in ("style", "stylize")  # unmapped edit types keep their name
    assert len(bench.benchmark_hash) == 64

    (root / "singleturn.json").write_text(json.dumps({"1": {"id": "a.jpg", "prompt": "x"}}))
    with pytest.raises(ValueError, match="edit_type"):
        ImgEditBench(root)


# -------------------------------------------------------------------------------------------- GEdit
def _gedit_rows() -> list[dict]:
    return [
        {"key": "k1", "task_type": "subject-add", "instruction": "Add a bird", "instruction_language": "en"},
        {"key": "k1", "task_type": "subject-add", "instruction": "加一只鸟", "instruction_language": "cn"},
        {
            "key": "k2",
            "task_type": "color_alter",
            "instruction": "Make the car red",
            "instruction_language": "en",
        },
    ]


def test_gedit_parquet_loader(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _gedit_rows()
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            **{c: [r[c] for r in rows] for c in ("task_type", "key", "instruction", "instruction_language")},
            "input_image": pa.array(
                [{"bytes": _png_bytes(72, 40, k), "path": None} for k in range(3)], img_type
            ),
            "Intersection_exist": [True, True, False],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")

    both = GEditBench(tmp_path, language=None)
    assert [r["id"] for r in both.records] == ["subject-add/en/k1", "subject-add/cn/k1", "color_alter/en/k2"]
    cn = both[1]
    assert cn.instruction == "" and cn.instruction_zh == "加一只鸟" and cn.text("en") == "加一只鸟"
    assert cn.references[0].size == (72, 40)
    en = GEditBench(tmp_path, language="en")
    assert len(en) == 2 and en[0].instruction == "Add a bird"
    assert en.benchmark_hash != both.benchmark_hash
    with pytest.raises(ValueError, match="language"):
        GEditBench(tmp_path, language="de")


def test_gedit_jsonl_loader(tmp_path) -> None:
    rows = _gedit_rows()
    for k, r in enumerate(rows):
        r["input_image"] = f"images/{k}.png"
        _put(tmp_path / r["input_image"], _png_bytes(32, 32, k))
    (tmp_path / "gedit.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    bench = GEditBench(tmp_path, language="cn")
    assert len(bench) == 1 and bench[0].meta == {"key": "k1", "language": "cn"}
    with pytest.raises(FileNotFoundError, match="parquet"):
        GEditBench(tmp_path / "images")


# --------------------------------------------------------------------------------------------- misc
def test_safe_id_and_item_resize() -> None:
    assert safe_id("a b/../c") == "a_b/c"
    assert safe_id("subject-add/en/k1") == "subject-add/en/k1"
    with pytest.raises(ValueError):
        safe_id("../..")
    target = Image.new("RGB", (100, 50), "white")
    mask = Image.new("L", (100, 50), 0)
    mask.paste(255, (40, 10, 60, 40))
    item = BenchItem(
        id="x",
        task="add",
        category="add",
        instruction="Add",
        instruction_zh=None,
        references=[Image.new("RGB", (50, 50))],
        target=target,
        edit_mask=mask,
        object_boxes=np.array([[40, 10, 60, 40]], dtype=np.float32),
    )
    small = item.resized((32, 64), [(32, 32)])
    assert small.target.size == (64, 32) and small.references[0].size == (32, 32)
    # Cover-resize of 100x50 to 64x32 is a pure 0.64 scale: the box scales with the mask.
    np.testing.assert_allclose(small.object_boxes, [[25.6, 6.4, 38.4, 25.6]], atol=1e-4)
    _, xs = np.nonzero(np.asarray(small.edit_mask))
    assert 25 <= xs.min() <= 26 and 37 <= xs.max() <= 38
    assert item.target.size == (100, 50)  # the original is untouched
    with pytest.raises(ValueError, match="references"):
        item.resized((32, 64), [])


def test_a_benchmark_folder_cannot_name_files_outside_itself(tmp_path) -> None:
    """The attack: a benchmark jsonl row with ``source: ../../<file>`` was read silently."""
    from rededit.data.uri import PathOutsideRootError

    root = _redbench(tmp_path / "rb")
    _put(tmp_path / "private.png", _png_bytes(8, 8, 1))
    rows = [json.loads(x) for x in (root / "redbench.jsonl").read_text().splitlines()]
    rows[0]["source"] = "../private.png"
    (root / "redbench.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    bench = REDEditBench(root)
    with pytest.raises(PathOutsideRootError, match=r"'\.\./private\.png' names a file outside"):
        bench[0]
    assert bench[1].id == "2"  # the other items load (rededit-eval records the bad one and goes on)
