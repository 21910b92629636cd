"""Stable run ids and run folders: a requeued job lands in its own folder, resumes from its own checkpoint
and logs to its own wandb run (issue 7, "Launch").

The run id (config key ``run_id``, conf/train.yaml) is, in this order of precedence:

1. ``REDEDIT_RUN_ID`` (set it to resume a local run by hand, or to name a production run);
2. ``SLURM_JOB_ID``: SLURM keeps it when it requeues a job (``scontrol requeue``, preemption,
   submitit's timeout requeue), and every array task has its own;
3. the start time ``%Y-%m-%d_%H-%M-%S`` (a local run: a fresh folder each time, as before).

The run folder is ``outputs/runs/<run_name>/<run_id>`` (conf/hydra/default.yaml). ``ckpt_path=auto``
resumes from the newest intact checkpoint of the run folder (``checkpoints/last.ckpt``, the other
``checkpoints/*.ckpt``, or a newer Lightning ``hpc_ckpt_<n>.ckpt``) and starts fresh when there is none, so the
same command line is right for the first start and every requeue. The wandb run id is a hash of the
run folder (:func:`wandb_id`), stable across requeues and distinct for every job of a sweep.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from typing import Any

from rededit.utils.logging import get_logger

__all__ = ["AUTO", "intact_checkpoint", "register_resolvers", "resolve_ckpt_path", "run_dir_of", "wandb_id"]

log = get_logger(__name__)
AUTO = "auto"
LAST = Path("checkpoints") / "last.ckpt"


def wandb_id(run_name: Any, output_dir: Any) -> str:
    """``<run_name>-<8 hex>`` from the absolute run folder: the same folder always gives the same id.

    wandb ids may hold letters, digits, ``-`` and ``_`` only (64 characters at most).
    """
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(run_name))[:48] or "run"
    digest = hashlib.sha256(str(Path(str(output_dir)).absolute()).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def run_dir_of(ckpt_path: Any, default: Any) -> str:
    """The run folder a resumed run continues in: the folder of ``ckpt_path`` when it is a checkpoint of a
    rededit run (``<run>/checkpoints/<name>`` or Lightning's ``<run>/hpc_ckpt_<n>.ckpt``, beside that run's
    ``config.yaml``), else ``default`` (a new run folder).

    Without this, ``ckpt_path=<run>/checkpoints/last.ckpt`` resumed into a new timestamped folder and split
    one run's logs and checkpoints across two folders.
    """
    if ckpt_path in (None, "", AUTO, "last", "hpc"):
        return str(default)
    path = Path(str(ckpt_path))
    for run in (path.parent.parent, path.parent) if path.parent.name == "checkpoints" else (path.parent,):
        if (run / "config.yaml").is_file() and (run != path.parent or path.name.startswith("hpc_ckpt_")):
            return str(run)
    return str(default)


def register_resolvers() -> None:
    """Register ``${rededit.wandb_id:<run_name>,<output_dir>}`` and ``${rededit.run_dir:<ckpt_path>,<default>}``
    (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("rededit.wandb_id"):
        OmegaConf.register_new_resolver("rededit.wandb_id", wandb_id)
    if not OmegaConf.has_resolver("rededit.run_dir"):
        OmegaConf.register_new_resolver("rededit.run_dir", run_dir_of)


def intact_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint looks complete (cheap: no tensor is read).

    A one-file checkpoint is torch's zip archive, whose central directory is written last, so any truncation
    (kill -9 or a full disk during a save) makes it unreadable as a zip; a sharded folder has its
    ``.metadata`` (written last, after every rank's shards).
    """
    path = Path(path)
    if path.is_dir():
        meta = path / ".metadata"
        return meta.is_file() and meta.stat().st_size > 0
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """What ``trainer.fit(ckpt_path=...)`` gets for the config's ``ckpt_path``.

    ``"auto"``: the newest *intact* (:func:`intact_checkpoint`) of ``<output_dir>/checkpoints/last.ckpt`` (a
    file, or a folder for sharded checkpoints), the other checkpoints in ``<output_dir>/checkpoints/`` and
    Lightning's SLURM pre-emption checkpoints ``<output_dir>/hpc_ckpt_<n>.ckpt`` (written on SIGUSR1 by its
    ``SLURMEnvironment`` auto-requeue; ``trainer.default_root_dir`` is the run folder), else ``None`` (a fresh
    start). A broken candidate newer than the one chosen is named in a warning and left in place. Anything else
    is passed through unchanged (``None``, a path, or Lightning's own ``"last"`` / ``"hpc"``).
    """
    if ckpt_path is None or str(ckpt_path) != AUTO:
        return ckpt_path
    out = Path(output_dir)
    found = {out / LAST, *out.glob("hpc_ckpt_*.ckpt"), *(out / LAST).parent.glob("*.ckpt")}
    candidates = sorted((p for p in found if p.exists()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    broken = []
    for candidate in candidates:
        if intact_checkpoint(candidate):
            if broken:
                log.warning(
                    "ckpt_path=auto: skipped incomplete checkpoint(s) %s (killed or disk full during a save); "
                    "resuming from the newest intact one, %s",
                    ", ".join(map(str, broken)),
                    candidate,
                )
            else:
                log.info("ckpt_path=auto: resuming from %s", candidate)
            return str(candidate)
        broken.append(candidate)
    if broken:
        raise RuntimeError(
            f"ckpt_path=auto: every checkpoint in {out} is incomplete ({', '.join(map(str, broken))}); "
            "refusing to start over silently. Remove them to start fresh, or pass ckpt_path=<file>."
        )
    log.info("ckpt_path=auto: no %s yet, starting fresh", out / LAST)
    return None
