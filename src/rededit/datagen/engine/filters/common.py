"""Helpers shared by the filter stages: decode a row's images, map a function over the kept rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from rededit.data.images import ImageDecodeError, load_image
from rededit.datagen.engine.runner import table_hash
from rededit.datagen.engine.stage import kept_mask

UNREADABLE = "unreadable"


def load_rgb(uri: str, root: str | Path, max_side: int | None = None, resample=Image.BILINEAR) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB pixels of ``uri``, downscaled so the longer side is at most ``max_side``.

    Analysis runs on a bounded size: the descriptors are scale-robust and 100M-row corpora need speed.
    """
    img = load_image(uri, root)
    if max_side is not None and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), resample)
    return np.asarray(img, dtype=np.uint8)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """``[H, W]`` float32 luma (ITU-R BT.601) in 0..255."""
    return rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def map_kept(
    table: pa.Table,
    fn: Callable[[dict[str, Any]], Any],
    columns: tuple[str, ...] = ("id", "target", "references"),
) -> tuple[list[Any], list[str | None]]:
    """Call ``fn(row)`` for every kept row; returns (results with None for dropped rows, reasons).

    A row whose image cannot be read gets reason ``UNREADABLE`` (the stage prefixes its name) instead of
    failing the whole partition: a data engine keeps going and reports what it dropped.
    """
    keep = kept_mask(table)
    cols = {c: table.column(c).to_pylist() for c in columns if c in table.column_names}
    results: list[Any] = [None] * table.num_rows
    reasons: list[str | None] = [None] * table.num_rows
    for i, k in enumerate(keep):
        if not k:
            continue
        row = {c: v[i] for c, v in cols.items()}
        try:
            results[i] = fn(row)
        except (FileNotFoundError, ImageDecodeError):
            reasons[i] = UNREADABLE
    return results, reasons


class PartitionMemo:
    """Per-partition results memoised by the partition's content, so a global stage that computes the same
    per-row values in ``fit`` and in ``process`` (in the same process) decodes every image once.

    Bounded (``max_partitions``) and never pickled: worker processes start empty and recompute."""

    def __init__(self, max_partitions: int = 64):
        self.max_partitions = max_partitions
        self._store: dict[str, Any] = {}

    def get(self, table: pa.Table, compute: Callable[[], Any]) -> Any:
        cols = [c for c in ("id", "target", "references", "drop_reason") if c in table.column_names]
        key = table_hash(table.select(cols))
        if key not in self._store:
            if len(self._store) >= self.max_partitions:
                self._store.pop(next(iter(self._store)))
            self._store[key] = compute()
        return self._store[key]

    def __getstate__(self):
        return {"max_partitions": self.max_partitions, "_store": {}}


class UnionFind:
    """Disjoint sets over ``0..n-1``; the root of a set is always its smallest index (the keeper)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


def duplicates_from_pairs(ids: list[str], pairs) -> dict[str, str]:
    """``{id: keeper id}`` for every non-keeper of each connected component of ``pairs`` (index pairs).
    The keeper is the component's first row in corpus order, so the result does not depend on workers."""
    uf = UnionFind(len(ids))
    for a, b in pairs:
        uf.union(int(a), int(b))
    return {ids[i]: ids[uf.find(i)] for i in range(len(ids)) if uf.find(i) != i}
