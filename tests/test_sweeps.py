"""Sweeps: rededit-train returns the configured objective, so Hydra's Optuna sweeper can drive it.

Before, ``rededit-train -m hydra/sweeper=optuna 'optimizer.lr=interval(1e-4,1e-3)'`` failed with "Return
value must be float-castable. Got 'None'".
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, compose, train_overrides
from rededit.cli.train import objective


def test_objective_is_the_named_metric_and_a_missing_one_is_named() -> None:
    assert objective({"train/loss": 0.5, "val/loss": 0.25}, "val/loss") == 0.25
    assert objective({"train/loss": 0.5}, None) is None
    with pytest.raises(KeyError, match=r"optimized_metric=val/loss was not logged.*train/loss"):
        objective({"train/loss": 0.5}, "val/loss")


def test_hparams_search_config_selects_optuna_on_the_held_out_loss(tmp_path) -> None:
    cfg = compose(["hparams_search=lr"], tmp_path / "run", keep_hydra=True)
    assert cfg.optimized_metric == "val/loss"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert "optimizer.lr" in cfg.hydra.sweeper.params


def test_optuna_sweep_over_the_learning_rate_runs_and_reports_the_best(tiny_corpus, tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the .[optuna] extra (in make test's EXTRAS)
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "rededit.cli.train", "-m", "hydra/sweeper=optuna",
        "optimizer.lr=interval(1e-4,1e-3)", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
        *train_overrides(tiny_corpus), "data.text_cache=null",
    ]  # fmt: skip
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 1e-4 <= result["best_params"]["optimizer.lr"] <= 1e-3
    assert isinstance(result["best_value"], float) and result["best_value"] > 0
    assert {p.name for p in sweep.iterdir() if p.is_dir()} >= {"0", "1"}
