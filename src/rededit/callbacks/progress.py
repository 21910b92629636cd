"""The training progress display, chosen at run time (``callbacks.progress``, :func:`progress_bar`).

* In a terminal: Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar` (:class:`RichBar`), whose
  epoch reads ``Epoch 3`` instead of ``Epoch 3/-2`` when the run is bounded by ``max_steps`` (``max_epochs=-1``)
  and whose metrics show ``step k/max_steps``.
* Elsewhere (a SLURM ``.out`` file, ``make``, CI): :class:`LineProgressBar`, one log line every
  ``every_n_seconds`` (and on the first and the last step, and after each validation)::

      train step: 1200/5000 (24%) | epoch 2 | loss 0.0812 | 35.2 samples/s | elapsed 0:03:24 | ETA 0:10:46

  Neither of Lightning's bars can do this: Rich turns its live display off outside a terminal and prints
  only the final frame, and tqdm (``TQDMProgressBar``) keeps redrawing one line with carriage returns, so a
  log file gets a single ever-growing line and nothing newline-terminated until the end. The lines go
  through the ``rededit.progress`` logger, so they also land in Hydra's job log (``train.log``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.callbacks.timer import Timer

from rededit.utils.logging import get_logger
from rededit.utils.progress import default_interval, format_duration, is_terminal, progress_line

log = get_logger("rededit.progress")

MODES = ("auto", "rich", "lines")


def epoch_label(trainer: L.Trainer, epoch: int) -> str:
    """``Epoch e`` plus ``/last`` only when the run is bounded by a positive ``max_epochs``."""
    label = f"Epoch {epoch}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        label += f"/{trainer.max_epochs - 1}"
    return label


def total_steps(trainer: L.Trainer) -> int | None:
    """Optimizer steps of the whole run (``max_steps``, else epochs × steps per epoch), None when unbounded."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        est = trainer.estimated_stepping_batches
    except Exception:
        return None
    return int(est) if est is not None and math.isfinite(est) and est > 0 else None


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ("ids", "texts"):
            if key in batch:
                return len(batch[key])
        batch = next(iter(batch.values()), None)
    try:
        return len(batch)
    except TypeError:
        return 1


class RichBar(RichProgressBar):
    """:class:`RichProgressBar` without a negative epoch total and with the run's ``step k/total``."""

    def _get_train_description(self, current_epoch: int) -> str:
        desc = epoch_label(self.trainer, current_epoch)
        if len(self.validation_description) > len(desc):
            desc = (
                f"{desc:{len(self.validation_description)}}"  # as Lightning: no flicker against "Validation"
            )
        return desc

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        total = total_steps(trainer)
        return {"step": f"{trainer.global_step}/{total}" if total else str(trainer.global_step), **items}


class LineProgressBar(ProgressBar):
    """Periodic one-line progress for logs (module docstring).

    Args:
        every_n_seconds: seconds between two lines (None: ``$REDEDIT_PROGRESS_SECONDS``, default 30).
    """

    def __init__(self, every_n_seconds: float | None = None):
        super().__init__()
        self.every_n_seconds = default_interval() if every_n_seconds is None else float(every_n_seconds)
        self._enabled = True
        self._t0 = self._last = 0.0
        self._step0 = 0
        self._samples = 0
        self._printed_step = -1
        self.lines: list[str] = []  # what was printed (for tests and post-mortems)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        log.info(line)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()
        self._step0, self._samples = trainer.global_step, 0

    def train_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        elapsed = time.monotonic() - self._t0
        steps = trainer.global_step - self._step0
        total = total_steps(trainer)
        step_rate = steps / elapsed if elapsed > 0 else 0.0
        eta = (total - trainer.global_step) / step_rate if total and step_rate > 0 else float("nan")
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        left = timer.time_remaining() if timer is not None else None
        if left is not None and (not math.isfinite(eta) or left < eta):
            eta = left  # max_time stops the run first
        metrics = self.get_metrics(trainer, pl_module)
        extra = [epoch_label(trainer, trainer.current_epoch).lower()]
        loss = metrics.get("train/loss_step", metrics.get("train/loss"))
        if isinstance(loss, (int, float)):
            extra.append(f"loss {loss:.4g}")
        return progress_line(
            "train step",
            trainer.global_step,
            total,
            elapsed,
            rate=self._samples / elapsed if elapsed > 0 else None,
            unit="samples",
            eta=eta,
            extra=" | ".join(extra),
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += _batch_size(batch) * trainer.world_size
        if not self._enabled or trainer.global_step == self._printed_step:
            return
        now = time.monotonic()
        total = total_steps(trainer)
        first = trainer.global_step - self._step0 == 1
        last = total is not None and trainer.global_step >= total
        if first or last or now - self._last >= self.every_n_seconds:
            self._last, self._printed_step = now, trainer.global_step
            self._emit(self.train_line(trainer, pl_module))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        val = {
            k: v
            for k, v in self.get_metrics(trainer, pl_module).items()
            if k.startswith("val/") and "tbin" not in k
        }
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(val.items())
        )
        self._emit(f"validation at step {trainer.global_step}: {shown or 'done'}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.global_step != self._printed_step:
            self._emit(self.train_line(trainer, pl_module))
        if self._enabled:
            self._emit(
                f"training done: {trainer.global_step} steps in {format_duration(time.monotonic() - self._t0)}"
            )


def progress_bar(
    mode: str = "auto", every_n_seconds: float | None = None, refresh_rate: int = 1
) -> ProgressBar:
    """The progress callback for this process: ``rich`` in a terminal, ``lines`` elsewhere (``auto``)."""
    if mode not in MODES:
        raise ValueError(f"callbacks.progress.mode must be one of {MODES}, got {mode!r}")
    if mode == "rich" or (mode == "auto" and is_terminal()):
        return RichBar(refresh_rate=refresh_rate)
    return LineProgressBar(every_n_seconds=every_n_seconds)
