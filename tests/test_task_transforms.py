"""Task Inversion and Task Splitting manifest transforms (report §2.3) on constructed manifests."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rededit.data.manifest import Manifest
from rededit.data.schema import manifest_schema
from rededit.datagen.engine.captioning import CaptionStage
from rededit.datagen.engine.stage import StageContext
from rededit.datagen.engine.transforms import (
    TaskSplitStage,
    invert_instruction,
    invert_tasks,
    split_instruction,
    split_tasks,
)
from rededit.scoring.judges.vlm import VLMJudge


class _FixedJudge(VLMJudge):
    judge_id = "fixed"

    def generate(self, images, prompt):
        assert len(images) == 2  # swapped source + target
        return "Change the background back to white."


def _row(i, task, text, refs=("s.png",), **extra):
    return {f.name: None for f in manifest_schema()} | {
        "id": f"r{i}", "task": task, "instruction": text, "target": f"t{i}.png", "target_width": 64,
        "target_height": 48, "references": list(refs), "reference_widths": [32] * len(refs),
        "reference_heights": [24] * len(refs), "source": "real", "cluster": 7,
    } | extra  # fmt: skip


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("add", "Add a red circle in the upper left.", "Remove the red circle in the upper left."),
        ("add", "Insert a red circle into Picture 1, in the upper left.", "Remove the red circle from Picture 1, in the upper left."),
        ("remove", "Delete the orange square at the top and fill the area with the background.", "Add an orange square at the top."),
        ("remove", "Could you help me remove the red circle?", "Could you help me add a red circle?"),
        ("add", "在图1中左上角画一个红色圆形，其他内容保持不变。", "删除图1中左上角的红色圆形，其他内容保持不变。"),
        ("remove", "去掉左上角的红色圆形，用背景填补该区域。", "在左上角添加一个红色圆形。"),
        ("replace", "Replace the red circle with a blue square.", "Replace the blue square with a red circle."),
        ("replace", "把左上角的红色圆形替换成蓝色方块。", "把左上角的蓝色方块替换成红色圆形。"),
        ("color", "Change the colour of the red circle to blue.", "Change the colour of the blue circle to red."),
        ("color", "把红色圆形改成蓝色", "把蓝色圆形改成红色"),
        ("text", 'Change "OPEN" to "SALE" on the sign.', 'Change "SALE" to "OPEN" on the sign.'),
        ("replace", "square → circle", "circle → square"),
        ("replace", "将左上角的红色圆形换成同样大小的蓝色方块。", "将左上角的蓝色方块换成同样大小的红色圆形。"),
        ("replace", "make the circle a square", "make the square a circle"),
        ("add", "a black heart in the centre", "no black heart in the centre"),
        ("remove", "no heart", "add a heart"),
        ("color", "make the circle blue", None),  # the old colour is not named: no rule, caption from images
        ("background", "Change the background to plain red.", None),
    ],
)  # fmt: skip
def test_invert_instruction(task, text, expected):
    assert invert_instruction(text, task) == expected


def test_invert_tasks_swaps_images_and_marks_pending(tmp_path):
    rows = [
        _row(
            0, "add", "Add a red circle.", instruction_zh="加一个红色圆形", instruction_concise="add circle"
        ),
        _row(1, "background", "Change the background to plain red."),
        _row(2, "stylize", "Make it a sketch."),  # not invertible
        _row(3, "add", "Add a cat.", refs=("a.png", "b.png")),  # multi-reference
        _row(4, "remove", "Remove the cat."),
        _row(5, "add", "Add a dog.", inverse_of="r4"),  # already an inverse (of r4)
    ]
    table = pa.Table.from_pylist(rows, schema=manifest_schema())
    table = table.append_column("drop_reason", pa.array([None] * 6, pa.string()))
    out, rep = invert_tasks(table, prob=1.0, seed=0)
    assert rep["added"] == 2 and rep["pending_text"] == 1
    assert rep["skipped"] == {
        "task not invertible": 1,
        "not exactly one reference": 1,
        "is an inverse": 1,
        "already inverted": 1,
    }
    assert out.slice(0, 6).drop(["inversion_text"]).equals(table)  # original rows untouched
    new = {r["id"]: r for r in out.slice(6).to_pylist()}
    inv = new["r0-inv"]
    assert inv["task"] == "remove" and inv["inverse_of"] == "r0"
    assert inv["target"] == "s.png" and inv["references"] == ["t0.png"]
    assert (inv["target_width"], inv["target_height"]) == (32, 24) and inv["reference_widths"] == [64]
    assert inv["instruction"] == "Remove the red circle." and inv["instruction_zh"] == "去掉红色圆形"
    assert inv["instruction_concise"] == "remove circle" and inv["inversion_text"] == "rule"
    assert inv["drop_reason"] is None and inv["cluster"] is not None and inv["cluster"] != 7
    bg = new["r1-inv"]
    assert bg["instruction"] is None and bg["inversion_text"] == "pending"  # left for the captioner
    # running again adds nothing (idempotent) and prob selects deterministically
    again, rep2 = invert_tasks(out, prob=1.0)
    assert rep2["added"] == 0 and again.num_rows == out.num_rows
    half = [invert_tasks(table, prob=0.5, seed=s)[1]["added"] for s in range(6)]
    assert half == [invert_tasks(table, prob=0.5, seed=s)[1]["added"] for s in range(6)]
    assert min(half) < 2 or max(half) > 0
    # a pending row has no text yet: invalid until captioned; without a captioner leave such rows out
    path = tmp_path / "m.parquet"
    pq.write_table(out, path)
    with pytest.raises(ValueError, match="r1-inv"):
        Manifest.open(path)
    ruled, rep3 = invert_tasks(table, prob=1.0, keep_pending=False)
    assert rep3["added"] == 1 and rep3["skipped"]["no rule for the instruction"] == 1
    pq.write_table(ruled, path)
    assert len(Manifest.open(path)) == 7
    # the captioning engine fills the pending text from the swapped images
    for name in ("s.png", "t1.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    stage = CaptionStage(backend=_FixedJudge(), fields=["instruction"], cache_dir=str(tmp_path / "cache"))
    ctx = StageContext(root=tmp_path, seed=0, stage_dir=tmp_path / "st", partition="p")
    filled = stage.process(out.slice(7), ctx).to_pylist()[0]
    assert filled["id"] == "r1-inv" and filled["instruction"] == "Change the background back to white."


def test_split_instruction():
    assert split_instruction("Add a red square on the left, then remove the blue circle.") == [
        "Add a red square on the left",
        "Remove the blue circle",
    ]
    assert split_instruction("make the sky pink and add a moon") == ["make the sky pink", "add a moon"]
    assert split_instruction("Turn the car red; rotate the image by 90 degrees. After that, add a hat.") == [
        "Turn the car red",
        "Rotate the image by 90 degrees",
        "Add a hat",
    ]
    assert split_instruction("先把天空改成粉色，然后加一个月亮，再去掉树。") == [
        "先把天空改成粉色",
        "加一个月亮",
        "去掉树",
    ]
    one = "Add the square of Picture 2 and the circle of Picture 3 to Picture 1."
    assert split_instruction(one) == [one]  # one operation with two objects stays whole
    assert split_instruction(None) == [] and split_instruction("  ") == []


def test_split_stage_marks_and_split_tasks_decomposes(tmp_path):
    for name, size in (("s.png", (32, 24)), ("mid.png", (40, 30)), ("t0.png", (64, 48))):
        Image.new("RGB", size).save(tmp_path / name)
    rows = [
        _row(0, "compose", "Add a red square, then make the background blue.", intermediates=None),
        _row(1, "add", "Add a hat."),
        _row(2, "compose", "Add a cat and remove the dog."),  # composite, no intermediates
        _row(3, "compose", "Add a cat, then remove the dog, then flip it."),  # wrong number of intermediates
    ]
    table = pa.Table.from_pylist(
        [{k: v for k, v in r.items() if k != "intermediates"} for r in rows], schema=manifest_schema()
    )
    table = table.append_column(
        "intermediates", pa.array([["mid.png"], None, None, ["mid.png"]], pa.list_(pa.string()))
    )
    table = table.append_column("drop_reason", pa.array([None, None, None, None], pa.string()))
    ctx = StageContext(root=tmp_path, seed=0, stage_dir=tmp_path / "st", partition="p")
    marked = TaskSplitStage().process(table, ctx)
    assert marked.column("n_edit_steps").to_pylist() == [2, 1, 2, 3]
    assert marked.column("edit_steps")[0].as_py() == ["Add a red square", "Make the background blue"]
    assert marked.num_rows == 4 and marked.column("drop_reason").null_count == 4
    capped = TaskSplitStage(max_steps=2, drop_over_max=True).process(table, ctx)
    assert capped.column("drop_reason").to_pylist() == [None, None, None, "split:too_many_steps"]

    out, rep = split_tasks(marked, tmp_path, drop_parent=True)
    assert rep == {"composite": 3, "split": 1, "added": 2,
                   "skipped": {"no intermediate images": 1, "intermediates do not match steps": 1}}  # fmt: skip
    steps = out.slice(4).to_pylist()
    assert [s["id"] for s in steps] == ["r0-step0", "r0-step1"]
    assert steps[0]["references"] == ["s.png"] and steps[0]["target"] == "mid.png"
    assert (steps[0]["target_width"], steps[0]["target_height"]) == (40, 30)  # read from the image
    assert steps[1]["references"] == ["mid.png"] and steps[1]["reference_widths"] == [40]
    assert steps[1]["target"] == "t0.png" and steps[1]["instruction"] == "Make the background blue"
    assert all(s["split_of"] == "r0" and s["drop_reason"] is None for s in steps)
    assert out.column("drop_reason").to_pylist()[:4] == ["split:decomposed", None, None, None]
    assert split_tasks(out, tmp_path)[1]["added"] == 0  # idempotent
    with pytest.raises(ValueError, match="no 'edit_steps'"):
        split_tasks(table, tmp_path)


def test_transform_cli_on_synth_corpus(tiny_corpus, tmp_path, capsys, monkeypatch):
    import json
    import shutil

    import rededit.cli.data as cli
    from rededit.cli.data import main

    monkeypatch.setattr(cli, "COMMANDS", ("transform",))  # only this command is under test

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.parent, corpus)
    m = corpus / "manifest.parquet"
    before = pq.read_table(m)
    capsys.readouterr()
    assert main(["transform", "invert", "--manifest", str(m), "--out", str(m), "--no-pending"]) == 0
    rep = json.loads(capsys.readouterr().out)
    after = pq.read_table(m)
    assert (
        rep["rows_in"] == before.num_rows
        and after.num_rows == before.num_rows + rep["added"] > before.num_rows
    )
    assert rep["skipped"].get("already inverted", 0) > 0  # the synth writer's own inversions are respected
    assert len(Manifest.open(m, check_files=True)) == after.num_rows
    assert main(["transform", "split", "--manifest", str(m), "--out", str(corpus / "split.parquet")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["added"] == 0 and "n_edit_steps" in pq.read_table(corpus / "split.parquet").column_names
    assert main(["transform", "invert", "--manifest", str(tmp_path / "nope.parquet"), "--out", str(m)]) == 2
