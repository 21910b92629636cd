"""A resumed run continues its metrics.csv (issue 17 §2: Lightning's CSV writer deleted it on every start, so a
requeued job kept only its last segment of the training curve)."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger

from conftest import compose
from rededit.callbacks.csv_logger import AppendingCSVLogger


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_second_segment_appends_to_the_first(tmp_path) -> None:
    first = AppendingCSVLogger(save_dir=tmp_path, name="logs", version="")
    for step in range(3):
        first.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    first.finalize("success")
    resumed = AppendingCSVLogger(save_dir=tmp_path, name="logs", version="")
    for step in range(3, 5):
        resumed.log_metrics({"train/loss": 0.1, "train/new_metric": 7.0}, step=step)
    resumed.finalize("success")
    rows = _rows(tmp_path / "logs" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["train/loss"] == "1.0" and rows[0]["train/new_metric"] == ""
    assert rows[4]["train/new_metric"] == "7.0"
    # Lightning's own logger is what lost the first segment.
    plain = tmp_path / "plain"
    for steps in (range(3), range(3, 5)):
        logger = CSVLogger(save_dir=plain, name="logs", version="")
        for step in steps:
            logger.log_metrics({"train/loss": 0.5}, step=step)
        logger.finalize("success")
    assert [int(r["step"]) for r in _rows(plain / "logs" / "metrics.csv")] == [3, 4]


def test_the_csv_logger_config_is_the_appending_one(tmp_path) -> None:
    assert compose([], tmp_path).logger.csv._target_ == "rededit.callbacks.csv_logger.AppendingCSVLogger"
