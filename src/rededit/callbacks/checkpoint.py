"""``ModelCheckpoint`` whose ``last`` checkpoint is the state training ended in.

Lightning 2.6's ``ModelCheckpoint.on_train_end`` writes ``last`` only when *no* checkpoint was written during the
run (it tests ``_last_checkpoint_saved``, which any earlier save sets). A run whose ``max_steps`` or ``max_time``
does not fall on ``every_n_train_steps`` (the demo: 4,942 steps under a time cap, saves every 1,000) therefore
ended with a ``last.ckpt`` of an earlier step than its export: ``rededit-consolidate <run>``, ``--merge-adapter``
and ``stage.init_from=<run>`` silently used older weights than the run's own export, and a resume retrained the
tail. Here ``last`` is written at the end whenever steps ran since the last save.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's callback (same options), plus ``last`` at the end of training when it would be stale."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # _last_global_step_saved: the step of this callback's latest save (Lightning's own bookkeeping).
        if self.save_last and trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
