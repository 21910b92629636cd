"""Levers of the demo issue: edit-region loss weighting, the synthetic world's complexity knob, the colour
text-following check, and the learnability benchmark's smoke run."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rededit.data.manifest import Manifest
from rededit.datagen.synth.scene import OBJECT_COLOURS, colour_distance
from rededit.datagen.synth.tasks import SynthConfig
from rededit.datagen.synth.writer import synthesize
from rededit.eval.text_following import colour_text_following, counterfactual, follows, nearest_colour
from rededit.flow.weighting import region_weights

ROOT = Path(__file__).resolve().parents[1]
COLOUR = {c.name: c for c in OBJECT_COLOURS}


# ------------------------------------------------------------------------------------ region weighting
def test_region_weights_move_weight_into_the_edit_and_keep_each_sample_at_mean_one() -> None:
    mask = torch.zeros(3, 1, 16, 16)
    mask[0, :, :4, :4] = 1  # a local edit (1/16 of the picture)
    mask[1] = 1  # a whole-image edit
    mask[2] = 1  # no mask: the collate fills ones
    batch = {"edit_mask": mask, "has_edit_mask": torch.tensor([True, True, False])}
    w = region_weights(batch, 5.0, (8, 8))
    assert w.shape == (3, 1, 8, 8)
    assert torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(3))
    inside, outside = w[0, 0, 0, 0], w[0, 0, 7, 7]
    assert torch.isclose(inside / outside, torch.tensor(6.0))  # 1 + α
    assert torch.allclose(w[1], torch.ones_like(w[1])) and torch.allclose(w[2], torch.ones_like(w[2]))


def _stage(**kwargs):
    """A bare stage (no backbone built) with ``kwargs``: enough to check its option handling."""
    from rededit.stages.base import BaseStage

    return BaseStage(
        backbone=lambda **_: None,
        vae=torch.nn.Identity(),
        timesteps=None,
        optimizer=torch.optim.AdamW,
        **kwargs,
    )


def test_region_weight_is_taken_out_of_the_sigma_weighting() -> None:
    with pytest.raises(ValueError, match="region_weight"):
        _stage(weighting={"scheme": "uniform", "region_weight": -1})
    stage = _stage(weighting={"scheme": "x0_mse", "region_weight": 3})
    assert stage.region_weight == 3.0 and stage.weighting == {"scheme": "x0_mse"}


# ------------------------------------------------------------------------------------ synthetic world
def _object_counts(manifest_path: Path) -> list[int]:
    m = Manifest.open(manifest_path)
    return [len(m.row(i).get("object_boxes") or []) // 4 for i in range(len(m))]


def test_max_objects_caps_every_scene_and_the_default_is_unchanged(tmp_path) -> None:
    assert SynthConfig().max_objects == 4 and SynthConfig(max_objects=2).objects(4) == 2
    assert SynthConfig(max_objects=2).objects(2, reserved=1) == 1
    with pytest.raises(ValueError, match="max_objects"):
        SynthConfig(max_objects=0)
    simple = synthesize(tmp_path / "simple", n=60, seed=3, bench_n=0, min_side=64, max_side=64, max_objects=2)
    counts = _object_counts(simple)
    assert max(counts) <= 2 and min(counts) >= 0
    # The default knob draws exactly what the corpus always drew (byte-identical files).
    a = synthesize(tmp_path / "a", n=20, seed=5, bench_n=0, min_side=64, max_side=96)
    synthesize(tmp_path / "b", n=20, seed=5, bench_n=0, min_side=64, max_side=96, max_objects=4)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "images").rglob("*.png"))
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert max(_object_counts(a)) > 2  # the full world does have busier scenes


# ------------------------------------------------------------------------------------ text following
def test_counterfactual_rewrites_the_ground_truth_colour_only() -> None:
    text = "Paint the orange square in the centre of Picture 1 purple; leave the rest as it is."
    out = counterfactual(text, COLOUR["orange"], COLOUR["purple"], "row-1")
    assert out is not None
    new, asked = out
    assert asked.name not in ("orange", "purple") and "purple" not in new and "orange square" in new
    assert f" {asked.name};" in new
    assert colour_distance(asked, COLOUR["orange"]) >= 110 and colour_distance(asked, COLOUR["purple"]) >= 110
    assert counterfactual(text, COLOUR["orange"], COLOUR["purple"], "row-1") == out  # deterministic
    # The ground truth's colour must be named exactly once, and differ from the source's.
    assert counterfactual("Make it nicer.", COLOUR["orange"], COLOUR["purple"], "k") is None
    assert counterfactual("purple to purple", COLOUR["orange"], COLOUR["purple"], "k") is None
    assert counterfactual("Paint it red.", COLOUR["red"], COLOUR["red"], "k") is None


def _colour_sample(i: int) -> dict:
    src_c, gt_c = COLOUR["red"], COLOUR["blue"]
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1

    def paint(c):
        img = torch.full((3, 16, 16), 0.6)
        rgb = torch.tensor(c.rgb, dtype=torch.float32) / 127.5 - 1
        return torch.where(mask.bool(), rgb[:, None, None], img)

    return {
        "id": f"c{i}",
        "task": "color",
        "text": "Recolour the red square blue.",
        "references": [paint(src_c)],
        "target": paint(gt_c),
        "mask": mask,
        "key": ("color", (16, 16), ()),
        "paint": paint,
    }


def test_text_following_passes_an_editor_that_reads_the_colour_and_fails_a_text_blind_one() -> None:
    samples = [_colour_sample(i) for i in range(4)] + [{"task": "add", "id": "x"}]

    def reading(items):
        for it in items:
            word = next(c for c in OBJECT_COLOURS if f" {c.name}." in it["text"])
            it["pred"] = it["paint"](word)

    def blind(items):  # paints the ground truth's colour whatever the text says
        for it in items:
            it["pred"] = it["target"].clone()

    def lazy(items):  # returns Picture 1
        for it in items:
            it["pred"] = it["references"][0].clone()

    ok = colour_text_following(samples, reading)
    assert ok["n"] == 4 and ok["success"] == 1.0 and ok["skipped"] == 0
    assert all(r["asked"] not in ("red", "blue") for r in ok["items"])
    assert colour_text_following(samples, blind)["success"] == 0.0
    assert colour_text_following(samples, lazy)["success"] == 0.0
    assert colour_text_following([{"task": "add"}], lazy) == {
        "n": 0,
        "passed": 0,
        "success": None,
        "skipped": 0,
        "items": [],
    }


def test_follows_and_nearest_colour() -> None:
    assert nearest_colour((250, 210, 40)).name == "yellow"
    s = _colour_sample(0)
    assert follows(s["paint"](COLOUR["green"]), s["mask"], COLOUR["green"], COLOUR["blue"], COLOUR["red"])
    assert not follows(s["target"], s["mask"], COLOUR["green"], COLOUR["blue"], COLOUR["red"])
    assert (
        follows(s["target"], torch.zeros(1, 16, 16), COLOUR["green"], COLOUR["blue"], COLOUR["red"]) is None
    )


# ------------------------------------------------------------------------------------ benchmark smoke
def test_learnability_benchmark_smoke(tmp_path) -> None:
    pytest.importorskip("diffusers")
    manifest = synthesize(
        tmp_path / "corpus", n=40, seed=0, bench_n=24, min_side=64, max_side=64, max_objects=2, zh_prob=0.0
    )
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(ROOT / "experiments/benchmarks/learnability/run.py"),
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--smoke",
        "--budget-s",
        "60",
        "--arm",
        "demo=",
        "--max-per-task",
        "1",
    ]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=600)
    result = json.loads((out / "results.json").read_text())
    (arm,) = result["arms"]
    assert arm["arm"] == "demo" and arm["optimizer_steps"] == 3
    assert set(arm["tasks"]) >= {"color", "t2i"}
    assert arm["goal"]["checked"] >= 1 and "text_following" in arm
    table = (out / "table.md").read_text()
    assert "| demo | 3 |" in table
    assert np.isfinite(arm["train_wall_s"])


# ------------------------------------------------------------------------------------ learning-rate schedule
def test_lr_factor_warmup_then_cosine_to_the_floor() -> None:
    from rededit.stages.base import lr_factor

    kw = {"warmup": 10, "total": 110, "min_ratio": 0.1}
    assert lr_factor(0, decay="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, decay="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(10, decay="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(60, decay="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(110, decay="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(500, decay="cosine", **kw) == pytest.approx(0.1)  # past the end: the floor
    assert lr_factor(60, decay="none", **kw) == 1.0
    factors = [lr_factor(s, decay="cosine", **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_stage_rejects_an_unknown_decay() -> None:
    with pytest.raises(ValueError, match="lr_decay"):
        _stage(lr_decay="linear")


def test_region_weight_anneals_to_its_final_value() -> None:
    from types import SimpleNamespace

    stage = _stage(weighting={"scheme": "x0_mse", "region_weight": 5, "region_weight_final": 1})
    assert stage.region_weight_now() == 5.0  # no trainer yet: the start value
    alphas = []
    for step in (0, 50, 100, 200):
        stage._trainer = SimpleNamespace(max_steps=100, global_step=step)
        alphas.append(stage.region_weight_now())
    assert alphas == pytest.approx([5.0, 3.0, 1.0, 1.0])
    constant = _stage(weighting={"scheme": "x0_mse", "region_weight": 5})
    constant._trainer = SimpleNamespace(max_steps=100, global_step=50)
    assert constant.region_weight_now() == 5.0
