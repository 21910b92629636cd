"""Tar-shard payloads with an index for random access (issue 7; DESIGN.md "Data flow").

At 100M rows, one file per image is too many inodes and too many opens for a network filesystem.
``rededit-data shard`` packs a manifest's payloads (target, ordered references, edit mask, DPO
``rejected``) into plain tar files and rewrites the manifest's URIs to ``shard-00000.tar#<key>``.
The dataset then reads a member by one ``pread`` at the offset its index records: no extraction, no
scan of the tar, one open file per shard and process.

Layout of an output folder::

    manifest.parquet            the input manifest, same rows in the same order, URIs rewritten
    shard-00000.tar             standard tar (PAX, ``tar tf`` lists it), members ``<id>.<field><ext>``
    shard-00000.tar.idx.json    {"members": {key: [data_offset, size, crc32]}, "sha256": ..., ...}
    shards.json                 every shard's sha256, bytes and sample count; the write order

Order: samples are written **bucket-major** (all samples of one bucket of
:func:`rededit.data.buckets.assign_buckets` contiguous, buckets in id order, manifest order inside a
bucket), so the bucket sampler's steps, which draw from one bucket at a time, touch few shards. The
rewritten manifest keeps the input's row order, so it is a drop-in replacement: same sampler
schedule, same batches, byte-identical images.

Writing is atomic (temp name, then rename) and resumable: shard boundaries are planned up front from
the payload sizes (deterministic), and a shard whose index exists, matches the plan and matches the
tar's size is skipped on a rerun.

Memory: planning holds the manifest's URI columns as Python objects (~0.5 KB per row), fine for
millions of rows; shard a 100M-row manifest per partition (one output folder each, then concatenate
the rewritten manifests with paths relative to a common root) until planning streams.

Reading (:func:`read_member`) keeps a small per-process LRU of open shards. It opens lazily and
re-opens after a ``fork`` (DataLoader workers), and uses ``os.pread``, which has no shared file
position, so threads can share a handle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rededit.data.uri import resolve_path, resolve_uri, split_shard_uri
from rededit.utils.io import atomic_path, atomic_write_text
from rededit.utils.logging import get_logger

__all__ = [
    "INDEX_SUFFIX",
    "URI_COLUMNS",
    "ShardCorruptError",
    "ShardIndex",
    "ShardMemberNotFound",
    "ShardSummary",
    "clear_cache",
    "parse_size",
    "plan_shards",
    "read_member",
    "write_shards",
]

log = get_logger(__name__)

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "rededit-shard-index/1"
# Manifest columns that hold image URIs (data/schema.py, plus the DPO pair's dispreferred image that
# data/dataset.py reads when present). A string column or a list-of-strings column.
URI_COLUMNS: tuple[str, ...] = ("target", "references", "edit_mask", "rejected")
_FIELD_TAG = {"target": "target", "references": "ref", "edit_mask": "mask", "rejected": "rejected"}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
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


# --------------------------------------------------------------------------------------------------- planning
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
}


def parse_size(text: str | int) -> int:
    """Bytes from ``1073741824``, ``"512MB"``, ``"1GB"``, ``"64k"`` (binary units)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot parse size {text!r}; use bytes or a number with K/M/G(B)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {text!r}")
    return value


@dataclass
class PlannedShard:
    """One shard of the plan: its members in write order and the rows it holds."""

    name: str
    members: list[tuple[str, str]] = field(default_factory=list)  # (key, source URI)
    rows: list[int] = field(default_factory=list)
    payload_bytes: int = 0

    def digest(self) -> str:
        h = hashlib.sha256()
        for key, src in self.members:
            h.update(f"{key}\0{src}\n".encode())
        return h.hexdigest()


def _payload_size(uri: str, root: Path) -> int:
    shard = split_shard_uri(uri)
    if shard is not None:  # re-sharding a sharded manifest
        path = resolve_path(shard[0], root)
        entry = _CACHE.get(path.absolute())
        if shard[1] not in entry.index.members:
            raise ShardMemberNotFound(f"member {shard[1]!r} not in tar shard {path} (URI {uri!r})")
        return entry.index.members[shard[1]][1]
    path = resolve_path(uri, root)
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {uri!r} (resolved to {path})") from None


def _suffix(uri: str) -> str:
    name = (split_shard_uri(uri) or ("", uri))[1]
    suffix = Path(name.removeprefix("file://")).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


def _row_payloads(row: dict[str, Any], columns: Sequence[str]) -> list[tuple[str, str, int | None]]:
    """``[(column, uri, list position or None)]`` of one row, in a fixed order."""
    out = []
    for col in columns:
        value = row.get(col)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            out.extend((col, u, j) for j, u in enumerate(value) if u)
        elif value:
            out.append((col, value, None))
    return out


def bucket_major_order(manifest, buckets: str | None) -> np.ndarray:
    """Row order in which payloads are written: bucket-major (stable) with ``buckets``, else manifest order."""
    n = len(manifest)
    if buckets is None:
        return np.arange(n, dtype=np.int64)
    from rededit.data.buckets import ResolutionSet, assign_buckets, load_bucket_config

    cfg = load_bucket_config(buckets)
    assignment = assign_buckets(manifest.sizes(), ResolutionSet.from_config(cfg), cfg.get("task_groups"))
    return np.argsort(assignment.bucket_of_row, kind="stable").astype(np.int64)


def plan_shards(
    rows: Iterable[tuple[int, dict[str, Any]]],
    root: Path,
    *,
    shard_bytes: int,
    max_samples: int | None = None,
    columns: Sequence[str] = URI_COLUMNS,
) -> tuple[list[PlannedShard], dict[tuple[int, str, int | None], str]]:
    """Assign every row's payloads to shards in the given row order.

    A row never straddles two shards. A shard is closed before a row that would take it past
    ``shard_bytes`` of payload (a single larger row still gets a shard) or past ``max_samples`` rows.
    A URI used twice inside one shard (a shared reference image) is stored once.

    Returns:
        the shards, and ``{(row, column, list position): new URI}``.
    """
    shards: list[PlannedShard] = []
    new_uri: dict[tuple[int, str, int | None], str] = {}
    cur: PlannedShard | None = None
    seen: dict[str, str] = {}  # source URI -> key, in the current shard
    keys: set[str] = set()
    for row_idx, row in rows:
        payloads = _row_payloads(row, columns)
        fresh = {u for _, u, _ in payloads if cur is None or u not in seen}
        extra = sum(_payload_size(u, root) for u in fresh)
        full = cur is not None and (
            (cur.rows and cur.payload_bytes + extra > shard_bytes)
            or (max_samples is not None and len(cur.rows) >= max_samples)
        )
        if cur is None or full:
            cur = PlannedShard(name=f"shard-{len(shards):05d}.tar")
            shards.append(cur)
            seen, keys = {}, set()
            extra = sum(_payload_size(u, root) for u in {u for _, u, _ in payloads})
        stem = _SAFE.sub("_", str(row["id"])).strip("._") or f"row{row_idx}"
        for col, uri, pos in payloads:
            key = seen.get(uri)
            if key is None:
                tag = _FIELD_TAG.get(col, _SAFE.sub("_", col))
                key = f"{stem}.{tag}{'' if pos is None else pos}{_suffix(uri)}"
                if key in keys:  # two ids that sanitise alike
                    key = f"{stem}-r{row_idx}.{tag}{'' if pos is None else pos}{_suffix(uri)}"
                seen[uri] = key
                keys.add(key)
                cur.members.append((key, uri))
            new_uri[(row_idx, col, pos)] = f"{cur.name}#{key}"
        cur.rows.append(row_idx)
        cur.payload_bytes += extra
    return shards, new_uri


# --------------------------------------------------------------------------------------------------- writing
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    # Fixed metadata: the same payloads give a byte-identical tar (and sha256) on every rerun.
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    return info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_one(shard: PlannedShard, out_dir: Path, root: Path) -> ShardIndex:
    final = out_dir / shard.name
    members: dict[str, tuple[int, int, int]] = {}
    with atomic_path(final) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for key, src in shard.members:
                data = resolve_uri(src, root)
                tf.addfile(_tarinfo(key, len(data)), io.BytesIO(data))
                # addfile leaves the offset just past the data's 512-byte padding.
                data_offset = tf.offset - math.ceil(len(data) / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                members[key] = (data_offset, len(data), zlib.crc32(data))
        size = tmp.stat().st_size
        digest = _sha256(tmp)
    index = ShardIndex(
        tar=shard.name,
        tar_bytes=size,
        sha256=digest,
        members=members,
        plan=shard.digest(),
        samples=len(shard.rows),
    )
    index.dump(final)  # after the tar's rename: an index never describes a tar that is not there
    return index


def _is_done(shard: PlannedShard, out_dir: Path) -> ShardIndex | None:
    tar = out_dir / shard.name
    try:
        index = ShardIndex.load(tar)
    except (FileNotFoundError, ShardCorruptError, KeyError):
        return None
    if index.plan != shard.digest() or not tar.is_file() or tar.stat().st_size != index.tar_bytes:
        return None
    return index


@dataclass
class ShardSummary:
    """What :func:`write_shards` did."""

    out_dir: Path
    manifest: Path
    shards: list[dict[str, Any]]
    written: int
    skipped: int


def write_shards(
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    shard_size: str | int = "1GB",
    max_samples: int | None = None,
    buckets: str | None = None,
    verify_existing: bool = False,
) -> ShardSummary:
    """Pack a manifest's payloads into tar shards and write the rewritten manifest (see the module doc).

    Args:
        manifest_path: input Parquet manifest (its URIs may be files or shards).
        out_dir: output folder (must not be the manifest's own folder: its manifest would be replaced).
        shard_size: payload bytes per shard (``"1GB"``, ``"256MB"``, int).
        max_samples: also close a shard after this many rows.
        buckets: bucket set (a name in ``conf/data/buckets/`` or a YAML path) for bucket-major order;
            ``None`` keeps the manifest order.
        verify_existing: on a rerun, re-hash finished shards before skipping them.

    Returns:
        a :class:`ShardSummary`.
    """
    from rededit.data.manifest import Manifest

    manifest_path = Path(manifest_path)
    out = Path(out_dir)
    if out.resolve() == manifest_path.parent.resolve():
        raise ValueError(f"--out {out} is the input manifest's folder; choose a new folder")
    manifest = Manifest.open(manifest_path, validate=False)
    columns = [c for c in URI_COLUMNS if manifest.has(c)]
    if "target" not in columns:
        raise ValueError(f"manifest {manifest_path} has no 'target' column")
    order = bucket_major_order(manifest, buckets)
    table = manifest.table.select([*columns, "id"]).to_pylist()
    shards, new_uri = plan_shards(
        ((int(i), table[int(i)]) for i in order),
        manifest.root,
        shard_bytes=parse_size(shard_size),
        max_samples=max_samples,
        columns=columns,
    )
    out.mkdir(parents=True, exist_ok=True)
    records, written, skipped = [], 0, 0
    for shard in shards:
        index = _is_done(shard, out)
        if index is not None and verify_existing and _sha256(out / shard.name) != index.sha256:
            log.warning("%s: sha256 differs from its index; rewriting", shard.name)
            index = None
        if index is None:
            index = _write_one(shard, out, manifest.root)
            written += 1
            log.info("wrote %s (%d samples, %d bytes)", shard.name, index.samples, index.tar_bytes)
        else:
            skipped += 1
        records.append(
            {
                "tar": shard.name,
                "sha256": index.sha256,
                "bytes": index.tar_bytes,
                "samples": index.samples,
                "members": len(index.members),
                "first_row": shard.rows[0],
            }
        )

    # Same rows, same order, only URI columns rewritten: a drop-in replacement for the input.
    new_table = manifest.table
    for col in columns:
        values = manifest.table.column(col).to_pylist()
        rewritten = []
        for i, v in enumerate(values):
            if v is None:
                rewritten.append(None)
            elif isinstance(v, list):
                rewritten.append([new_uri[(i, col, j)] if u else u for j, u in enumerate(v)])
            else:
                rewritten.append(new_uri[(i, col, None)] if v else v)
        idx = new_table.schema.get_field_index(col)
        new_table = new_table.set_column(
            idx, new_table.schema.field(col), pa.array(rewritten, type=new_table.schema.field(col).type)
        )
    manifest_out = out / "manifest.parquet"
    with atomic_path(manifest_out) as tmp:
        pq.write_table(new_table, tmp)
    summary = {
        "source_manifest": str(manifest_path.resolve()),
        "order": f"bucket-major (buckets={buckets})" if buckets else "manifest order",
        "shard_size": parse_size(shard_size),
        "max_samples": max_samples,
        "rows": len(manifest),
        "manifest_sha256": _sha256(manifest_out),
        "shards": records,
    }
    atomic_write_text(out / "shards.json", json.dumps(summary, indent=1))
    return ShardSummary(out_dir=out, manifest=manifest_out, shards=records, written=written, skipped=skipped)
