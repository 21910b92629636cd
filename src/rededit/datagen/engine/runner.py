"""The data-engine pipeline runner (report §2.1–2.2): Parquet partitions in, Parquet partitions out.

Layout of ``out_dir``::

    input/part-00000.parquet …          the manifest split into partitions of ``partition_rows`` rows
    stages/00_<name>/part-00000.parquet  each stage's output partitions (all rows, ``drop_reason`` set)
    stages/00_<name>/state.json          fitted state of a global stage (keep ranges, duplicate map)
    stages/00_<name>/report.{json,md}    kept / dropped counts of this stage, per reason
    report.{json,md}                     all stages in one table
    result.parquet                       every row after the last stage, with ``drop_reason`` (nothing deleted)
    kept.parquet                         the rows no stage dropped (a manifest for training)

Content hashes make the runner resumable. An input partition's hash is the SHA-256 of its rows (Arrow IPC
bytes); a stage output's hash is ``sha256(input hash, stage class, name, version, config, fitted state)``
and is stored in the Parquet file's metadata. A partition whose file already carries the expected hash is
skipped; one with another hash (a changed threshold, a new stage version, changed upstream rows) is
recomputed. Every file is written under a temporary name and renamed (:mod:`rededit.utils.io`), so an
interrupted run leaves only whole partitions behind.

Backends: ``local`` runs partitions in a process pool (``workers`` processes, one stage instance per
worker, :meth:`setup` called once per worker; ``workers <= 1`` runs in this process) and ``ray`` maps the
same per-partition function over a ``ray.data`` dataset with an actor pool (one stage per actor).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rededit.datagen.engine.stage import (
    DROP_COLUMN,
    BaseEngineStage,
    EngineStage,
    GlobalEngineStage,
    StageContext,
    _jsonable,
    ensure_drop_column,
)
from rededit.utils.io import atomic_path, atomic_write_text
from rededit.utils.logging import get_logger
from rededit.utils.progress import track

log = get_logger(__name__)

HASH_KEY = b"rededit.engine.hash"
BACKENDS = ("local", "ray")


# ---------------------------------------------------------------------------------------------- hashing
def table_hash(table: pa.Table) -> str:
    """SHA-256 of a table's rows and schema (Arrow IPC stream bytes: independent of Parquet encoding)."""
    sink = pa.BufferOutputStream()
    # take() copies into fresh zero-offset buffers: the same rows give the same bytes however the table
    # was chunked or sliced (IPC writes a sliced string column's whole data buffer).
    table = table.replace_schema_metadata(None).take(pa.array(np.arange(table.num_rows, dtype=np.int64)))
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def stage_spec(stage: EngineStage) -> dict[str, Any]:
    """Everything about a stage that changes its output: class, name, version, config."""
    cfg = stage.config() if callable(getattr(stage, "config", None)) else {}
    return {
        "class": f"{type(stage).__module__}.{type(stage).__qualname__}",
        "name": stage.name,
        "version": str(stage.version),
        "config": _jsonable(cfg),
    }


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def read_hash(path: Path) -> str | None:
    """The content hash stored in a partition file's metadata (None if missing or unreadable)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(HASH_KEY)
    return value.decode() if value else None


def read_partition(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read one partition file (``ParquetFile.read``: no dataset discovery, which costs more than a small
    partition's bytes)."""
    with pq.ParquetFile(path) as f:
        return f.read(columns=columns)


def write_partition(table: pa.Table, path: Path, content_hash: str) -> None:
    """Write ``table`` to ``path`` atomically, with ``content_hash`` in its metadata."""
    meta = dict(table.schema.metadata or {})
    meta[HASH_KEY] = content_hash.encode()
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)


# ----------------------------------------------------------------------------------- per-partition work
@dataclass(frozen=True)
class PartitionJob:
    """One partition for one stage: read ``in_path``, process, write ``out_path`` with ``out_hash``."""

    partition: str
    in_path: str
    out_path: str
    out_hash: str
    root: str
    seed: int
    stage_dir: str


def check_stage_output(before: pa.Table, after: pa.Table, stage_name: str, partition: str) -> None:
    """The contract: same rows in the same order, upstream drops untouched. Raises ValueError naming the stage."""
    where = f"stage {stage_name!r}, partition {partition}"
    if after.num_rows != before.num_rows:
        raise ValueError(
            f"{where}: returned {after.num_rows} rows for {before.num_rows} (rows are never removed)"
        )
    if DROP_COLUMN not in after.column_names:
        raise ValueError(f"{where}: output has no {DROP_COLUMN!r} column")
    if after.column("id").to_pylist() != before.column("id").to_pylist():
        raise ValueError(f"{where}: row ids or their order changed")
    old = before.column(DROP_COLUMN).to_pylist()
    new = after.column(DROP_COLUMN).to_pylist()
    for i, (o, n) in enumerate(zip(old, new)):
        if o is not None and n != o:
            raise ValueError(f"{where}: row {i} was dropped upstream ({o!r}) but its reason became {n!r}")


def run_job(stage: EngineStage, job: PartitionJob) -> str:
    """Process one partition (the unit every backend schedules). Returns the partition name."""
    table = ensure_drop_column(read_partition(job.in_path))
    table = table.replace_schema_metadata(None)
    ctx = StageContext(
        root=Path(job.root), seed=job.seed, stage_dir=Path(job.stage_dir), partition=job.partition
    )
    out = stage.process(table, ctx)
    check_stage_output(table, out, stage.name, job.partition)
    write_partition(out, Path(job.out_path), job.out_hash)
    return job.partition


_WORKER_STAGE: EngineStage | None = None


def _worker_init(stage_blob: bytes) -> None:
    global _WORKER_STAGE
    _WORKER_STAGE = pickle.loads(stage_blob)
    _WORKER_STAGE.setup()


def _worker_run(job: PartitionJob) -> str:
    assert _WORKER_STAGE is not None, "worker not initialised"
    return run_job(_WORKER_STAGE, job)


class _RayStageActor:
    """Ray Data actor: one stage instance per actor, ``setup`` once; maps batches of partition jobs."""

    def __init__(self, stage_blob: bytes):
        self.stage = pickle.loads(stage_blob)
        self.stage.setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        jobs = [PartitionJob(**json.loads(j)) for j in batch["job"]]
        return {"partition": [run_job(self.stage, j) for j in jobs]}


# -------------------------------------------------------------------------------------------- runner
@dataclass
class StageReport:
    """Kept / dropped counts of one stage. ``dropped`` counts only the rows this stage dropped, per reason."""

    index: int
    name: str
    rows: int
    kept_in: int
    kept_out: int
    dropped: dict[str, int]
    computed: list[str] = field(default_factory=list)  # partitions computed by this run (others were reused)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "stage": self.name,
            "rows": self.rows,
            "kept_in": self.kept_in,
            "kept_out": self.kept_out,
            "dropped": dict(sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


@dataclass
class PipelineResult:
    out_dir: Path
    partitions: list[str]
    reports: list[StageReport]

    @property
    def result_path(self) -> Path:
        return self.out_dir / "result.parquet"

    @property
    def kept_path(self) -> Path:
        return self.out_dir / "kept.parquet"

    def computed(self, stage_name: str) -> list[str]:
        """Partitions that ``stage_name`` computed in this run."""
        return [p for r in self.reports if r.name == stage_name for p in r.computed]


class PipelineRunner:
    """Run ``stages`` over a manifest, partition by partition, resumably.

    Args:
        stages: :class:`~rededit.datagen.engine.stage.EngineStage` objects in order (Hydra ``_target_`` list).
        out_dir: output folder (layout in the module docstring); reusing it resumes.
        partition_rows: rows per partition.
        workers: processes (local) or actors (ray); ``<= 1`` runs in this process with the local backend.
        backend: ``local`` or ``ray``.
        seed: pipeline seed handed to every stage (``StageContext.seed``).
        mp_context: multiprocessing start method of the local pool (``spawn`` is safe with torch threads).
        ray_num_gpus: GPUs per actor for stages with ``needs_model`` (ray backend).
    """

    def __init__(
        self,
        stages: Sequence[EngineStage],
        out_dir: str | Path,
        *,
        partition_rows: int = 1024,
        workers: int = 1,
        backend: str = "local",
        seed: int = 0,
        mp_context: str = "spawn",
        ray_num_gpus: float = 0.0,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown engine backend {backend!r}; choose one of {BACKENDS}")
        if partition_rows < 1:
            raise ValueError(f"partition_rows must be >= 1, got {partition_rows}")
        self.stages = list(stages)
        for s in self.stages:
            for attr in ("name", "version", "process"):
                if not hasattr(s, attr):
                    raise TypeError(f"engine stage {s!r} has no {attr!r} (see rededit.datagen.engine.stage)")
        self.out_dir = Path(out_dir)
        self.partition_rows = int(partition_rows)
        self.workers = int(workers)
        self.backend = backend
        self.seed = int(seed)
        self.mp_context = mp_context
        self.ray_num_gpus = float(ray_num_gpus)

    # ---- input ---------------------------------------------------------------------------------
    def split(self, manifest_path: str | Path) -> list[tuple[str, str]]:
        """Split the manifest into ``input/part-XXXXX.parquet``; returns ``[(partition, hash)]``.

        Streams the manifest (record batches), so a 100M-row manifest is never held in memory at once.
        Unchanged partitions are not rewritten."""
        names = pq.read_schema(manifest_path).names
        if "id" not in names:
            raise ValueError(f"manifest {manifest_path} has no 'id' column")
        parts = []
        for i, chunk in enumerate(_iter_row_chunks(manifest_path, self.partition_rows)):
            name = f"part-{i:05d}"
            chunk = ensure_drop_column(chunk.replace_schema_metadata(None)).combine_chunks()
            h = table_hash(chunk)
            path = self.out_dir / "input" / f"{name}.parquet"
            if read_hash(path) != h:
                write_partition(chunk, path, h)
            parts.append((name, h))
        return parts

    # ---- one stage -----------------------------------------------------------------------------
    def stage_dir(self, index: int, stage: EngineStage) -> Path:
        return self.out_dir / "stages" / f"{index:02d}_{stage.name}"

    @staticmethod
    def _iter_tables(paths: Sequence[Path]) -> Iterator[pa.Table]:
        for p in paths:
            yield ensure_drop_column(read_partition(p).replace_schema_metadata(None))

    def _fit(
        self,
        stage: GlobalEngineStage,
        sdir: Path,
        in_paths: list[Path],
        in_hashes: list[str],
        spec: str,
        out_paths: list[Path],
    ) -> str:
        """Fit (or restore) a global stage; returns the state fingerprint that goes into output hashes.

        The fit is keyed by (stage spec, every input hash): unchanged inputs restore ``state.json``
        instead of refitting; a stage that cannot restore its state is refitted only if some output
        partition is missing or stale."""
        fit_key = _sha(spec, *in_hashes)
        state_path = sdir / "state.json"
        saved = json.loads(state_path.read_text()) if state_path.is_file() else None
        if saved is not None and saved.get("fit_key") == fit_key:
            if saved.get("state") is not None:
                stage.load_state_dict(saved["state"])
                return saved["fingerprint"]
            fp = saved["fingerprint"]
            if all(read_hash(o) == _sha(h, spec, fp) for o, h in zip(out_paths, in_hashes)):
                return fp
        log.info("engine: fitting %s on %d partitions", stage.name, len(in_paths))
        ctx = StageContext(root=self._root, seed=self.seed, stage_dir=sdir, partition="")
        stage.fit(self._iter_tables(in_paths), ctx)
        state = stage.state_dict() if callable(getattr(stage, "state_dict", None)) else None
        fp = _sha(json.dumps(state, sort_keys=True)) if state is not None else fit_key
        atomic_write_text(
            state_path, json.dumps({"fit_key": fit_key, "fingerprint": fp, "state": state}, indent=1)
        )
        return fp

    def _run_jobs(self, stage: EngineStage, jobs: list[PartitionJob]) -> None:
        if not jobs:
            return
        if self.backend == "ray":
            self._run_ray(stage, jobs)  # Ray Data shows its own progress
        elif self.workers <= 1:
            stage.setup()
            for job in track(jobs, desc=f"pipeline {stage.name}", unit="partitions"):
                run_job(stage, job)
        else:
            blob = pickle.dumps(stage)
            ctx = get_context(self.mp_context)
            n = min(self.workers, len(jobs))
            with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init, initargs=(blob,)) as pool:
                for _ in track(
                    pool.map(_worker_run, jobs), len(jobs), f"pipeline {stage.name}", unit="partitions"
                ):
                    pass

    def _run_ray(self, stage: EngineStage, jobs: list[PartitionJob]) -> None:
        try:
            import ray
            import ray.data
        except ImportError as e:
            raise ImportError("the ray backend needs Ray Data: pip install -e .[engine]") from e
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, include_dashboard=False)
        items = [{"job": json.dumps(j.__dict__)} for j in jobs]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        gpus = self.ray_num_gpus if getattr(stage, "needs_model", False) else 0.0
        ds = ds.map_batches(
            _RayStageActor,
            fn_constructor_args=(pickle.dumps(stage),),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, self.workers)),
            num_gpus=gpus,
        )
        done = {row["partition"] for row in ds.take_all()}
        missing = {j.partition for j in jobs} - done
        if missing:
            raise RuntimeError(
                f"ray backend: stage {stage.name!r} did not finish partitions {sorted(missing)}"
            )

    def _report(
        self, index: int, stage: EngineStage, sdir: Path, in_paths, out_paths, computed
    ) -> StageReport:
        rows = kept_in = kept_out = 0
        dropped: Counter[str] = Counter()
        for ip, op in zip(in_paths, out_paths):
            old = (
                read_partition(ip, [DROP_COLUMN]).column(DROP_COLUMN).to_pylist()
                if DROP_COLUMN in pq.read_schema(ip).names
                else [None] * pq.read_metadata(ip).num_rows
            )
            new = read_partition(op, [DROP_COLUMN]).column(DROP_COLUMN).to_pylist()
            rows += len(new)
            kept_in += sum(o is None for o in old)
            kept_out += sum(n is None for n in new)
            dropped.update(n for o, n in zip(old, new) if o is None and n is not None)
        rep = StageReport(index, stage.name, rows, kept_in, kept_out, dict(dropped), list(computed))
        atomic_write_text(sdir / "report.json", json.dumps(rep.to_json(), indent=1))
        atomic_write_text(sdir / "report.md", render_markdown([rep]))
        return rep

    # ---- whole pipeline ------------------------------------------------------------------------
    def run(self, manifest_path: str | Path) -> PipelineResult:
        """Split, run every stage, write reports, ``result.parquet`` and ``kept.parquet``."""
        manifest_path = Path(manifest_path)
        if not manifest_path.is_file():
            raise FileNotFoundError(f"engine input manifest not found: {manifest_path}")
        self._root = manifest_path.parent.resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        parts = self.split(manifest_path)
        names = [n for n, _ in parts]
        hashes = [h for _, h in parts]
        in_paths = [self.out_dir / "input" / f"{n}.parquet" for n in names]
        reports: list[StageReport] = []
        for index, stage in enumerate(self.stages):
            sdir = self.stage_dir(index, stage)
            sdir.mkdir(parents=True, exist_ok=True)
            spec = json.dumps(stage_spec(stage), sort_keys=True)
            out_paths = [sdir / f"{n}.parquet" for n in names]
            state_fp = ""
            if callable(getattr(stage, "fit", None)):
                state_fp = self._fit(stage, sdir, in_paths, hashes, spec, out_paths)
            out_hashes = [_sha(h, spec, state_fp) for h in hashes]
            jobs = [
                PartitionJob(n, str(ip), str(op), oh, str(self._root), self.seed, str(sdir))
                for n, ip, op, oh in zip(names, in_paths, out_paths, out_hashes)
                if read_hash(op) != oh
            ]
            log.info(
                "engine: stage %d %s: %d/%d partitions to compute", index, stage.name, len(jobs), len(names)
            )
            self._run_jobs(stage, jobs)
            reports.append(self._report(index, stage, sdir, in_paths, out_paths, [j.partition for j in jobs]))
            in_paths, hashes = out_paths, out_hashes
        self._write_outputs(in_paths, hashes)
        summary = {"partitions": len(names), "stages": [r.to_json() for r in reports]}
        atomic_write_text(self.out_dir / "report.json", json.dumps(summary, indent=1))
        atomic_write_text(self.out_dir / "report.md", render_markdown(reports))
        return PipelineResult(self.out_dir, names, reports)

    def _write_outputs(self, paths: list[Path], hashes: list[str]) -> None:
        """Stream the last level into ``result.parquet`` (all rows) and ``kept.parquet`` (kept rows)."""
        final_hash = _sha(*hashes)
        result, kept = self.out_dir / "result.parquet", self.out_dir / "kept.parquet"
        if read_hash(result) == final_hash and read_hash(kept) == final_hash:
            return
        schema = _unified_schema(paths)
        meta = {HASH_KEY: final_hash.encode()}
        kept_schema = schema.remove(schema.get_field_index(DROP_COLUMN)).with_metadata(meta)
        with (
            atomic_path(result) as tmp_r,
            atomic_path(kept) as tmp_k,
            pq.ParquetWriter(tmp_r, schema.with_metadata(meta)) as wr,
            pq.ParquetWriter(tmp_k, kept_schema) as wk,
        ):
            for p in paths:
                t = read_partition(p).replace_schema_metadata(None).select(schema.names).cast(schema)
                wr.write_table(t)
                mask = pc.is_null(t.column(DROP_COLUMN))
                wk.write_table(t.filter(mask).drop_columns([DROP_COLUMN]).cast(kept_schema))


def _iter_row_chunks(path: str | Path, rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one shorter) streamed from a Parquet file; at least one."""
    with pq.ParquetFile(path) as f:
        schema = f.schema_arrow
        pending: list[pa.RecordBatch] = []
        count = 0
        emitted = False
        for batch in f.iter_batches(batch_size=rows):
            pending.append(batch)
            count += batch.num_rows
            while count >= rows:
                table = pa.Table.from_batches(pending, schema)
                yield table.slice(0, rows)
                emitted = True
                rest = table.slice(rows)
                pending, count = rest.to_batches(), rest.num_rows
        if count or not emitted:
            yield pa.Table.from_batches(pending, schema)


def _unified_schema(paths: list[Path]) -> pa.Schema:
    schemas = [pq.read_schema(p).remove_metadata() for p in paths]
    return pa.unify_schemas(schemas, promote_options="permissive")


def render_markdown(reports: Sequence[StageReport]) -> str:
    """Kept / dropped counts per stage and reason as a markdown table."""
    lines = [
        "| # | stage | rows | kept in | kept out | dropped | reason | count |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        total = sum(r.dropped.values())
        lines.append(f"| {r.index} | {r.name} | {r.rows} | {r.kept_in} | {r.kept_out} | {total} | | |")
        for reason, count in sorted(r.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"| | | | | | | {reason} | {count} |")
    return "\n".join(lines) + "\n"


def run_pipeline(
    stages: Sequence[EngineStage], manifest: str | Path, out_dir: str | Path, **kwargs: Any
) -> PipelineResult:
    """Convenience wrapper: ``PipelineRunner(stages, out_dir, **kwargs).run(manifest)``."""
    return PipelineRunner(stages, out_dir, **kwargs).run(manifest)


__all__ = [
    "BACKENDS",
    "BaseEngineStage",
    "PartitionJob",
    "PipelineResult",
    "PipelineRunner",
    "StageReport",
    "check_stage_output",
    "read_hash",
    "render_markdown",
    "run_job",
    "run_pipeline",
    "stage_spec",
    "table_hash",
    "write_partition",
]
