"""Issue 17 §2: a kill or a full disk during a save never leaves a broken checkpoint that ``ckpt_path=auto`` picks.

The attack: the run folder is on another filesystem than ``$TMPDIR`` (shared storage, a tmpfs); Lightning's
writer commits its temporary file with a copy there, so a kill -9 mid-copy leaves a truncated ``last.ckpt``
and ``ckpt_path=auto`` died with ``EOFError``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import compose, read_step_metric, train_overrides
from rededit.parallel.file_checkpoint_io import AtomicCheckpointIO
from rededit.utils.run_id import intact_checkpoint, resolve_ckpt_path


def test_lightning_writer_commits_through_tmpdir(tmp_path, monkeypatch) -> None:
    """Why rededit replaces it: Lightning's temporary file is in $TMPDIR, not beside the checkpoint, so on another
    filesystem its commit is a copy into the final name (not atomic)."""
    import tempfile

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    moves = []
    real_move = shutil.move
    monkeypatch.setattr(shutil, "move", lambda src, dst, *a, **k: (moves.append(src), real_move(src, dst))[1])
    TorchCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "run" / "last.ckpt")
    assert moves and Path(moves[0]).parent == elsewhere


def test_atomic_checkpoint_io_writes_beside_and_keeps_the_old_file_on_a_kill(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (replaced.append(Path(src)), real_replace(src, dst))[1]
    )
    real_save = torch.save

    def die_midway(obj, f, *args, **kwargs):  # part of the file reaches the disk, then the process "dies"
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise KeyboardInterrupt("killed while writing the checkpoint")

    monkeypatch.setattr(torch, "save", die_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind
    io.save_checkpoint({"global_step": 3}, path)
    assert replaced and replaced[-1].parent == path.parent  # the rename is within the folder
    assert io.load_checkpoint(path)["global_step"] == 3


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"half")  # what a kill -9 mid-save leaves
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("size", [0, 1, 200])
def test_intact_checkpoint_rejects_truncated_files(tmp_path, size) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}}, good)
    assert intact_checkpoint(good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:size])
    assert not intact_checkpoint(bad)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    assert not intact_checkpoint(sharded)  # .metadata is written last
    (sharded / ".metadata").write_bytes(b"m")
    assert intact_checkpoint(sharded)


def test_ckpt_path_auto_skips_a_truncated_last_ckpt(tmp_path, caplog) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 2}, ckpts / "step2.ckpt")
    os.utime(ckpts / "step2.ckpt", ns=(1, 1))
    (ckpts / "last.ckpt").write_bytes((ckpts / "step2.ckpt").read_bytes()[:50])  # killed mid-save
    assert resolve_ckpt_path("auto", tmp_path) == str(ckpts / "step2.ckpt")
    assert "last.ckpt" in caplog.text and "incomplete" in caplog.text
    (ckpts / "step2.ckpt").write_bytes(b"")  # nothing intact: refuse rather than silently start over
    with pytest.raises(RuntimeError, match="every checkpoint"):
        resolve_ckpt_path("auto", tmp_path)


def test_training_resumes_past_a_truncated_last_ckpt(tiny_corpus, tmp_path, monkeypatch) -> None:
    """End to end: 4 steps with a checkpoint every 2; last.ckpt truncated (as a kill during its save leaves it);
    the same command with ckpt_path=auto resumes from step 4's intact step checkpoint and finishes 6 steps.
    Every checkpoint of the run goes through the write-beside-and-rename writer."""
    from rededit.train import run

    saved = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        return real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)

    def overrides(steps: int) -> list[str]:
        return train_overrides(
            tiny_corpus,
            "backbone.transformer_config.num_layers=1",
            "data.val_split=null",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "ckpt_path=auto",
            f"export_dir={tmp_path / 'export'}",
            steps=steps,
            budget=256,
        )

    run(compose(overrides(4), tmp_path))
    assert "last.ckpt" in saved and len(saved) >= 2  # not Lightning's writer, which commits through $TMPDIR
    last = tmp_path / "checkpoints" / "last.ckpt"
    step_ckpts = [p for p in last.parent.glob("*.ckpt") if p.name != "last.ckpt"]
    assert step_ckpts and all(p.parent == last.parent for p in step_ckpts)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    result = run(compose(overrides(6), tmp_path))
    assert result["export_dir"]
    assert torch.load(last, weights_only=True)["global_step"] == 6
    # Issue 17 §2, "resume deletes the training curve": the resumed segment continues metrics.csv.
    assert sorted(read_step_metric(tmp_path)) == [1, 2, 3, 4, 5, 6]
