"""The opt-in ``invert`` synthetic task (issue 20's adapter acceptance): builder, task mix, judge, category.

``invert`` negates one named object's pixels (``v → 255 − v``). It is in no default mix (the demo editor must
never have seen it); ``--task-weights invert=1`` selects it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from rededit.data.manifest import Manifest
from rededit.datagen.synth import (
    BUILDERS,
    DEFAULT_TASK_WEIGHTS,
    OPT_IN_TASKS,
    REVERSIBLE,
    TASKS,
    SynthConfig,
    generate_sample,
    synthesize,
    task_schedule,
)
from rededit.datagen.synth.scene import OBJECT_COLOURS, colour_distance
from rededit.datagen.synth.tasks import INVERT_MIN_DISTANCE, inverted
from rededit.scoring.categories import load_category_map
from rededit.scoring.judges import bench_sample, judge

DEMO_WORLD = SynthConfig(64, 64, 2, ("solid", "gradient"), (0.3, 0.45), 0.0)


@pytest.mark.parametrize("cfg", [DEMO_WORLD, SynthConfig(64, 128)], ids=["demo_world", "full_world"])
def test_target_is_source_with_the_object_negated(cfg):
    for i in range(8):
        s = generate_sample(3, "train", i, "invert", cfg)
        src = np.asarray(s.references[0], dtype=np.int16)
        tgt = np.asarray(s.target, dtype=np.int16)
        mask = np.asarray(s.mask) > 0
        assert s.task == "invert" and len(s.references) == 1 and mask.any()
        assert np.array_equal(tgt, np.where(mask[..., None], 255 - src, src)), i
        # the inverted object is visibly changed: no grey (its negative is itself)
        assert np.linalg.norm(tgt[mask] - src[mask], axis=-1).min() >= INVERT_MIN_DISTANCE
        old = next(o for o in s.source_scene.objects if o not in s.target_scene.objects)
        assert old.shape in s.texts.instruction and old.colour.name in s.texts.instruction
        assert s.texts.instruction_zh and s.texts.concise_zh and s.texts.user_zh
        # Task Inversion: inverting again is the inverse edit, described on the target scene
        assert s.inverse is not None and s.inverse.task == "invert"
        assert s.inverse.target_scene == s.source_scene


def test_inverted_colour_names_and_grey_excluded():
    red = next(c for c in OBJECT_COLOURS if c.name == "red")
    assert inverted(red).rgb == (35, 215, 215) and inverted(red).name == "cyan"
    assert inverted(inverted(red)).rgb == red.rgb
    grey = next(c for c in OBJECT_COLOURS if c.name == "grey")
    assert colour_distance(grey, inverted(grey)) < INVERT_MIN_DISTANCE


def test_opt_in_not_in_default_mix():
    assert OPT_IN_TASKS == ("invert",) and "invert" in BUILDERS and "invert" in REVERSIBLE
    assert "invert" not in TASKS and "invert" not in DEFAULT_TASK_WEIGHTS
    default = task_schedule(0, "train", 500, DEFAULT_TASK_WEIGHTS)
    assert "invert" not in default
    # naming it with weight 0 changes nothing: corpora without it stay byte-identical
    assert task_schedule(0, "train", 500, {**DEFAULT_TASK_WEIGHTS, "invert": 0.0}) == default
    assert task_schedule(0, "train", 40, {"invert": 1.0}) == ["invert"] * 40
    mixed = task_schedule(0, "train", 400, {"invert": 1.0, "color": 1.0})
    assert abs(mixed.count("invert") - 200) <= 3


def _blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur (σ in pixels) of a [-1, 1] image through 8-bit PIL."""
    arr = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr).filter(ImageFilter.GaussianBlur(sigma))
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("invert_corpus")
    return Manifest.open(
        synthesize(
            root,
            n=4,
            seed=0,
            bench_n=6,
            task_weights={"invert": 1.0},
            min_side=64,
            max_side=96,
            inverse_prob=1.0,
        )
    )


def test_corpus_rows_and_inverse_twins(corpus):
    rows = [corpus.row(i) for i in range(len(corpus))]
    assert {r["task"] for r in rows} == {"invert"}
    twins = [r for r in rows if r["inverse_of"]]
    assert len(twins) == 4
    for r in twins:
        fwd = next(x for x in rows if x["id"] == r["inverse_of"])
        assert r["target"] == fwd["references"][0] and r["references"] == [fwd["target"]]
        assert r["edit_mask"] == fwd["edit_mask"]
    assert load_category_map(None).category_of("invert") == "color"


def test_judge_passes_ground_truth_fails_identity_and_spills(corpus):
    bench = [
        bench_sample(corpus.row(i), corpus.root)
        for i in range(len(corpus))
        if corpus.row(i)["split"] == "bench"
    ]
    assert len(bench) == 6
    for s in bench:
        good = judge(s["target"], s)
        assert good.defined and good.passed and good.score == pytest.approx(1.0), (s["id"], good.detail)
        soft = judge(_blur(s["target"]), s)  # a right but soft edit (what an editor outputs) passes
        assert soft.passed, (s["id"], soft.detail)
        ident = judge(s["source"], s)
        assert ident.defined and not ident.passed and ident.score < 0.1, (s["id"], ident.detail)
        half = judge(0.5 * s["target"] + 0.5 * s["source"], s)
        assert half.defined and not half.passed, (s["id"], half.detail)
        # the whole picture negated: the object is right, everything around it changed (region IoU)
        whole = judge(-s["source"], s)
        assert whole.defined and not whole.passed and whole.values["closeness"] == pytest.approx(1.0)
        # the object painted the background's colour (a removal) is not an inversion
        mask = s["edit_mask"] > 0.5
        bg = s["source"][:, ~mask[0]].mean(dim=1)
        assert not judge(torch.where(mask, bg[:, None, None], s["source"]), s).passed, s["id"]
