"""Smoke test of experiments/benchmarks/consistency_loss/run.py (slow tier: it trains three short SFT runs).

Also an end-to-end check of the wiring: a portrait corpus → ``rededit-data faces`` → the datamodule of
``experiment=demo_sft loss/consistency=face`` → SFT steps whose loss module reports that every batch carried
faces (landmarks survived the bucket resize).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "consistency_loss" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("consistency_bench", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_times_drop_warmup(bench):
    assert bench.step_times([0.0, 1.0, 3.0, 6.0], warmup=1) == [2.0, 3.0]


@pytest.mark.slow
def test_benchmark_smoke(bench, tmp_path):
    out = tmp_path / "results.json"
    results = bench.main(
        ["--rows", "40", "--steps", "2", "--warmup", "1", "--threads", "1", "--max-samples", "1",
         "--fit-rounds", "1", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["table"] == results["table"]
    rows = {r["variant"]: r for r in results["table"]}
    assert set(rows) == {"off", "face", "face-1"}
    assert rows["off"]["face_fraction"] is None
    assert (
        rows["face"]["face_fraction"] == 1.0
    )  # every portrait row got landmarks and kept them in the bucket
    fit = {r["variant"]: r for r in results["fit_table"]}
    assert set(fit) == {"off", "face", "face-1"} and all(r["steps"] == 2 for r in fit.values())
    assert " 0 unreadable" in results["faces"] and "with 0 faces" in results["faces"]


@pytest.mark.slow
def test_trainer_fit_logs_the_object_variant(tiny_corpus, tmp_path):
    """``rededit-train experiment=demo_sft loss/consistency=object`` on the synthetic corpus (its preserved
    objects' boxes): Lightning logs the loss and the share of samples that carried boxes."""
    from conftest import compose, read_step_metric, train_overrides
    from rededit.train import run

    cfg = compose(
        train_overrides(tiny_corpus, "experiment=demo_sft", "loss/consistency=object", steps=2), tmp_path
    )
    run(cfg)
    loss = read_step_metric(tmp_path, "train/loss_obj")
    frac = read_step_metric(tmp_path, "train/id_object_fraction")
    assert set(loss) == set(frac) == {1, 2}
    # What the code promises for every draw of the sampler (a step may carry no boxes at all): the share is
    # logged in [0, 1], the loss (1 − cosine) is non-negative up to float rounding, and exactly 0 on a step
    # without boxes.
    assert all(0 <= f <= 1 for f in frac.values()) and all(v >= -1e-6 for v in loss.values())
    assert all(loss[step] == 0.0 for step, f in frac.items() if f == 0)
