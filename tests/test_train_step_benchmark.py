"""Smoke test of experiments/benchmarks/train_step/run.py: a few steps of every path so it cannot rot.

The hand-written loop must do the same work as the Lightning stage: same losses step by step (same
weights, data, σ and ε), which is what makes the benchmark's ratio meaningful.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "train_step" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step_bench", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_times_drop_warmup(bench):
    assert bench.step_times([0.0, 1.0, 3.0, 6.0], warmup=1) == [2.0, 3.0]


def test_benchmark_smoke(bench, tmp_path):
    out = tmp_path / "results.json"
    results = bench.main(
        [
            "--rows", "12",
            "--steps", "2",
            "--warmup", "1",
            "--reps", "1",
            "--threads", "1",
            "--logger", "none",
            "--out", str(out),
            "--encode-columns", "instruction,instruction_concise,instruction_user,caption,caption_original",
            "data.token_budget=256",
        ]
    )  # fmt: skip
    assert json.loads(out.read_text())["settings"]["steps"] == 2
    lh = results["lightning_vs_hand"]
    assert lh["lightning"]["wall"]["n"] == lh["hand"]["cpu"]["n"] == 2
    assert len(lh["losses_lightning"]) == len(lh["losses_hand"]) == 4  # W + 1 + N steps
    # Same work: identical losses from identical weights, data and random draws.
    assert lh["max_abs_loss_diff"] < 1e-5
    assert all(math.isfinite(x) and x > 0 for x in lh["losses_hand"])
    assert lh["ratio"] > 0
    te = results["text_encoding"]
    assert te["encode_text"]["encoded"] > 0
    assert te["cache_hits"] > 0 and 0 < te["hit_rate"] <= 1
    assert te["cached"]["wall"]["median_s"] > 0 and te["online"]["cpu"]["median_s"] > 0
