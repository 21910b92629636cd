"""One run per run folder: a lock file that a second run into the same folder refuses, naming the holder.

Two runs writing one folder interleave their configs, checkpoints and metrics without any error (a reused
``REDEDIT_RUN_ID``, two terminals with the same ``hydra.run.dir``). ``rededit-train`` holds
``<run folder>/.rededit.lock`` (created with ``O_EXCL``) from start to exit; it records the holder's host,
pid, process start time and SLURM job id. A lock left by a dead process is recognised and taken over:

* same host: the pid no longer exists, or it is another process now (its start time differs);
* same SLURM job id: the job was requeued, so the process that wrote the lock was ended by SLURM.

A lock from another host that is not this SLURM job cannot be checked from here; the message says how to
remove it when the user knows that run is gone. Only the launching process of global rank 0 takes the lock
(rank processes that Lightning or the cluster start share the run).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from rededit.utils.logging import get_logger

log = get_logger(__name__)

LOCK_NAME = ".rededit.lock"


class RunFolderLocked(RuntimeError):
    """Another live run holds this run folder."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5); the name in parentheses may hold spaces


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _start_time(pid)
    return start_time is None or now is None or now == start_time


def is_launching_rank() -> bool:
    """Global rank 0's launching process (``RANK``/``SLURM_PROCID`` 0 and ``LOCAL_RANK`` unset or 0)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return rank == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _holder() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start_time": _start_time(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _stale(held: dict[str, Any], me: dict[str, Any]) -> str | None:
    """Why a recorded holder is gone (None: it may still be running)."""
    if held.get("slurm_job_id") and held.get("slurm_job_id") == me["slurm_job_id"]:
        return f"SLURM job {held['slurm_job_id']} was requeued"
    if held.get("host") == me["host"] and isinstance(held.get("pid"), int):
        if held["pid"] == me["pid"]:
            return "this process"
        if not _alive(held["pid"], held.get("start_time")):
            return f"pid {held['pid']} is gone"
    return None


class RunFolderLock:
    """Context manager holding ``<folder>/.rededit.lock`` (module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = _holder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                why = _stale(held, me)
                if why is None:
                    raise RunFolderLocked(
                        f"run folder {self.path.parent} is in use by another run (host {held.get('host')}, pid "
                        f"{held.get('pid')}, since {held.get('since')}): two runs in one folder would mix their "
                        "configs, checkpoints and metrics. Use another run folder (hydra.run.dir=... or another "
                        f"REDEDIT_RUN_ID); if that run is gone (e.g. its node died), delete {self.path}."
                    ) from None
                log.warning("run folder lock %s: taking over a stale lock (%s)", self.path, why)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunFolderLocked(f"could not take {self.path}: another run took it at the same moment")

    def _read(self) -> dict[str, Any]:
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable: treated as held by an unknown run (refused)
        return held if isinstance(held, dict) else {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
