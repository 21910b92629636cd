"""Reading sharded (DCP) checkpoints without running code from them.

torch's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain ``pickle.load`` and the default
load planners read non-tensor entries with ``torch.load(weights_only=False)``: a crafted checkpoint folder
handed to ``stage.init_from=``, ``rededit-consolidate``, ``rededit-edit``/``rededit-eval`` or ``ckpt_path=``
would run code. Here

* :class:`SafeFileSystemReader` reads ``.metadata`` with :class:`~rededit.utils.safe_load.RestrictedUnpickler`
  whose allow-list (:func:`dcp_metadata_global_allowed`) is what DCP metadata holds: its dataclasses, the
  filesystem storage info, ``torch.Size``, dtypes, layouts and memory formats, paths;
* :func:`safe_dcp_load` / :func:`load_dcp_full` run DCP's load with that reader and every ``torch.load``
  forced to weights-only (:func:`~rededit.utils.safe_load.forced_weights_only`);
* :func:`verify_dcp_metadata` checks a folder before a library (Lightning's resume) reads it its own way.

Tensor payloads (``*.distcp``) are raw bytes at offsets named by the metadata, never unpickled.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from rededit.utils.safe_load import UnsafeCheckpointError, forced_weights_only, restricted_load

METADATA_FILE = ".metadata"

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


def dcp_metadata_global_allowed(module: str, name: str) -> bool:
    """Whether DCP metadata may reference ``module.name`` (dtypes and memory formats are ``torch.<name>``)."""
    if name in _METADATA_CLASSES.get(module, ()):
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format | torch.layout)
    return False


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read with the restricted unpickler (module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        metadata = restricted_load(path, dcp_metadata_global_allowed)
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
        # As torch's reader does: an old checkpoint has no storage_meta; the load id tags this read.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def verify_dcp_metadata(path: str | os.PathLike) -> None:
    """Raise :class:`~rededit.utils.safe_load.UnsafeCheckpointError` unless ``path/.metadata`` passes the
    allow-list (for loaders that read the folder with torch's own reader afterwards)."""
    SafeFileSystemReader(str(path)).read_metadata()


def safe_dcp_load(state_dict: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.distributed.checkpoint.load`` in place into ``state_dict`` (collective, like ``dcp.load``),
    reading ``path`` safely."""
    import torch.distributed.checkpoint as dcp

    verify_dcp_metadata(path)  # torch falls back to other metadata files when the reader raises: fail here
    try:
        with forced_weights_only():
            dcp.load(state_dict, storage_reader=SafeFileSystemReader(str(path)))
    except (pickle.UnpicklingError, CheckpointException) as err:
        _raise_if_refused(err, path)
        raise


def load_dcp_full(path: str | os.PathLike) -> dict[str, Any]:
    """Every entry of a DCP directory as one in-memory dict, in this process (all ranks' shards).

    What ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` does without the temporary file,
    with the safe reader and weights-only loads of non-tensor entries.
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    verify_dcp_metadata(path)  # torch falls back to other metadata files when the reader raises: fail here
    state: dict[str, Any] = {}
    try:
        with forced_weights_only():
            _load_state_dict(
                state,
                storage_reader=SafeFileSystemReader(str(path)),
                planner=_EmptyStateDictLoadPlanner(),
                no_dist=True,
            )
    except (pickle.UnpicklingError, CheckpointException) as err:
        _raise_if_refused(err, path)
        raise
    return state


def _raise_if_refused(err: BaseException, path: str | os.PathLike) -> None:
    """Turn torch's weights-only refusal (possibly wrapped per rank in a ``CheckpointException``) into ours."""
    causes = [err]
    if isinstance(err, CheckpointException):
        causes = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
    for cause in causes:
        if isinstance(cause, UnsafeCheckpointError):
            raise cause
        if isinstance(cause, pickle.UnpicklingError):
            raise UnsafeCheckpointError(
                f"{path}: refused a non-tensor entry that is not plain data (a crafted file may run code): {cause}"
            ) from err
