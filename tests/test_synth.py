"""Synthetic edit corpus (report §2.3 template synthesis, §2.5.2 instruction styles)."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rededit.data.manifest import Manifest
from rededit.data.schema import REQUIRED_COLUMNS, manifest_schema
from rededit.datagen.synth import DEFAULT_TASK_WEIGHTS, TASKS, generate_sample, synthesize, task_schedule
from rededit.datagen.synth.scene import ASPECT_RATIOS, candidate_sizes, render
from rededit.datagen.synth.tasks import SynthConfig, map_box

N, BENCH_N, SEED = 24, 4, 7
SIDES = {"min_side": 64, "max_side": 128}
LOCAL_TASKS = {"add", "remove", "replace", "color", "text", "compose"}
SAME_CANVAS_TASKS = {"add", "remove", "replace", "color", "background", "text"}

try:
    from rededit.data.alignment import find_mentions

    def mentions(text: str) -> set[int]:
        return {m.index for m in find_mentions(text)}

except ImportError:  # pragma: no cover - alignment is a sibling module; keep the check standalone

    def mentions(text: str) -> set[int]:
        pairs = re.findall(r"(?:Picture|Image|Fig\.)\s?(\d+)|图(\d+)", text)
        return {int(a or b) for a, b in pairs}


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("a"), N, SEED, bench_n=BENCH_N, **SIDES)


@pytest.fixture(scope="module")
def rows(corpus) -> list[dict]:
    return pq.read_table(corpus).to_pylist()


def _img(corpus: Path, uri: str) -> Image.Image:
    with Image.open(corpus.parent / uri) as im:
        im.load()
        return im


def test_deterministic_bytes_and_seed_sensitivity(corpus, tmp_path):
    again = synthesize(tmp_path / "b", N, SEED, bench_n=BENCH_N, **SIDES)
    assert again.read_bytes() == corpus.read_bytes()
    assert _tree_hashes(again.parent) == _tree_hashes(corpus.parent)
    other = synthesize(tmp_path / "c", N, SEED + 1, bench_n=BENCH_N, **SIDES)
    assert other.read_bytes() != corpus.read_bytes()
    a, c = _tree_hashes(corpus.parent), _tree_hashes(other.parent)
    assert sum(a.get(k) == v for k, v in c.items()) < len(c) // 4


def test_samples_do_not_depend_on_corpus_size(corpus, tmp_path):
    """Sample i derives only from (seed, stream, i): a shorter corpus is a prefix of a longer one."""
    short = synthesize(tmp_path / "short", N // 2, SEED, bench_n=0, inverse_prob=0.3, **SIDES)
    long_rows = {r["id"]: r for r in pq.read_table(corpus).to_pylist()}
    for r in pq.read_table(short).to_pylist():
        assert r == long_rows[r["id"]]
        assert (short.parent / r["target"]).read_bytes() == (corpus.parent / r["target"]).read_bytes()


def test_schema_is_the_manifest_schema(corpus, rows):
    schema = pq.read_schema(corpus).remove_metadata()
    assert schema.equals(manifest_schema()), schema
    for r in rows:
        assert all(r[c] is not None for c in REQUIRED_COLUMNS)
    manifest = Manifest.open(corpus, validate=False)
    assert not manifest.required_missing()
    try:
        from rededit.data.validate import validate_manifest
    except ImportError:  # pragma: no cover
        return
    assert validate_manifest(manifest, check_files=True) == []


def test_every_task_present_and_schedule_follows_weights(rows):
    train = Counter(r["task"] for r in rows if r["split"] == "train" and r["inverse_of"] is None)
    assert set(train) == set(TASKS)
    assert sum(train.values()) == N
    n = 400
    counts = Counter(task_schedule(0, "train", n, DEFAULT_TASK_WEIGHTS))
    total = sum(DEFAULT_TASK_WEIGHTS.values())
    for task, w in DEFAULT_TASK_WEIGHTS.items():
        assert abs(counts[task] - n * w / total) <= 3, (task, counts[task])
    assert task_schedule(0, "train", 50, {"add": 1.0, "t2i": 0.0}) == ["add"] * 50
    with pytest.raises(ValueError, match="unknown synth tasks"):
        task_schedule(0, "train", 5, {"paint": 1.0})


def test_sizes_match_files_and_buckets_vary(corpus, rows):
    ratios = set()
    for r in rows:
        tgt = _img(corpus, r["target"])
        assert tgt.size == (r["target_width"], r["target_height"])
        assert tgt.width % 32 == 0 and tgt.height % 32 == 0
        ratios.add(tgt.width / tgt.height)
        assert len(r["references"]) == len(r["reference_widths"]) == len(r["reference_heights"])
        for uri, w, h in zip(r["references"], r["reference_widths"], r["reference_heights"]):
            assert _img(corpus, uri).size == (w, h)
        if r["edit_mask"] is not None:
            mask = _img(corpus, r["edit_mask"])
            assert mask.mode == "L" and mask.size == tgt.size
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        boxes = np.asarray(r["object_boxes"], dtype=np.float64).reshape(-1, 4)
        assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 2] <= r["target_width"])
        assert np.all(boxes[:, 1] >= 0) and np.all(boxes[:, 3] <= r["target_height"])
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert len(ratios) >= 3
    compose = [r for r in rows if r["task"] == "compose"]
    assert any(
        (r["reference_widths"][1], r["reference_heights"][1]) != (r["target_width"], r["target_height"])
        for r in compose
    )


def test_every_aspect_ratio_is_drawable():
    table = candidate_sizes(256, 512)
    assert set(table) == set(ASPECT_RATIOS)
    assert table[(16, 9)] and all(w % 32 == 0 and h % 32 == 0 for sizes in table.values() for w, h in sizes)
    assert (512, 288) in table[(16, 9)] and (256, 512) in table[(1, 2)]
    with pytest.raises(ValueError, match="multiple of 32"):
        candidate_sizes(40, 60)


def test_reference_counts_per_task(rows):
    for r in rows:
        k = len(r["references"])
        if r["task"] == "t2i":
            assert (
                k == 0
                and r["edit_mask"] is None
                and r["caption_type"] in {"original", "structured", "instructive"}
            )
        elif r["task"] == "compose":
            assert 2 <= k <= 3
        else:
            assert k == 1, r["id"]
        if r["task"] != "t2i":
            assert r["caption_type"] == "instructive"
            assert r["instruction"] and r["instruction_concise"] and r["instruction_user"]
        assert r["caption"] and r["caption_original"]


def test_picture_mentions_match_references(rows):
    multi = 0
    for r in rows:
        k = len(r["references"])
        en = [r["instruction"], r["instruction_concise"], r["instruction_user"]]
        zh = [r["instruction_zh"], r["instruction_concise_zh"], r["instruction_user_zh"]]
        for text in [t for t in en + zh if t]:
            found = mentions(text)
            if k >= 2:
                assert found == set(range(1, k + 1)), (r["id"], text)
            else:
                assert found <= {1}, (r["id"], text)
        multi += k >= 2
    assert multi > 0


def test_chinese_variants_for_a_fraction(rows):
    zh = [r for r in rows if r["instruction_zh"] is not None]
    assert 0 < len(zh) < len(rows)
    for r in zh:
        assert r["caption_zh"] and re.search(r"[\u4e00-\u9fff]", r["instruction_zh"])
        if r["task"] != "t2i":
            assert r["instruction_concise_zh"] and r["instruction_user_zh"]
        en_pics = mentions(r["instruction"])
        if en_pics:
            assert mentions(r["instruction_zh"]) == en_pics


def test_local_masks_are_exact(corpus, rows):
    """Pixels outside the edit mask are untouched; the mask of a local edit is nonzero but partial."""
    seen = set()
    for r in rows:
        if r["task"] not in SAME_CANVAS_TASKS and r["task"] not in LOCAL_TASKS:
            continue
        mask = np.asarray(_img(corpus, r["edit_mask"])) > 0
        if r["task"] in LOCAL_TASKS:
            assert 0 < mask.sum() < mask.size, r["id"]
        if r["task"] in SAME_CANVAS_TASKS:
            src = np.asarray(_img(corpus, r["references"][0]).convert("RGB"))
            tgt = np.asarray(_img(corpus, r["target"]).convert("RGB"))
            changed = np.any(src != tgt, axis=-1)
            assert changed.any(), r["id"]
            assert not (changed & ~mask).any(), r["id"]
            seen.add(r["task"])
    assert seen == SAME_CANVAS_TASKS


def test_inverse_rows_swap_images(rows):
    by_id = {r["id"]: r for r in rows}
    inverse = [r for r in rows if r["inverse_of"] is not None]
    assert inverse, "no Task Inversion rows at inverse_prob=0.3"
    flip = {
        "add": "remove",
        "remove": "add",
        "color": "color",
        "replace": "replace",
        "background": "background",
    }
    for r in inverse:
        fwd = by_id[r["inverse_of"]]
        assert r["id"] == fwd["id"] + "-inv" and r["split"] == "train"
        assert r["references"] == [fwd["target"]] and r["target"] == fwd["references"][0]
        assert (r["target_width"], r["target_height"]) == (
            fwd["reference_widths"][0],
            fwd["reference_heights"][0],
        )
        assert r["task"] == flip[fwd["task"]]
        assert r["instruction"] != fwd["instruction"]


def test_text_edit_changes_the_sign():
    cfg = SynthConfig(64, 128)
    for i in range(6):
        s = generate_sample(SEED, "train", i, "text", cfg)
        assert s.ocr_target == s.target_scene.plate.text
        assert s.ocr_target != s.source_scene.plate.text
        assert np.array_equal(np.asarray(render(s.source_scene)), np.asarray(s.references[0]))
        assert np.array_equal(np.asarray(render(s.target_scene)), np.asarray(s.target))
        x0, y0, x1, y1 = s.mask.getbbox()  # both strings' glyphs fit on the (unchanged) plate
        px0, py0, px1, py1 = s.target_scene.plate.box
        assert px0 <= x0 and py0 <= y0 and x1 <= px1 and y1 <= py1
        new_words = set(s.ocr_target.split()) - set(s.source_scene.plate.text.split())
        assert new_words and any(w in s.texts.instruction for w in new_words)


def test_text_rows_in_manifest(rows):
    text_rows = [r for r in rows if r["task"] == "text"]
    assert text_rows
    for r in text_rows:
        assert r["ocr_target"] and f'"{r["ocr_target"]}"' in r["caption"]


def test_bench_split_is_disjoint(rows):
    train = {r["id"] for r in rows if r["split"] == "train"}
    bench = [r for r in rows if r["split"] == "bench"]
    assert len(bench) == BENCH_N and all(r["id"].startswith("bench-") for r in bench)
    assert not train & {r["id"] for r in bench}
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["inverse_of"] is None for r in bench)
    assert all(r["source"].startswith("synth/") and isinstance(r["cluster"], int) for r in rows)


@pytest.mark.parametrize("op", ["flip_h", "flip_v", "rot_cw", "rot_ccw", "rot_180"])
def test_map_box_matches_transpose(op):
    from rededit.datagen.synth.tasks import _TRANSPOSE

    w, h = 96, 64
    img = Image.new("L", (w, h), 0)
    box = (10, 5, 30, 41)
    img.paste(255, box)
    out = img.transpose(_TRANSPOSE[op])
    assert out.getbbox() == map_box(box, op, w, h)


def test_cli_runs(tmp_path, monkeypatch, capsys):
    import rededit.cli.data as cli

    # Only this command: sibling commands are built by other modules and are not under test here.
    monkeypatch.setattr(cli, "COMMANDS", ("synth",))
    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--n", "6", "--seed", "3", "--bench-n", "2"]
    args += ["--min-side", "64", "--max-side", "96", "--task-weights", "compose=1,t2i=1"]
    assert cli.main(args) == 0
    table = pq.read_table(out / "manifest.parquet")
    assert table.num_rows == 8
    assert set(table.column("task").to_pylist()) == {"compose", "t2i"}
    assert "wrote 8 rows" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_workers_give_identical_output(corpus, tmp_path):
    par = synthesize(tmp_path / "par", N, SEED, bench_n=BENCH_N, workers=2, **SIDES)
    assert par.read_bytes() == corpus.read_bytes()


def test_synth_refuses_an_existing_corpus_without_overwrite(tmp_path, capsys) -> None:
    # Issue 17 §2: a synth killed over an existing corpus left the old manifest pointing at new images.
    from rededit.cli.data import main as data_main

    out = tmp_path / "corpus"
    args = ["synth", "--out", str(out), "--n", "6", "--bench-n", "0", "--min-side", "64", "--max-side", "64"]
    assert data_main(args) == 0
    before = (out / "manifest.parquet").read_bytes()
    assert data_main([*args, "--seed", "1"]) == 2
    assert "already holds a corpus" in capsys.readouterr().err
    assert (out / "manifest.parquet").read_bytes() == before  # untouched

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # the kill arrives while the new images are written

    import rededit.datagen.synth.writer as writer

    real = writer._run_job
    writer._run_job = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            synthesize(out, n=6, seed=1, bench_n=0, min_side=64, max_side=64, overwrite=True)
    finally:
        writer._run_job = real
    assert not (out / "manifest.parquet").exists()  # no stale manifest over half-new images
    assert data_main([*args, "--seed", "1", "--overwrite"]) == 0
    assert (out / "manifest.parquet").read_bytes() != before
