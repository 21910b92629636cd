"""One-file checkpoints (single device, DDP, FSDP2 with ``save_distributed_checkpoint=false``) written atomically.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
``$TMPDIR``; when the run folder is on another filesystem (a cluster's shared storage, a tmpfs), committing
it is a copy into the final name, so a kill -9 or a full disk during the copy leaves a truncated
``last.ckpt`` that ``ckpt_path=auto`` then picks. :class:`AtomicCheckpointIO` serialises into a temporary
file *beside* the checkpoint, fsyncs it and renames it into place: the final name only ever holds a
complete file. :func:`rededit.utils.run_id.intact_checkpoint` is the cheap check ``ckpt_path=auto`` uses on candidates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from rededit.utils.io import atomic_path


def _is_remote(path: Any) -> bool:
    return "://" in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are write-beside, fsync, rename (module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or _is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        final = Path(path)
        for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a run killed mid-save
            stale.unlink(missing_ok=True)
        with atomic_path(final) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        return None
