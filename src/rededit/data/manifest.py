"""Arrow-backed manifest access.

The manifest is read with pyarrow and kept as an Arrow table; the hot paths (bucket assignment,
the sampler's epoch schedule) read whole columns as numpy arrays through :meth:`Manifest.sizes`, so
nothing materialises a Python object per row and 100M-row manifests stay cheap. Only
:meth:`Manifest.row` builds a Python dict, for the one sample a dataset worker is loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rededit.data.schema import REQUIRED_COLUMNS
from rededit.data.validate import ManifestError, validate_manifest


@dataclass(frozen=True)
class ManifestSizes:
    """Columnar image sizes of a manifest: everything the bucket sampler needs, nothing else.

    Attributes:
        target_hw: ``[N, 2]`` int32, (height, width) of each row's target.
        ref_offsets: ``[N + 1]`` int64; references of row ``i`` are ``ref_hw[ref_offsets[i]:ref_offsets[i+1]]``.
        ref_hw: ``[M, 2]`` int32, (height, width) of every reference, row-major in reference order.
        task_codes: ``[N]`` int32 index into ``task_names``.
        task_names: the distinct task strings.
        cluster: ``[N]`` int64 semantic cluster ids, or None when the manifest has no ``cluster`` column.
    """

    target_hw: np.ndarray
    ref_offsets: np.ndarray
    ref_hw: np.ndarray
    task_codes: np.ndarray
    task_names: tuple[str, ...]
    cluster: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.target_hw.shape[0])

    @property
    def num_refs(self) -> np.ndarray:
        """``[N]`` number of references per row."""
        return np.diff(self.ref_offsets)


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets ``[N+1]`` int64, flat values) of a list column, without Python objects per row."""
    col = table.column(name).combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty tables stay chunked
        col = pa.array([], type=col.type)
    offsets = col.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return offsets, values


class Manifest:
    """A manifest table plus the directory its relative URIs resolve against."""

    def __init__(self, table: pa.Table, root: str | Path, path: str | Path | None = None):
        self.table = table
        self.root = Path(root)
        self.path = Path(path) if path is not None else None
        self._index: dict[str, int] | None = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        validate: bool = True,
        check_files: bool = False,
        columns: list[str] | None = None,
    ) -> Manifest:
        """Read a Parquet manifest. With ``validate`` an invalid manifest raises
        :class:`rededit.data.validate.ManifestError` listing every problem (row id and column)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"manifest not found: {path}")
        table = pq.read_table(path, columns=columns)
        manifest = cls(table, root=path.parent, path=path)
        if validate:
            problems = validate_manifest(manifest, check_files=check_files)
            if problems:
                raise ManifestError(path, problems)
        return manifest

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    def has(self, column: str) -> bool:
        return column in self.table.column_names

    def column_numpy(self, name: str) -> np.ndarray:
        """A flat (non-list) column as numpy (strings come back as an object array)."""
        return self.table.column(name).to_numpy()

    @property
    def ids(self) -> np.ndarray:
        return self.column_numpy("id")

    def index_of(self, sample_id: str) -> int:
        if self._index is None:
            self._index = {sid: i for i, sid in enumerate(self.table.column("id").to_pylist())}
        return self._index[sample_id]

    def sizes(self) -> ManifestSizes:
        """Columnar sizes for bucketing (see :class:`ManifestSizes`)."""
        t = self.table
        target_hw = np.stack(
            [
                t.column("target_height").to_numpy().astype(np.int32),
                t.column("target_width").to_numpy().astype(np.int32),
            ],
            axis=1,
        )
        offsets, heights = _list_column(t, "reference_heights")
        _, widths = _list_column(t, "reference_widths")
        ref_hw = np.stack([heights.astype(np.int32), widths.astype(np.int32)], axis=1).reshape(-1, 2)
        task = t.column("task").combine_chunks()
        if isinstance(task, pa.ChunkedArray):
            task = pa.array([], type=pa.string())
        encoded = task.dictionary_encode()
        cluster = t.column("cluster").to_numpy().astype(np.int64) if self.has("cluster") else None
        return ManifestSizes(
            target_hw=target_hw,
            ref_offsets=offsets,
            ref_hw=ref_hw,
            task_codes=encoded.indices.to_numpy().astype(np.int32),
            task_names=tuple(encoded.dictionary.to_pylist()),
            cluster=cluster,
        )

    def row(self, i: int) -> dict[str, Any]:
        """One row as a Python dict (list columns as lists)."""
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}

    def required_missing(self) -> list[str]:
        return [c for c in REQUIRED_COLUMNS if c not in self.table.column_names]
