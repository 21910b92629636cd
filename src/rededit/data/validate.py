"""Manifest validation: find every problem in a manifest, report each with its row id and column.

Bad data never raises here: :func:`validate_manifest` returns the list of :class:`Problem` and the
caller decides (``Manifest.open(validate=True)`` raises :class:`ManifestError`, ``rededit-data
validate`` prints them). The table checks are vectorised with ``pyarrow.compute`` / numpy so they
stay cheap on 100M-row manifests; Python runs per *problem* row only, and each check reports at most
``max_per_check`` rows before summarising the rest. File checks (exists, decodes, size matches) run
per row, optionally on a deterministic sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rededit.data.images import ImageDecodeError, load_image
from rededit.data.schema import ALL_FIELDS, REQUIRED_COLUMNS, TEXT_COLUMNS
from rededit.utils.logging import get_logger
from rededit.utils.seeding import numpy_rng

if TYPE_CHECKING:
    from rededit.data.manifest import Manifest

__all__ = ["ManifestError", "Problem", "ValidationReport", "validate_manifest", "validate_manifest_report"]

log = get_logger(__name__)

_REF_LISTS = ("references", "reference_widths", "reference_heights")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest.

    Attributes:
        row_id: the row's ``id`` (None for column-level problems or rows whose id is missing).
        column: the offending column (None for table-level problems).
        message: what is wrong, in words that say what to fix.
        row_index: 0-based row number; shown only when the row has no usable id.
    """

    row_id: str | None
    column: str | None
    message: str
    row_index: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        parts = []
        if self.row_id is not None:
            parts.append(f"row {self.row_id!r}")
        elif self.row_index is not None:
            parts.append(f"row #{self.row_index}")
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        return f"{' '.join(parts)}: {self.message}" if parts else self.message


class ManifestError(ValueError):
    """An invalid manifest; the message lists every problem (up to ``max_lines``)."""

    def __init__(self, path: str | Path | None, problems: Sequence[Problem], max_lines: int = 50):
        self.path = Path(path) if path is not None else None
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"invalid manifest {self.path or '<in-memory>'}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  {p}" for p in self.problems[:max_lines]]
        if n > max_lines:
            lines.append(f"  ... and {n - max_lines} more")
        super().__init__("\n".join(lines))


@dataclass
class ValidationReport:
    """Everything ``rededit-data validate`` prints: the problems and what was looked at."""

    problems: list[Problem]
    num_rows: int
    images_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------------------------- types


def _kind(t: pa.DataType) -> str | None:
    """Coarse type family used for schema compatibility (int32 vs int64 etc. are both fine)."""
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_null(t):
        return "null"
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        inner = _kind(t.value_type)
        return f"list<{inner}>"
    return None


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    a, e = _kind(actual), _kind(expected)
    if a is None or e is None:
        return False
    # Integers are exact floats for pixel coordinates; the reverse would silently truncate.
    return (
        a == e or (e == "float" and a == "int") or (e == "list<float>" and a in ("list<int>", "list<null>"))
    )


def _canonical_type(expected: pa.DataType) -> pa.DataType:
    kind = _kind(expected)
    scalar = {"string": pa.string(), "int": pa.int64(), "float": pa.float64()}
    if kind in scalar:
        return scalar[kind]
    return pa.list_(scalar[kind[5:-1]])


# ------------------------------------------------------------------------------------------- helpers


def _rows(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row indices where a boolean column is true (null counts as false)."""
    return np.flatnonzero(np.asarray(pc.fill_null(mask, False).to_numpy(), dtype=bool))


def _blank(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a string is null, empty or whitespace only."""
    return pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), True)


def _list_layout(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(lengths ``[N]`` with null lists as -1, offsets ``[N+1]`` into the flat values, flat values)."""
    lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.maximum(lengths, 0), out=offsets[1:])
    flat = pc.list_flatten(col)
    flat = flat.combine_chunks() if isinstance(flat, pa.ChunkedArray) else flat
    return lengths, offsets, flat


def _parents(offsets: np.ndarray, flat_idx: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, flat_idx, side="right") - 1


class _Collector:
    """Turns row indices into :class:`Problem` objects, labelling rows by id and capping each check."""

    def __init__(self, ids: pa.ChunkedArray | None, max_per_check: int | None):
        self.ids = ids
        self.max_per_check = max_per_check
        self.table_level: list[Problem] = []
        self.row_level: list[Problem] = []
        self.overflow: list[Problem] = []

    def column(self, column: str | None, message: str) -> None:
        self.table_level.append(Problem(None, column, message))

    def labels(self, rows: np.ndarray) -> list[str | None]:
        if self.ids is None or len(rows) == 0:
            return [None] * len(rows)
        values = self.ids.take(pa.array(rows, type=pa.int64())).to_pylist()
        return [v if v and v.strip() else None for v in values]

    def rows(self, rows: np.ndarray, column: str, message: str | Callable[[np.ndarray], list[str]]) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        shown = rows if self.max_per_check is None else rows[: self.max_per_check]
        messages = [message] * len(shown) if isinstance(message, str) else message(shown)
        for r, rid, msg in zip(shown, self.labels(shown), messages):
            self.row_level.append(Problem(rid, column, msg, row_index=int(r)))
        if len(rows) > len(shown):
            self.overflow.append(
                Problem(None, column, f"... and {len(rows) - len(shown)} more rows like: {messages[0]}")
            )

    def add(self, problem: Problem) -> None:
        self.row_level.append(problem)

    def result(self) -> list[Problem]:
        rows = sorted(self.row_level, key=lambda p: -1 if p.row_index is None else p.row_index)
        return [*self.table_level, *rows, *self.overflow]


# -------------------------------------------------------------------------------------- table checks


def _schema_columns(table: pa.Table, out: _Collector) -> dict[str, pa.ChunkedArray]:
    """Check presence and types; return the usable schema columns cast to canonical types."""
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            out.column(name, "required column is missing")
    usable: dict[str, pa.ChunkedArray] = {}
    for name in table.column_names:
        expected = ALL_FIELDS.get(name)
        if expected is None:
            continue  # extra columns are allowed (provenance, scores from filters, ...)
        actual = table.schema.field(name).type
        if pa.types.is_null(actual):  # e.g. pandas writes an all-None column with type null
            if not expected.nullable:
                out.column(name, "column is entirely null")
                continue
            usable[name] = pc.cast(table.column(name), _canonical_type(expected.type))
            continue
        if not _compatible(actual, expected.type):
            out.column(name, f"type {actual} is not compatible with the schema type {expected.type}")
            continue
        try:
            usable[name] = pc.cast(table.column(name), _canonical_type(expected.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            out.column(name, f"cannot read as {expected.type}: {e}")
    return usable


def _check_ids(cols: dict[str, pa.ChunkedArray], out: _Collector) -> None:
    ids = cols.get("id")
    if ids is None:
        return
    blank = _blank(ids)
    out.rows(_rows(blank), "id", "id is null or empty")
    present = ids.filter(pc.invert(blank))
    counts = pc.value_counts(present)
    if isinstance(counts, pa.ChunkedArray):
        counts = counts.combine_chunks()
    dups = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dups) == 0:
        return
    dup_rows = _rows(pc.is_in(ids, value_set=dups))
    by_id: dict[str, list[int]] = {}
    for r, sid in zip(dup_rows.tolist(), ids.take(pa.array(dup_rows)).to_pylist()):
        by_id.setdefault(sid, []).append(r)
    items = list(by_id.items())
    cap = len(items) if out.max_per_check is None else out.max_per_check
    for sid, rows in items[:cap]:
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        out.add(
            Problem(sid, "id", f"duplicate id: {len(rows)} rows share it (rows {shown})", row_index=rows[0])
        )
    if len(items) > cap:
        out.overflow.append(Problem(None, "id", f"... and {len(items) - cap} more duplicated ids"))


def _invalid_utf8_rows(col: pa.ChunkedArray) -> np.ndarray:
    """Rows of a string (or list-of-string) column holding bytes that are not UTF-8.

    Arrow does not validate string data when Parquet is read, and the first ``to_pylist`` of such a row raises
    deep inside a worker; the full validation finds the bad chunks, Python's decoder the rows.
    """
    bad: list[int] = []
    offset = 0
    for chunk in col.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                flat = chunk.flatten()
                parents = pc.list_parent_indices(chunk).to_numpy()
                values = flat.view(pa.binary() if pa.types.is_string(flat.type) else pa.large_binary())
                rows = {
                    int(parents[j])
                    for j, v in enumerate(values.to_pylist())
                    if v is not None and not _utf8(v)
                }
                bad.extend(offset + r for r in sorted(rows))
            else:
                values = chunk.view(pa.binary() if pa.types.is_string(chunk.type) else pa.large_binary())
                bad.extend(
                    offset + i for i, v in enumerate(values.to_pylist()) if v is not None and not _utf8(v)
                )
        offset += len(chunk)
    return np.asarray(bad, dtype=np.int64)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_utf8(table: pa.Table, out: _Collector) -> None:
    for name in table.column_names:
        t = table.schema.field(name).type
        inner = t.value_type if (pa.types.is_list(t) or pa.types.is_large_list(t)) else t
        if pa.types.is_string(inner) or pa.types.is_large_string(inner):
            rows = _invalid_utf8_rows(table.column(name))
            if name == "id" and len(rows):
                out.ids = None  # rows are then named by their index: their ids cannot be printed
            out.rows(rows, name, f"{name} holds bytes that are not valid UTF-8")


def _check_strings(cols: dict[str, pa.ChunkedArray], out: _Collector) -> None:
    for name in ("task", "target"):
        if name in cols:
            out.rows(_rows(_blank(cols[name])), name, f"{name} is null or empty")
    if "edit_mask" in cols:
        # Null means "no mask"; an empty string is ambiguous and would fail at load time.
        col = cols["edit_mask"]
        empty = pc.and_(pc.is_valid(col), _blank(col))
        out.rows(_rows(empty), "edit_mask", "edit_mask is an empty string; use null for rows without a mask")
    if "rejected" in cols:
        col = cols["rejected"]
        empty = pc.and_(pc.is_valid(col), _blank(col))
        out.rows(_rows(empty), "rejected", "rejected is an empty string; use null for rows without a pair")


def _check_text(cols: dict[str, pa.ChunkedArray], n: int, out: _Collector) -> None:
    text_cols = [c for c in (*TEXT_COLUMNS, *(f"{t}_zh" for t in TEXT_COLUMNS)) if c in cols]
    if not text_cols:
        return  # a missing / mistyped instruction column is already reported
    no_text = np.ones(n, dtype=bool)
    for c in text_cols:
        no_text &= np.asarray(_blank(cols[c]).to_numpy(), dtype=bool)
    out.rows(
        np.flatnonzero(no_text),
        "instruction",
        "row has no text: instruction, caption and every other text column are empty",
    )


def _check_sizes(cols: dict[str, pa.ChunkedArray], out: _Collector) -> None:
    for name in ("target_width", "target_height"):
        if name not in cols:
            continue
        col = cols[name]
        bad = _rows(pc.fill_null(pc.less_equal(col, 0), True))
        out.rows(
            bad,
            name,
            lambda r, col=col, name=name: [
                f"{name} must be a positive integer, got {v}" for v in col.take(pa.array(r)).to_pylist()
            ],
        )


def _check_references(cols: dict[str, pa.ChunkedArray], out: _Collector) -> None:
    layouts: dict[str, tuple[np.ndarray, np.ndarray, pa.Array]] = {}
    for name in _REF_LISTS:
        if name not in cols:
            continue
        layouts[name] = _list_layout(cols[name])
        lengths = layouts[name][0]
        out.rows(
            np.flatnonzero(lengths < 0),
            name,
            f"{name} is null; use an empty list for rows without references",
        )
    if len(layouts) == len(_REF_LISTS):
        lens = np.stack([layouts[c][0] for c in _REF_LISTS])
        mismatch = np.flatnonzero((lens.min(0) >= 0) & ((lens[0] != lens[1]) | (lens[0] != lens[2])))
        out.rows(
            mismatch,
            "references",
            lambda r: [
                f"list lengths differ: references has {lens[0, i]}, reference_widths {lens[1, i]}, "
                f"reference_heights {lens[2, i]}"
                for i in r
            ],
        )
    if "references" in layouts:
        _, offsets, flat = layouts["references"]
        bad = _rows(_blank(pa.chunked_array([flat], type=pa.string())))
        parents = _parents(offsets, bad)
        pos = dict(zip(parents.tolist(), (bad - offsets[parents]).tolist()))
        out.rows(
            np.unique(parents), "references", lambda r: [f"reference {pos[i]} is null or empty" for i in r]
        )
    for name in ("reference_widths", "reference_heights"):
        if name not in layouts:
            continue
        _, offsets, flat = layouts[name]
        values = flat.to_numpy(zero_copy_only=False)
        valid = np.asarray(flat.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        bad = np.flatnonzero(~valid | (np.where(valid, values, 1) <= 0))
        parents = _parents(offsets, bad)
        first: dict[int, int] = {}
        for p, b in zip(parents.tolist(), bad.tolist()):
            first.setdefault(p, b)
        out.rows(
            np.unique(parents),
            name,
            lambda r, first=first, values=values, valid=valid, offsets=offsets, name=name: [
                f"{name}[{first[i] - offsets[i]}] must be a positive integer, got "
                f"{values[first[i]] if valid[first[i]] else None}"
                for i in r
            ],
        )


def _check_coords(cols: dict[str, pa.ChunkedArray], out: _Collector) -> None:
    for name, group, what in (
        ("face_landmarks", 10, "F faces x 5 landmarks x (x, y)"),
        ("object_boxes", 4, "O boxes x (x0, y0, x1, y1)"),
    ):
        if name not in cols:
            continue
        lengths, offsets, flat = _list_layout(cols[name])
        ragged = np.flatnonzero((lengths >= 0) & (lengths % group != 0))
        out.rows(
            ragged,
            name,
            lambda r, lengths=lengths, name=name, group=group, what=what: [
                f"{name} has {lengths[i]} values; expected a multiple of {group} ({what})" for i in r
            ],
        )
        values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls become NaN
        nonfinite = np.unique(_parents(offsets, np.flatnonzero(~np.isfinite(values))))
        out.rows(nonfinite, name, f"{name} contains null, NaN or infinite values")
        if name == "object_boxes":
            whole = (lengths > 0) & (lengths % 4 == 0)
            keep = np.repeat(whole, np.maximum(lengths, 0))
            boxes = values[keep].reshape(-1, 4)
            box_rows = _parents(offsets, np.flatnonzero(keep)[::4])
            inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
            out.rows(np.unique(box_rows[inverted]), name, "object_boxes has a box with x1 < x0 or y1 < y0")


# --------------------------------------------------------------------------------------- file checks


def _check_files(
    manifest: Manifest,
    cols: dict[str, pa.ChunkedArray],
    rows: np.ndarray,
    out: _Collector,
) -> int:
    """Decode every image of ``rows``; compare decoded sizes with the manifest. Returns images checked."""
    take = pa.array(rows, type=pa.int64())

    def values(name: str) -> list | None:
        return cols[name].take(take).to_pylist() if name in cols else None

    labels = out.labels(rows)
    target, tw, th = values("target"), values("target_width"), values("target_height")
    refs, rws, rhs = values("references"), values("reference_widths"), values("reference_heights")
    masks = values("edit_mask")
    rejected = values("rejected")
    cache: dict[str, tuple[int, int] | str] = {}

    def decoded_size(uri: str) -> tuple[int, int] | str:
        """(width, height) of the decoded image, or the reason it could not be decoded."""
        if uri not in cache:
            try:
                img = load_image(uri, manifest.root, mode=None)
                cache[uri] = img.size
                img.close()
            except (FileNotFoundError, ImageDecodeError, ValueError) as e:
                cache[uri] = str(e)
        return cache[uri]

    def check(
        k: int,
        column: str,
        uri: str | None,
        want: tuple[int | None, int | None],
        what: str = "",
        against: str = "the manifest's",
    ) -> None:
        if not uri or not uri.strip():
            return  # null / empty URIs are reported by the table checks
        size = decoded_size(uri)
        row = int(rows[k])
        if isinstance(size, str):
            out.add(Problem(labels[k], column, f"{what}{size}", row_index=row))
        elif None not in want and min(want) > 0 and tuple(size) != tuple(want):  # else reported above
            out.add(
                Problem(
                    labels[k],
                    column,
                    f"{what}decoded size {size[0]}x{size[1]} (WxH) does not match {against} "
                    f"{want[0]}x{want[1]}: {uri!r}",
                    row_index=row,
                )
            )

    for k in range(len(rows)):
        target_wh = (tw[k] if tw else None, th[k] if th else None)
        if target is not None:
            check(k, "target", target[k], target_wh)
        if masks is not None and masks[k] is not None:
            check(k, "edit_mask", masks[k], target_wh, against="the target's size")
        if rejected is not None and rejected[k] is not None:
            check(k, "rejected", rejected[k], target_wh, against="the target's size")
        if refs is not None and refs[k]:
            ws, hs = (rws[k] if rws else None), (rhs[k] if rhs else None)
            aligned = ws is not None and hs is not None and len(ws) == len(hs) == len(refs[k])
            for j, uri in enumerate(refs[k]):
                want = (ws[j], hs[j]) if aligned else (None, None)
                check(k, "references", uri, want, f"reference {j}: ")
    return len(cache)


# ---------------------------------------------------------------------------------------------- API


def validate_manifest_report(
    manifest: Manifest,
    *,
    check_files: bool = False,
    sample: int | None = None,
    seed: int = 0,
    max_per_check: int | None = 1000,
) -> ValidationReport:
    """Like :func:`validate_manifest`, also returning how many rows and images were looked at."""
    table = manifest.table
    n = table.num_rows
    out = _Collector(None, max_per_check)
    cols = _schema_columns(table, out)
    out.ids = cols.get("id")
    _check_utf8(table, out)
    _check_ids(cols, out)
    _check_strings(cols, out)
    _check_text(cols, n, out)
    _check_sizes(cols, out)
    _check_references(cols, out)
    _check_coords(cols, out)
    images = 0
    if check_files and n > 0:
        if sample is not None and sample < 0:
            raise ValueError(f"sample must be >= 0, got {sample}")
        if sample is None or sample >= n:
            rows = np.arange(n, dtype=np.int64)
        else:
            rows = np.sort(numpy_rng(seed, "validate").choice(n, size=sample, replace=False))
        images = _check_files(manifest, cols, rows, out)
    problems = out.result()
    log.debug("validated %d rows, %d images: %d problems", n, images, len(problems))
    return ValidationReport(problems=problems, num_rows=n, images_checked=images)


def validate_manifest(
    manifest: Manifest,
    *,
    check_files: bool = False,
    sample: int | None = None,
    seed: int = 0,
    max_per_check: int | None = 1000,
) -> list[Problem]:
    """Every problem in ``manifest`` (empty list = valid). Never raises on bad data.

    Args:
        manifest: the manifest to check.
        check_files: also resolve, fully decode and size-check every target / reference / edit_mask.
        sample: with ``check_files``, check the files of only this many rows, chosen deterministically
            from ``seed``; None checks all rows.
        seed: seed of the row sample.
        max_per_check: at most this many rows reported per check (the rest are summarised in one
            problem), so a systematic error in a huge manifest does not build millions of objects;
            None reports all.

    Returns:
        Table-level problems first (missing columns, wrong types), then row problems in row order.
    """
    return validate_manifest_report(
        manifest, check_files=check_files, sample=sample, seed=seed, max_per_check=max_per_check
    ).problems
