"""Issue 17 §2: two runs into one run folder are detected; a stale lock of a dead run is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import compose
from rededit.utils.run_lock import LOCK_NAME, RunFolderLock, RunFolderLocked, _start_time, is_launching_rank


@pytest.fixture()
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(folder, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "since": "earlier", "slurm_job_id": None, **fields}
    (folder / LOCK_NAME).write_text(json.dumps(holder))


def test_a_second_run_into_a_held_folder_is_refused_before_it_writes(
    tmp_path, live_process, tiny_corpus
) -> None:
    """The attack: another live run holds the folder; the second one must not touch config.yaml."""
    import rededit.train as train

    _write_lock(tmp_path, pid=live_process.pid, start_time=_start_time(live_process.pid))
    (tmp_path / "config.yaml").write_text("first run's config\n")
    with pytest.raises(RunFolderLocked, match=rf"pid {live_process.pid}.*another run folder"):
        train.run(compose([f"data.manifest={tiny_corpus}"], tmp_path))
    assert (tmp_path / "config.yaml").read_text() == "first run's config\n"


def test_lock_is_held_during_the_run_and_released_after(tmp_path) -> None:
    with RunFolderLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderLocked):  # held by a live process on this host: a second taker fails
            _other_process_takes(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()


def _other_process_takes(folder) -> None:
    code = f"from rededit.utils.run_lock import RunFolderLock; RunFolderLock({str(folder)!r}).acquire()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        raise RunFolderLocked(result.stderr)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid, start_time="1")
    with RunFolderLock(tmp_path):
        pass
    assert "stale lock" in caplog.text and not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, live_process) -> None:
    _write_lock(tmp_path, pid=live_process.pid, start_time="-1")  # same pid number, another process
    with RunFolderLock(tmp_path):
        pass


def test_other_host_is_refused_unless_the_same_slurm_job_was_requeued(tmp_path, monkeypatch) -> None:
    _write_lock(tmp_path, host="node-17", pid=1234, slurm_job_id="991")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunFolderLocked, match="node-17"):
        RunFolderLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "991")  # the requeued job: its previous incarnation was ended by SLURM
    with RunFolderLock(tmp_path):
        pass


def test_only_the_launching_rank_takes_the_lock(monkeypatch) -> None:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert is_launching_rank()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank process Lightning starts re-runs the command
    assert not is_launching_rank()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not is_launching_rank()


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused_before_it_writes(
    tmp_path, tiny_corpus
) -> None:
    """The trap (make demo-lora run twice): Lightning wrote the second run's checkpoints as ``last-v1.ckpt``,
    ``step0000500-v1.ckpt`` ... beside the first run's, and ``rededit-consolidate <run>`` merged the first run's
    ``last.ckpt`` (8-bit difference 57 from the export). A fresh run there is refused; ``ckpt_path=auto`` resumes."""
    import rededit.train as train
    from rededit.utils.config_checks import ConfigError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    (tmp_path / "config.yaml").write_text("first run's config\n")
    with pytest.raises(
        ConfigError, match=r"already holds checkpoints of an earlier run \(last\.ckpt\).*ckpt_path=auto"
    ):
        train.run(compose([f"data.manifest={tiny_corpus}"], tmp_path))
    assert (tmp_path / "config.yaml").read_text() == "first run's config\n"
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's checkpoint"
    train.refuse_stale_checkpoints(
        compose([f"data.manifest={tiny_corpus}", "ckpt_path=auto"], tmp_path), tmp_path
    )
