"""Atomic sharded checkpoints: a run killed while it writes a checkpoint leaves the previous one loadable.

One-file checkpoints (single device, DDP) are written by
:class:`~rededit.parallel.file_checkpoint_io.AtomicCheckpointIO` (a temporary file beside the checkpoint,
renamed into place; Lightning's own writer commits through ``$TMPDIR``, a copy when that is another
filesystem). Sharded (DCP) checkpoints are directories written by
every rank straight into the final path; :func:`atomic_dir` / :func:`swap_in_dir` build the new directory
under a temporary name and swap it in (``FSDP2Strategy`` does this on rank 0 after a barrier).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def tmp_dir_for(path: str | os.PathLike) -> Path:
    """The temporary sibling a directory checkpoint is written to (same for every rank)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` (file or directory, may be absent) by the finished ``tmp`` directory.

    The old one is first renamed aside (``.<name>.old``) and removed only after the new one is in place,
    so at every instant either ``final`` or ``.<name>.old`` is a complete checkpoint.
    """
    old = final.with_name(f".{final.name}.old")
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Single-process form: yield a fresh temporary directory; on success it replaces ``path``.

    On an exception the temporary directory is removed and ``path`` is untouched.
    """
    final = Path(path)
    tmp = tmp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in_dir(tmp, final)


def recover(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else the ``.<name>.old`` left by a crash between the two renames."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        return old
    return path
