"""Reading tar-shard payloads by index (issue 7; ``docs/architecture.md`` "Data flow").

At 100M rows, one file per image is too many inodes and too many opens for a network filesystem.
``rededit-data shard`` (:mod:`rededit.datagen.shard_writer`) packs a manifest's payloads into plain tar
files with a sidecar index and rewrites the manifest's URIs to ``shard-00000.tar#<key>``. The dataset
then reads a member by one ``pread`` at the offset its index records: no extraction, no scan of the tar,
one open file per shard and process. This module is the training-side half: the index format and the
reader; the writer lives with the offline data tools.

Layout of a sharded folder::

    manifest.parquet            the input manifest, same rows in the same order, URIs rewritten
    shard-00000.tar             standard tar (PAX, ``tar tf`` lists it), members ``<id>.<field><ext>``
    shard-00000.tar.idx.json    {"members": {key: [data_offset, size, crc32]}, "sha256": ..., ...}
    shards.json                 every shard's sha256, bytes and sample count; the write order

Reading (:func:`read_member`) keeps a small per-process LRU of open shards. It opens lazily and
re-opens after a ``fork`` (DataLoader workers), and uses ``os.pread``, which has no shared file
position, so threads can share a handle.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from rededit.utils.io import atomic_write_text
from rededit.utils.logging import get_logger

__all__ = [
    "INDEX_SUFFIX",
    "URI_COLUMNS",
    "ShardCorruptError",
    "ShardIndex",
    "ShardMemberNotFound",
    "clear_cache",
    "member_size",
    "read_member",
]

log = get_logger(__name__)

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "rededit-shard-index/1"
# Manifest columns that hold image URIs (data/schema.py, plus the DPO pair's dispreferred image that
# data/dataset.py reads when present). A string column or a list-of-strings column.
URI_COLUMNS: tuple[str, ...] = ("target", "references", "edit_mask", "rejected")
_MAX_OPEN = 64  # open shards kept per process (bounded: a long epoch may touch thousands)


class ShardMemberNotFound(FileNotFoundError):
    """A key is not in a shard's index (a missing member is a missing image: the dataset skips it)."""


class ShardCorruptError(ValueError):
    """A shard member's bytes do not match its index (truncated shard, bit rot, shard rewritten)."""


# --------------------------------------------------------------------------------------------------- index
@dataclass
class ShardIndex:
    """The sidecar index of one tar shard.

    Attributes:
        tar: the shard's file name (``shard-00000.tar``).
        tar_bytes: size of the tar file the index was written for.
        sha256: hex digest of the whole tar.
        members: ``{key: (data_offset, size, crc32)}``; ``data_offset`` is the byte offset of the
            member's data (after its tar header) in the tar file.
        plan: digest of the planned (key, source URI) list, used to decide that a rerun may skip it.
        samples: number of manifest rows whose payloads live in this shard.
    """

    tar: str
    tar_bytes: int
    sha256: str
    members: dict[str, tuple[int, int, int]]
    plan: str = ""
    samples: int = 0

    @staticmethod
    def path_for(shard: str | Path) -> Path:
        return Path(f"{shard}{INDEX_SUFFIX}")

    @classmethod
    def load(cls, shard: str | Path) -> ShardIndex:
        path = cls.path_for(shard)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"index of tar shard {shard} not found ({path}); rebuild it with `rededit-data shard`"
            ) from None
        except (OSError, ValueError) as e:
            raise ShardCorruptError(f"index of tar shard {shard} is unreadable ({path}): {e}") from e
        if raw.get("format") != INDEX_FORMAT:
            raise ShardCorruptError(f"index {path}: format {raw.get('format')!r}, expected {INDEX_FORMAT!r}")
        members = {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in raw["members"].items()}
        return cls(
            tar=raw["tar"],
            tar_bytes=int(raw["tar_bytes"]),
            sha256=raw["sha256"],
            members=members,
            plan=raw.get("plan", ""),
            samples=int(raw.get("samples", 0)),
        )

    def dump(self, shard: str | Path) -> None:
        body = {
            "format": INDEX_FORMAT,
            "tar": self.tar,
            "tar_bytes": self.tar_bytes,
            "sha256": self.sha256,
            "plan": self.plan,
            "samples": self.samples,
            "members": {k: list(v) for k, v in self.members.items()},
        }
        atomic_write_text(self.path_for(shard), json.dumps(body, separators=(",", ":")))


# --------------------------------------------------------------------------------------------------- reading
class _OpenShard:
    __slots__ = ("fd", "index", "path")

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise FileNotFoundError(f"tar shard not found: {path}")
        self.index = ShardIndex.load(path)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        size = os.fstat(self.fd).st_size
        if size != self.index.tar_bytes:
            os.close(self.fd)
            raise ShardCorruptError(
                f"tar shard {path} is {size} bytes but its index was written for {self.index.tar_bytes} "
                "(truncated or rewritten); rerun `rededit-data shard`"
            )


class _ShardCache:
    """Per-process LRU of open shards; a forked child drops the parent's entries on first use."""

    def __init__(self, max_open: int = _MAX_OPEN):
        self.max_open = max_open
        self.pid = os.getpid()
        self.entries: OrderedDict[str, _OpenShard] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, path: Path) -> _OpenShard:
        key = str(path)
        with self.lock:
            if self.pid != os.getpid():
                # After fork the descriptors are this process's own copies; close them and start over so
                # no process ever shares a handle opened by another.
                for entry in self.entries.values():
                    _close(entry.fd)
                self.entries.clear()
                self.pid = os.getpid()
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                return entry
            entry = _OpenShard(path)
            self.entries[key] = entry
            while len(self.entries) > self.max_open:
                _close(self.entries.popitem(last=False)[1].fd)
            return entry

    def clear(self) -> None:
        with self.lock:
            for entry in self.entries.values():
                _close(entry.fd)
            self.entries.clear()


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


_CACHE = _ShardCache()


def _after_fork_in_child() -> None:
    # A fork while another thread held the lock would leave the child's copy locked forever: start over,
    # closing the inherited descriptors (the child's own copies; the parent's stay open).
    inherited = list(_CACHE.entries.values())
    _CACHE.lock = threading.Lock()
    _CACHE.entries = OrderedDict()
    _CACHE.pid = os.getpid()
    for entry in inherited:
        _close(entry.fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def clear_cache() -> None:
    """Close every shard this process has open (tests; a rewritten shard is re-read after this)."""
    _CACHE.clear()


def member_size(shard: str | Path, key: str, *, uri: str | None = None) -> int:
    """Size in bytes of member ``key`` of tar shard ``shard``, from its index (nothing read from the tar).

    Raises:
        FileNotFoundError / ShardMemberNotFound: as :func:`read_member`.
    """
    path = Path(shard)
    members = _CACHE.get(path.absolute()).index.members
    if key not in members:
        where = f" (URI {uri!r})" if uri else ""
        raise ShardMemberNotFound(f"member {key!r} not in tar shard {path}{where}")
    return members[key][1]


def read_member(shard: str | Path, key: str, *, uri: str | None = None, verify: bool = True) -> bytes:
    """Bytes of member ``key`` of tar shard ``shard``, by one ``pread`` at the indexed offset.

    Args:
        shard: path of the ``.tar`` file (its index is ``<shard>.idx.json``).
        key: member name.
        uri: the manifest URI, named in errors.
        verify: check the member's CRC-32 against the index (cheap next to decoding the image).

    Raises:
        FileNotFoundError: the shard or its index does not exist.
        ShardMemberNotFound: ``key`` is not in the shard (a ``FileNotFoundError``).
        ShardCorruptError: the bytes read do not match the index (a ``ValueError``).
    """
    path = Path(shard)
    entry = _CACHE.get(path.absolute())
    where = f" (URI {uri!r})" if uri else ""
    try:
        offset, size, crc = entry.index.members[key]
    except KeyError:
        raise ShardMemberNotFound(f"member {key!r} not in tar shard {path}{where}") from None
    data = os.pread(entry.fd, size, offset)
    if len(data) != size:
        raise ShardCorruptError(
            f"tar shard {path}: member {key!r} truncated (read {len(data)} of {size} bytes at offset {offset}){where}"
        )
    if verify and zlib.crc32(data) != crc:
        raise ShardCorruptError(f"tar shard {path}: member {key!r} is corrupt (CRC-32 mismatch){where}")
    return data
