"""The data-engine stage contract (report §2.1–2.2): every filter, captioner and transform is a stage.

A stage maps one partition (a ``pyarrow.Table`` of manifest rows, see :mod:`rededit.data.schema`, plus
the columns earlier stages added) to the same rows in the same order with new columns and an updated
``drop_reason`` column (string; null = kept). Nothing is deleted: a dropped row stays in the table with
``drop_reason = "<stage name>:<why>"`` so every decision is auditable and reversible.

Stages that need every row before they can decide (near-duplicate clustering, statistically fitted keep
ranges, long-tail density) subclass :class:`GlobalEngineStage`: the runner calls ``fit`` on all
partitions first, then ``process`` partition by partition with the fitted state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

DROP_COLUMN = "drop_reason"


@dataclass
class StageContext:
    """Where and how a stage runs one partition.

    Attributes:
        root: dataset root; relative image URIs resolve against it (:func:`rededit.data.uri.resolve_uri`).
        seed: pipeline seed; stochastic stages derive every choice from (seed, partition, row id).
        stage_dir: scratch / cache / state folder of this stage (created by the runner).
        partition: partition name (e.g. ``"part-00003"``); ``""`` during ``fit``.
    """

    root: Path
    seed: int
    stage_dir: Path
    partition: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class EngineStage(Protocol):
    name: str  # used in drop_reason values "<name>:<why>" and output folder names
    version: str  # bump when behaviour changes; part of the partition content hash
    needs_model: bool  # True → Ray actor pool / one instance per worker process

    def setup(self) -> None: ...  # load models lazily (once per worker)

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        """Same rows, same order, new columns, ``drop_reason`` set for rows this stage drops; rows already
        dropped upstream pass through untouched. Pure function of (table, config, ctx.seed)."""
        ...


class BaseEngineStage(ABC):
    """Defaults for :class:`EngineStage`; subclasses implement :meth:`process` (or :meth:`process_kept`).

    ``config()`` returns the constructor arguments that change the output; the runner hashes it together
    with ``name`` and ``version`` into each partition's content hash, so changing a threshold recomputes.
    """

    name: str = "stage"
    version: str = "1"
    needs_model: bool = False

    def setup(self) -> None:  # noqa: B027 (optional hook)
        """Load models / heavy state; called once per worker process before the first ``process``."""

    def config(self) -> dict[str, Any]:
        """Output-affecting settings (JSON-serialisable). Default: public instance attributes."""
        return {k: _jsonable(v) for k, v in sorted(vars(self).items()) if not k.startswith("_")}

    @abstractmethod
    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table: ...

    # ---- helpers shared by stages -------------------------------------------------------------
    def drop(self, why: str) -> str:
        return f"{self.name}:{why}"


class GlobalEngineStage(BaseEngineStage):
    """A stage that must see every partition before deciding (dedup clusters, fitted keep ranges).

    The runner calls :meth:`fit` once with an iterator over all (upstream-processed) partitions, then
    :meth:`process` per partition (in worker processes, which receive the fitted stage by pickling).
    The runner saves :meth:`state_dict` as ``state.json`` in the stage folder and hashes it into every
    output partition's content hash, so a refit that changes the state recomputes the partitions, and a
    resumed run restores the state with :meth:`load_state_dict` instead of refitting. A stage whose
    ``state_dict`` returns None is refitted whenever it has partitions left to compute.
    """

    @abstractmethod
    def fit(self, partitions: Iterable[pa.Table], ctx: StageContext) -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        """JSON-serialisable fitted state, or None when the stage cannot be restored without refitting."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`fit` computed (the inverse of :meth:`state_dict`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore a fitted state")


def ensure_drop_column(table: pa.Table) -> pa.Table:
    """Add an all-null ``drop_reason`` column if the table has none."""
    if DROP_COLUMN in table.column_names:
        return table
    return table.append_column(pa.field(DROP_COLUMN, pa.string()), pa.nulls(table.num_rows, pa.string()))


def kept_mask(table: pa.Table) -> list[bool]:
    """``True`` for rows not dropped upstream."""
    if DROP_COLUMN not in table.column_names:
        return [True] * table.num_rows
    return [r is None for r in table.column(DROP_COLUMN).to_pylist()]


def set_column(
    table: pa.Table, name: str, values: pa.Array | list, type_: pa.DataType | None = None
) -> pa.Table:
    """Add or replace column ``name``."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


def apply_drops(table: pa.Table, reasons: list[str | None]) -> pa.Table:
    """Merge this stage's ``reasons`` (one per row, None = keep) into ``drop_reason``; upstream drops win."""
    table = ensure_drop_column(table)
    if len(reasons) != table.num_rows:
        raise ValueError(f"apply_drops: got {len(reasons)} reasons for {table.num_rows} rows")
    old = table.column(DROP_COLUMN).to_pylist()
    merged = [o if o is not None else r for o, r in zip(old, reasons)]
    return set_column(table, DROP_COLUMN, pa.array(merged, type=pa.string()))


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    if isinstance(v, Path):
        return str(v)
    return (
        repr(v)
        if not callable(getattr(v, "config", None))
        else {"type": type(v).__qualname__, **_jsonable(v.config())}
    )
