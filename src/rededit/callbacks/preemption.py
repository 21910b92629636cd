"""Save a checkpoint before exit on SIGTERM / SIGUSR1 / SIGUSR2 (preemption, SLURM time limit), then stop cleanly.

SIGUSR1 is what ``scripts/slurm/train.sbatch`` asks for (``--signal=USR1@120``); SIGUSR2 is what submitit (the
``hydra/launcher=slurm`` sweeps) sends ``signal_delay_s`` before the limit. Replacing submitit's USR2 handler
means submitit no longer requeues the job itself: set ``requeue=true`` (rank 0 runs ``scontrol requeue``).

Why not Lightning's own handling: on SIGTERM Lightning only stops (``SIGTERMException``, no checkpoint),
and its SLURM ``auto_requeue`` SIGUSR1 handler calls ``trainer.save_checkpoint`` *inside the signal
handler*, i.e. at an arbitrary point of the step (mid-backward, between FSDP2 collectives) and on each
rank at a different time — with sharded (DCP) checkpoints every rank must enter the save together. So
the handler here only records the signal; at the next ``on_train_batch_end`` the ranks agree with one
boolean all-reduce (a signal seen on any rank counts), every rank saves the same checkpoint (the
resumable ``last.ckpt`` by default: sampler cursor, EMA, curriculum, optimizer) and training stops. With
``requeue`` rank 0 then runs ``scontrol requeue $SLURM_JOB_ID``; the requeued job resumes with
``ckpt_path=<run>/checkpoints/last.ckpt`` (its run folder is derived from a stable run id). Use it with
``SLURMEnvironment(auto_requeue=False)`` so Lightning's handler does not save a second time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L

from rededit.utils.logging import get_logger

log = get_logger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On one of ``signals``: checkpoint at the end of the current batch, then stop.

    Args:
        signals: signal names to handle (``SIGTERM``, ``SIGUSR1``, ...).
        filename: checkpoint file name in ``dirpath``.
        dirpath: folder (default: the ``ModelCheckpoint`` folder, else ``<default_root_dir>/checkpoints``).
        requeue: after saving, rank 0 requeues the SLURM job (``scontrol requeue``).
    """

    def __init__(
        self,
        signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        filename: str = "last.ckpt",
        dirpath: str | None = None,
        requeue: bool = False,
    ) -> None:
        self.signals = [getattr(signal, name) for name in signals]
        self.filename = filename
        self.dirpath = dirpath
        self.requeue = requeue
        self.received: int | None = None
        self.saved_path: Path | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        # Only record: no I/O or collectives inside a signal handler.
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its own handlers (Trainer._run), so ours replaces them for these signals.
        if self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not on the main thread, signal handlers not installed")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        folder = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / self.filename

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.checkpoint_path(trainer)
        log.warning(
            "signal %s received: saving %s at step %d and stopping",
            signal.Signals(self.received).name if self.received else "(on another rank)",
            path,
            trainer.global_step,
        )
        trainer.save_checkpoint(path)
        self.saved_path = path
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
            if job:
                result = subprocess.run(["scontrol", "requeue", job], check=False)
                log.warning("requeued SLURM job %s (scontrol exit %d)", job, result.returncode)
            else:
                log.warning("requeue requested but no SLURM_JOB_ID in the environment")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, previous in self._previous.items():
            # Lightning's own teardown may already have put back the handlers it found: keep those.
            if signal.getsignal(sig) == self._handler:
                signal.signal(sig, previous)
        self._previous.clear()
