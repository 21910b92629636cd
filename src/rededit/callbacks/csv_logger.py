"""Lightning's CSV logger, except that a resumed run continues its ``metrics.csv`` instead of deleting it.

Lightning's ``ExperimentWriter`` removes an existing ``metrics.csv`` when it starts (its
``_check_log_dir_exists``), so with the fixed log folder rededit uses (``version: ""``, one run folder per
run id) every requeued or resumed job kept only its last segment of the training curve, and the demo report's
loss curves lost the rest (issue 17 §2). Here the writer starts from the file's header and appends; a new
metric name rewrites the file once with the union of the columns (as Lightning does within one run).
Rows of steps that a resume repeats (the run went past its last checkpoint before it stopped) are kept:
they are what ran.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv``; take its columns as the known keys."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = sorted(k for k in header if k)


class AppendingCSVLogger(CSVLogger):
    """:class:`lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` survives a resume (module doc)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
