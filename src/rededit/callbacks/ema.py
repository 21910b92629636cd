"""The EMA of the backbone weights as a Lightning callback (report §3.5 "Model Weight Averaging", §3.8).

The math (decay schedule, fp32 shadow of this rank's local tensors, swapping) is
:class:`rededit.models.ema.EMAWeights`; this adapter runs it from the trainer's hooks
(Lightning's ``WeightAveraging`` does not support sharded models).

The EMA weights are swapped into the model for validation / sampling / export and swapped back before
anything else runs; a checkpoint is never written while they are swapped in (it would store EMA weights
as the raw ones). Its state (shadow, update count, last step) is saved with the checkpoint.

Sharded checkpoints (FSDP2/HSDP, ``FSDP2Strategy`` with ``save_distributed_checkpoint``): rank 0 alone writes
the callback states (``meta.pt``), so a DTensor shadow there would keep rank 0's shards only. Instead the
shadow goes into the checkpoint's ``state_dict`` under ``__ema__.<param name>``, which every rank writes as
its own shards of the DCP directory, and the callback state records ``"sharded": True``. On resume the
shadow is re-created with the parameters' placements and filled from the DCP directory (any world size:
DCP reshards). With ``save_distributed_checkpoint=false`` the shadow is gathered to full tensors instead.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from rededit.models.ema import EMAWeights, is_dtensor
from rededit.parallel.safe_dcp import safe_dcp_load
from rededit.utils.logging import get_logger

log = get_logger(__name__)

DCP_PREFIX = "__ema__."


class EMA(EMAWeights, L.Callback):
    """EMA of ``pl_module.backbone``'s trainable parameters.

    Args:
        decay: target decay ``d``.
        warmup: use ``d_n = min(d, (1 + n)/(10 + n))``.
        update_every: optimizer steps between updates.
        start_step: first optimizer step that updates the average (before it the shadow tracks θ).
        validate_with_ema: swap the EMA weights in for validation during fit.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every: int = 1,
        start_step: int = 0,
        validate_with_ema: bool = True,
    ):
        super().__init__(decay=decay, warmup=warmup)
        if update_every < 1:
            raise ValueError("update_every must be >= 1")
        self.update_every = int(update_every)
        self.start_step = int(start_step)
        self.validate_with_ema = validate_with_ema
        self._trainer: L.Trainer | None = None
        self._load_from_dcp = False

    def _distributed_save(self) -> bool:
        strategy = self._trainer.strategy if self._trainer is not None else None
        return bool(getattr(strategy, "_save_distributed_checkpoint", False))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _load_shards(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fill a freshly placed shadow from the resumed DCP directory (every rank reads its shards)."""
        self._init_shadow(pl_module)  # template with the parameters' mesh and placements
        target = {"state_dict": {DCP_PREFIX + n: v for n, v in self.shadow.items()}}
        safe_dcp_load(target, trainer.ckpt_path)  # a resumed folder may come from anyone: no pickle code
        self.shadow = {n.removeprefix(DCP_PREFIX): v for n, v in target["state_dict"].items()}
        self._load_from_dcp = False
        log.info("EMA: loaded %d sharded tensors from %s", len(self.shadow), trainer.ckpt_path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Strategies that restore after setup (FSDP2/HSDP: ModelParallelStrategy) load the checkpoint *after*
        # on_fit_start, so a resumed shadow is placed here.
        self.on_fit_start(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._load_from_dcp:
            self._load_shards(trainer, pl_module)
        elif self.shadow and any(is_dtensor(p) for _, p in self._params(pl_module)) and not self.sharded:
            # A full-tensor shadow (DDP checkpoint, or a gathered one) resumed under FSDP2: keep this rank's shards.
            from torch.distributed.tensor import distribute_tensor

            self.shadow = {
                n: distribute_tensor(self.shadow[n].to(p.device), p.device_mesh, p.placements)
                for n, p in self._params(pl_module)
            }
        if not self.shadow:
            self._init_shadow(pl_module)
            log.info(
                "EMA: tracking %d tensors, decay %.5f (warm-up %s)", len(self.shadow), self.decay, self.warmup
            )
        else:
            missing = {n for n, _ in self._params(pl_module)} ^ set(self.shadow)
            if missing:
                raise RuntimeError(
                    f"EMA state does not match the backbone's trainable tensors: {sorted(missing)[:5]}"
                )
            for name, p in self._params(pl_module):
                self.shadow[name] = self.shadow[name].to(p.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # counts optimizer steps: accumulation micro-batches do not update
        if step == self.last_step or step % self.update_every:
            return
        self.last_step = step
        if step < self.start_step:
            self._init_shadow(pl_module)
            return
        self.update(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validate_with_ema and trainer.state.fn == "fit" and self.shadow:
            self.swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._backup is not None:
            raise RuntimeError(
                "EMA weights are swapped in while a checkpoint is written; refusing to save them as raw"
            )
        if self.sharded and self._distributed_save():
            # Every rank writes its own shards through the DCP state dict (see the module docstring).
            checkpoint["state_dict"].update({DCP_PREFIX + n: v.detach() for n, v in self.shadow.items()})

    def state_dict(self) -> dict[str, Any]:
        # Gathering is a collective; Lightning asks every rank for callback states when it saves.
        if self.sharded and self._distributed_save():
            state = {"decay": self.decay, "num_updates": self.num_updates, "last_step": self.last_step}
            return {**state, "sharded": True, "shadow": {}}
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._load_from_dcp = bool(state.get("sharded", False))
