"""What a run shows and records (issue 18, "Logging and what the user sees").

One real ``rededit-train`` run (a subprocess, so Hydra configures logging as on the command line; stdout is a
pipe, as in a SLURM ``.out`` file or CI) is shared by the tests below:

* Hydra's job log ``<run>/train.log`` holds the run's rededit messages (the loggers propagate), and a rank
  above 0 is silenced by the rank-zero filter.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_overrides

STEPS = 3


@pytest.fixture(scope="module")
def cli_run(tiny_corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m rededit.cli.train`` for a few steps on the tiny corpus; returns (run folder, process)."""
    run = tmp_path_factory.mktemp("cli_run") / "run"
    overrides = [o for o in train_overrides(tiny_corpus, steps=STEPS) if o != "~callbacks.progress"]
    env = dict(os.environ)
    env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "rededit.cli.train", *overrides, "torch_threads=1", f"hydra.run.dir={run}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc


def test_hydra_job_log_holds_the_run(cli_run) -> None:
    run, _ = cli_run
    log = (run / "train.log").read_text()
    assert log.strip(), "train.log is empty: rededit's loggers do not reach Hydra's job log"
    assert "[rededit.train][INFO]" in log and "torch threads: 1" in log
    assert "[rededit.data.datamodule][INFO]" in log and "train data:" in log


def test_rank_above_zero_is_filtered(monkeypatch, caplog) -> None:
    from rededit.utils.logging import get_logger

    log = get_logger("rededit.test_rank_filter")
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("RANK", "0")
    log.info("from rank zero")
    monkeypatch.setenv("RANK", "1")
    log.info("from rank one")
    log.info("asked for every rank", extra={"all_ranks": True})
    messages = [r.getMessage() for r in caplog.records if r.name == "rededit.test_rank_filter"]
    assert messages == ["from rank zero", "asked for every rank"]
