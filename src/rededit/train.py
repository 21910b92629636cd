"""A training run: build the stage, data and trainer from a composed config, fit, export.

``rededit-train`` (:mod:`rededit.cli.train`) is the command line over :func:`run`:

    rededit-train experiment=demo_pretrain
    rededit-train experiment=sft stage.init_from=outputs/runs/pretrain/<date>   # weights-only chaining
    rededit-train experiment=sft ckpt_path=outputs/runs/sft/<date>/checkpoints/last.ckpt   # full resume
    REDEDIT_RUN_ID=r1 rededit-train experiment=sft ckpt_path=auto   # resume outputs/runs/sft/r1 if it has last.ckpt

The run folder gets the resolved config (``config.yaml``), logs, checkpoints and, after fit, the EMA
editor exported as a diffusers folder (``export/``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from rededit.callbacks.ema import EMA
from rededit.callbacks.loggers import log_config
from rededit.callbacks.preemption import PreemptionCheckpoint
from rededit.parallel.file_checkpoint_io import AtomicCheckpointIO
from rededit.parallel.parallelize import full_state_dict, is_sharded
from rededit.stages.checkpoints import (
    backbone_from_state,
    export_card_info,
    export_editor,
    pipeline_base,
    pipeline_sources,
)
from rededit.utils.config_checks import (
    ConfigError,
    check_train_config,
    checkpoint_names,
    remove_unstarted_run,
)
from rededit.utils.io import atomic_write_text
from rededit.utils.logging import get_logger
from rededit.utils.run_id import register_resolvers, resolve_ckpt_path
from rededit.utils.run_lock import RunFolderLock, is_launching_rank

log = get_logger(__name__)
# Before Hydra creates the run folder: files modified since then were written by this process.
PROCESS_START = time.time()
register_resolvers()  # ${rededit.wandb_id:...} in conf/logger/wandb.yaml


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (cfg or {}).values() if node is not None and "_target_" in node]


def build_strategy(cfg: DictConfig) -> Any:
    """The ``strategy=`` preset as a Lightning strategy (``auto`` stays a string); see README "Scaling out"."""
    if "_target_" not in cfg:
        return cfg.get("name", "auto")
    node = OmegaConf.to_container(cfg, resolve=True)
    node.pop("name", None)
    return instantiate(node)


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiate stage, data module and trainer from a composed config."""
    text_encoder = instantiate(cfg.text_encoder) if cfg.get("text_encoder") else None
    datamodule = instantiate(cfg.data, text_encoder=text_encoder if cfg.encode_text_in_loader else None)
    model = instantiate(cfg.stage, text_encoder=text_encoder)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        strategy=build_strategy(cfg.strategy),
        plugins=cluster_plugins(callbacks),
    )
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # one-file saves: write beside, then rename
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return model, datamodule, trainer


def cluster_plugins(callbacks: list[Any]) -> list[Any]:
    """Under SLURM with our :class:`~rededit.callbacks.preemption.PreemptionCheckpoint`, Lightning's own
    auto-requeue handler is switched off from the start: it saves a checkpoint *inside* the signal handler
    (unsafe with sharded checkpoints) and would be live during setup/restore, before the callback takes the
    signals over at ``on_train_start``."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect() and any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def export(model: L.LightningModule, trainer: L.Trainer, cfg: DictConfig) -> Path | None:
    """Write the EMA editor (raw weights beside it) as a diffusers folder, rank 0 only."""
    if not cfg.get("export_dir"):
        return None
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    backbone, sharded = model.backbone, is_sharded(model.backbone)
    if not sharded and trainer.global_rank != 0:
        return None
    # Sharded (FSDP2/HSDP): gathering raw and EMA weights are collectives, so every rank takes part; each
    # tensor is gathered on its own and kept in CPU memory on rank 0 only (a 20B model never sits whole on a
    # device, and the other ranks hold nothing).
    raw = full_state_dict(backbone, rank0_only=True) if sharded else None
    ema_state = ema.ema_state_dict(model, rank0_only=sharded) if ema is not None and ema.shadow else None
    if trainer.global_rank != 0:
        return None
    if sharded:
        backbone = backbone_from_state(cfg, raw)
    elif hasattr(model, "export_backbone"):
        # a cast / quantised frozen base: the source's base + the adapter
        backbone = model.export_backbone(cfg)
    # From a diffusers pipeline folder: a complete pipeline folder (issue 19), its other components taken
    # from the folders the run loaded them from.
    base = pipeline_base(cfg)
    out = export_editor(
        backbone,
        cfg.export_dir,
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        ema_state=ema_state,
        pipeline_from=base,
        components=pipeline_sources(cfg, base) if base is not None else None,
        card=export_card_info(cfg, step=trainer.global_step, run_dir=cfg.paths.output_dir) if base else None,
    )
    log.info("exported the %s editor to %s", "EMA" if ema_state else "raw", out)
    return out


def set_torch_threads(requested: int | None) -> int:
    """Set torch's intra-op threads: ``requested``, else the CPUs this process may run on.

    torch defaults to the machine's physical cores, which on a shared or cgroup-limited node (SLURM,
    containers, ``taskset``) oversubscribes the cores actually granted: measured ~10× slower steps on a loaded
    2-core machine. ``os.sched_getaffinity`` gives the granted set.
    """
    if requested is None:
        try:
            requested = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            requested = os.cpu_count() or 1
    requested = int(requested)
    if requested < 1:
        raise ValueError(f"torch_threads must be >= 1 or null, got {requested}")
    torch.set_num_threads(requested)
    return requested


def preemption_exit_code(trainer: L.Trainer) -> int | None:
    """``128 + signal number`` (the shell's convention for "killed by") if a :class:`PreemptionCheckpoint`
    stopped this fit, else None. Ranks that did not see the signal themselves report SIGTERM's code."""
    for cb in getattr(trainer, "callbacks", ()):
        if isinstance(cb, PreemptionCheckpoint) and cb.saved_path is not None:
            return 128 + int(cb.received or signal.SIGTERM)
    return None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one stage; returns the final logged metrics and the run's paths.

    The launching process holds the run folder's lock (:class:`~rededit.utils.run_lock.RunFolderLock`) for
    the whole run, so a second run into the same folder is refused instead of mixing its files in.
    A run that fails before its first optimizer step takes back the files it wrote
    (:func:`~rededit.utils.config_checks.remove_unstarted_run`): no half-made run folder is left behind.

    Raises:
        ConfigError: a config value that cannot work (checked before anything is written).
    """
    check_train_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    launching = is_launching_rank()
    lock = RunFolderLock(out_dir) if launching else contextlib.nullcontext()
    progress: dict[str, Any] = {"trainer": None}
    unstarted = False
    try:
        with lock:
            try:
                refuse_stale_checkpoints(cfg, out_dir)
                return _run(cfg, out_dir, progress)
            except BaseException:
                trainer = progress["trainer"]
                unstarted = launching and (trainer is None or trainer.global_step == 0)
                raise
    finally:
        if unstarted and remove_unstarted_run(out_dir, PROCESS_START):
            log.warning("the run failed before its first step: removed its run folder %s", out_dir)


def refuse_stale_checkpoints(cfg: DictConfig, out_dir: Path) -> None:
    """A fresh run (no ``ckpt_path``) into a run folder that already holds checkpoints is refused before it writes:
    Lightning would add ``-v1`` to the clashing names and leave the earlier run's ``last.ckpt`` in place, so
    ``rededit-consolidate <run>`` (and ``ckpt_path=auto`` later) would read the other run's weights, and this
    run's ``config.yaml`` would no longer describe them."""
    found = [] if cfg.get("ckpt_path") is not None else checkpoint_names(out_dir)
    if found:
        raise ConfigError(
            f"{out_dir / 'checkpoints'} already holds checkpoints of an earlier run ({', '.join(found[:4])}"
            f"{', ...' if len(found) > 4 else ''}); a fresh run there would mix its checkpoints with them. "
            "Resume that run with ckpt_path=auto, choose another hydra.run.dir, or remove the folder."
        )


def _run(cfg: DictConfig, out_dir: Path, progress: dict[str, Any]) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    threads = set_torch_threads(cfg.get("torch_threads"))
    log.info("torch threads: %d", threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    model, datamodule, trainer = build(cfg)
    log_config(trainer, cfg, model, datamodule)  # hparams.yaml, TensorBoard HPARAMS, the wandb run config
    progress["trainer"] = trainer
    # ckpt_path=auto: this run folder's last.ckpt if any (a requeued job resumes itself). weights_only:
    # a checkpoint is data, never code (issue 7, safety).
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    preempted = preemption_exit_code(trainer)
    if preempted is not None:
        # Checkpoint saved by PreemptionCheckpoint; the run did not finish: no export, non-zero exit.
        log.warning(
            "preempted at step %d: checkpoint saved, nothing exported; resume with ckpt_path=auto "
            "(hydra.run.dir=%s). Exit code %d.",
            trainer.global_step,
            out_dir,
            preempted,
        )
        raise SystemExit(preempted)
    exported = None if trainer.fast_dev_run else export(model, trainer, cfg)
    return {"metrics": metrics, "output_dir": str(out_dir), "export_dir": str(exported) if exported else None}
