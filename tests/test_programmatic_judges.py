"""Programmatic judges of the synthetic bench: each passes on the ground truth and fails on the source.

A small bench (every synthetic task, 64–96 px) is synthesised once per module; rows are loaded at their
native size (and, in one test, cover-resized to a fixed bucket) with :func:`bench_sample`.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from rededit.data.manifest import Manifest
from rededit.datagen.synth.tasks import TASKS
from rededit.datagen.synth.writer import synthesize
from rededit.scoring.categories import load_category_map
from rededit.scoring.judges import JUDGES, JudgeResult, bench_sample, judge, preservation_check
from rededit.scoring.judges.programmatic import success_rate_by_category, text_similarity

REGION_TASKS = ("add", "remove", "replace", "color", "compose", "background")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """``(manifest, {task: [bench rows]})`` of a 44-row bench at 64–96 px."""
    root = tmp_path_factory.mktemp("judge_bench")
    man = Manifest.open(synthesize(root, n=0, seed=0, bench_n=44, min_side=64, max_side=96))
    rows = defaultdict(list)
    for i in range(len(man)):
        row = man.row(i)
        rows[row["task"]].append(row)
    return man, dict(rows)


@pytest.fixture(scope="module")
def samples(bench):
    man, rows = bench
    return {task: [bench_sample(r, man.root) for r in rs] for task, rs in rows.items()}


def _blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur (σ in pixels) of a [-1, 1] image through 8-bit PIL."""
    arr = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr).filter(ImageFilter.GaussianBlur(sigma))
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def test_bench_has_every_task(samples):
    # invert: opt-in, tests/test_synth_invert.py
    assert set(samples) == set(TASKS) == set(JUDGES) - {"invert"}
    assert all(len(v) >= 2 for v in samples.values())


@pytest.mark.parametrize("task", TASKS)
def test_judge_passes_on_ground_truth_and_fails_on_source(samples, task):
    for s in samples[task]:
        good = judge(s["target"], s)
        assert good.defined and good.passed, (s["id"], good.detail)
        assert good.score == pytest.approx(1.0), good.detail
        if task == "t2i":
            assert s["source"] is None
            for fill in (0.0, -1.0, 1.0):  # grey, black, white canvases
                bad = judge(torch.full_like(s["target"], fill), s)
                assert bad.defined and not bad.passed, (s["id"], fill, bad.detail)
            continue
        src = s["source"]
        if src.shape != s["target"].shape:  # low-res restore / quarter turn: the source at the target's shape
            src = torch.nn.functional.interpolate(src[None], size=s["target"].shape[-2:], mode="bilinear")[0]
        bad = judge(src, s)
        assert bad.defined and not bad.passed, (s["id"], bad.detail)
        assert 0.0 <= bad.score < good.score


@pytest.mark.parametrize("task", REGION_TASKS)
def test_region_judges_robust_to_blur_and_fail_half_edits(samples, task):
    for s in samples[task]:
        blurred = judge(_blur(s["target"]), s)
        assert blurred.passed, (s["id"], blurred.detail)
        half = judge(0.5 * s["target"] + 0.5 * s["source"], s)  # a half-done edit
        assert half.defined and not half.passed, (s["id"], half.detail)


@pytest.mark.parametrize("task", ("color", "replace", "add", "compose"))
def test_region_iou_fails_an_edit_that_spills_around_the_object(samples, task):
    for s in samples[task]:
        mask = s["edit_mask"][0] > 0.5
        ring = torch.nn.functional.max_pool2d(mask[None, None].float(), 19, stride=1, padding=9)[0, 0] > 0.5
        # the edit itself is exact, but a 9-pixel ring around it is repainted (the inverted source)
        spill = torch.where((ring & ~mask)[None], -s["source"], s["target"])
        res = judge(spill, s)
        assert res.defined and not res.passed, (s["id"], res.detail)
        assert res.values["iou"] < 0.5 and res.values["closeness"] == pytest.approx(1.0)


def test_judges_on_fixed_bucket(bench):
    """Rows cover-resized to one bucket (what an editor generates at) keep the verdicts."""
    man, rows = bench
    for task in ("color", "remove", "background", "stylize", "restore", "viewpoint", "t2i"):
        for r in rows[task][:2]:
            s = bench_sample(r, man.root, size=(64, 96))
            assert s["target"].shape == (3, 64, 96)
            assert s["edit_mask"] is None or s["edit_mask"].shape == (1, 64, 96)
            good = judge(s["target"], s)
            assert good.passed, (r["id"], good.detail)
            if s["source"] is not None:
                assert not judge(s["source"], s).passed, r["id"]


def test_preservation_check(samples):
    s = samples["background"][0]  # compliance = the background region; the objects are outside the mask
    assert preservation_check(s["target"], s).passed
    assert preservation_check(s["target"], s).values["psnr_outside"] == pytest.approx(100.0)
    g = torch.Generator().manual_seed(0)
    noisy = (s["target"] + 0.3 * torch.randn(s["target"].shape, generator=g)).clamp(-1, 1)
    noisy = torch.where(s["edit_mask"] > 0.5, s["target"], noisy)  # a perfect new background, noisy objects
    assert judge(noisy, s).passed  # compliance alone
    both = judge(noisy, s, preserve_psnr=25.0)
    assert not both.passed and "preservation" in both.detail and both.values["psnr_outside"] < 25
    # global edits have nothing outside their mask: preservation is undecided and ignored
    st = samples["stylize"][0]
    assert not preservation_check(st["target"], st).defined
    assert judge(st["target"], st, preserve_psnr=25.0).passed


class FakeOCR:
    def __init__(self, text: str | None = None, fail: bool = False):
        self.text, self.fail, self.seen = text, fail, []

    def read_text(self, img: Image.Image) -> str:
        self.seen.append(img)
        if self.fail:
            raise RuntimeError("model not loaded")
        return self.text


def test_text_judge_with_ocr(samples):
    s = samples["text"][0]
    target = s["ocr_target"]
    assert target
    ocr = FakeOCR(f"  {target.lower()} ")
    res = judge(s["target"], s, ocr=ocr)
    assert res.passed and res.score == 1.0 and "OCR read" in res.detail
    assert isinstance(ocr.seen[0], Image.Image) and ocr.seen[0].height >= 64
    wrong = judge(s["target"], s, ocr=FakeOCR("XYZZY"))
    assert wrong.defined and not wrong.passed
    near = judge(s["target"], s, ocr=FakeOCR(target[:-1]), min_similarity=0.8)
    assert near.passed == (1 - 1 / len(target.replace(" ", "")) >= 0.8)
    failed = judge(s["target"], s, ocr=FakeOCR(fail=True))
    assert not failed.defined and math.isnan(failed.score) and "OCR backend failed" in failed.detail
    no_ocr = judge(s["target"], s)
    assert no_ocr.passed and "no OCR backend" in no_ocr.detail


def test_text_similarity():
    assert text_similarity("Open Late", "OPEN LATE") == 1.0
    assert text_similarity("xx OPEN LATE yy", "open late") == 1.0
    assert text_similarity("OPEN LATF", "OPEN LATE") == pytest.approx(1 - 1 / 8)
    assert text_similarity("", "") == 1.0 and text_similarity("a", "") == 0.0
    assert text_similarity("开业大吉", "开业大吉") == 1.0
    assert text_similarity("开业大", "开业大吉") == pytest.approx(0.75)


def test_errors(samples):
    s = samples["color"][0]
    with pytest.raises(KeyError, match="no programmatic judge"):
        judge(s["target"], {**s, "task": "inpaint"})
    with pytest.raises(TypeError, match="takes no thresholds"):
        judge(s["target"], s, max_ratio=0.3)
    with pytest.raises(ValueError, match="differ in shape"):
        judge(s["target"][:, :32, :32], s)
    with pytest.raises(ValueError, match="needs the source"):
        judge(s["target"], {**s, "source": None, "references": []})
    # thresholds reach the task's judge: an impossible closeness fails even the ground truth
    assert not judge(s["target"], s, min_closeness=1.01).passed


def test_success_rate_by_category():
    ok, bad = JudgeResult(True, 1.0, "ok"), JudgeResult(False, 0.0, "bad")
    und = JudgeResult.undecided("n/a")
    results = [
        ("color", ok),
        ("color", bad),
        ("color", und),
        ("restore", ok),
        ("t2i", bad),
        {"task": "add", "passed": True},
        {"task": "add", **bad.to_dict()},
    ]
    out = success_rate_by_category(results, load_category_map(None))
    assert list(out) == ["add", "color", "lowlevel", "t2i"]
    assert out["color"] == {
        "name": "Color",
        "n": 2,
        "passed": 1,
        "undecided": 1,
        "success_rate": 0.5,
        "tasks": ["color"],
    }
    assert out["lowlevel"]["name"] == "Low-level" and out["lowlevel"]["success_rate"] == 1.0
    assert out["t2i"]["success_rate"] == 0.0 and out["add"]["success_rate"] == 0.5
    only_undecided = success_rate_by_category([("text", und)])
    assert only_undecided["text"]["success_rate"] is None and only_undecided["text"]["undecided"] == 1
