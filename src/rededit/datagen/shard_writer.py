"""Packing a manifest's payloads into indexed tar shards (``rededit-data shard``; issue 7).

The reader and the index format are :mod:`rededit.data.shards` (the training side); this is the offline
writer. It packs every payload column (target, ordered references, edit mask, DPO ``rejected``) into
plain tar files and writes a manifest with the same rows in the same order and URIs rewritten to
``shard-NNNNN.tar#<key>``, so it is a drop-in replacement: same sampler schedule, same batches,
byte-identical images.

Order: samples are written **bucket-major** (all samples of one bucket of
:func:`rededit.data.buckets.assign_buckets` contiguous, buckets in id order, manifest order inside a
bucket), so the bucket sampler's steps, which draw from one bucket at a time, touch few shards.

Writing is atomic (temp name, then rename) and resumable: shard boundaries are planned up front from
the payload sizes (deterministic), and a shard whose index exists, matches the plan and matches the
tar's size is skipped on a rerun.

Memory: planning holds the manifest's URI columns as Python objects (~0.5 KB per row), fine for
millions of rows; shard a 100M-row manifest per partition (one output folder each, then concatenate
the rewritten manifests with paths relative to a common root) until planning streams.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rededit.data.buckets import ResolutionSet, assign_buckets, load_bucket_config
from rededit.data.manifest import Manifest
from rededit.data.shards import URI_COLUMNS, ShardCorruptError, ShardIndex, member_size
from rededit.data.uri import resolve_path, resolve_uri, split_shard_uri
from rededit.utils.io import atomic_path, atomic_write_text, sha256_file
from rededit.utils.logging import get_logger

__all__ = ["ShardSummary", "parse_size", "plan_shards", "write_shards"]

log = get_logger(__name__)

_FIELD_TAG = {"target": "target", "references": "ref", "edit_mask": "mask", "rejected": "rejected"}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

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
        return member_size(resolve_path(shard[0], root), shard[1], uri=uri)
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
        digest = sha256_file(tmp)
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
        if index is not None and verify_existing and sha256_file(out / shard.name) != index.sha256:
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
        "manifest_sha256": sha256_file(manifest_out),
        "shards": records,
    }
    atomic_write_text(out / "shards.json", json.dumps(summary, indent=1))
    return ShardSummary(out_dir=out, manifest=manifest_out, shards=records, written=written, skipped=skipped)
