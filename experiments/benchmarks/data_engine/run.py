"""Benchmark: data-engine stage throughput (images/s per CPU core) and the runner's overhead (report §2.2).

Writes a corpus of ``--rows`` JPEG photos (random crops of scikit-image photos, ``--size`` px, 1/8 of
them exact copies and 1/8 re-encoded near copies so dedup has work to do), then for each stage:

* ``loop``: the stage called in a plain Python loop over in-memory partitions (``fit`` on all, then
  ``process`` per partition) — the work itself;
* ``runner``: the same stage through :class:`~rededit.datagen.engine.runner.PipelineRunner` with one worker
  (Parquet partitions, content hashes, atomic writes, drop-reason checks, reports) — one process, one core;
* ``resume``: the runner again on the finished output folder (everything skipped by hash).

Each of loop / runner runs ``--repeats`` times, alternating, and the minimum is kept (shared, noisy machine).

Images/s per core = rows / wall seconds of the single-process run. Overhead = runner / loop (same run).

    nice -n 10 python experiments/benchmarks/data_engine/run.py                # 512 rows, 256 px
    python experiments/benchmarks/data_engine/run.py --rows 16 --size 64       # smoke run
    python experiments/benchmarks/data_engine/run.py --record                  # also write results.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rededit.data.schema import manifest_schema
from rededit.datagen.engine.filters import (
    EmbeddingDedup,
    ExactDedup,
    LayoutArtifactFilter,
    PerceptualDedup,
    PhotometricFilter,
    PixelEmbedder,
)
from rededit.datagen.engine.runner import PipelineRunner
from rededit.datagen.engine.stage import StageContext, ensure_drop_column
from rededit.utils.seeding import numpy_rng

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
HERE = Path(__file__).resolve().parent


def make_corpus(root: Path, rows: int, size: int, seed: int = 0) -> Path:
    """JPEG corpus + manifest; returns the manifest path."""
    import skimage.data

    rng = numpy_rng(seed, "data_engine_bench", rows, size)
    photos = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        photos.append(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
    (root / "images").mkdir(parents=True, exist_ok=True)
    records, blobs = [], []
    for i in range(rows):
        kind = rng.random()
        if kind < 0.125 and blobs:  # exact copy of an earlier image
            data = blobs[int(rng.integers(len(blobs)))]
        elif kind < 0.25 and blobs:  # re-encoded near copy
            src = Image.open(io.BytesIO(blobs[int(rng.integers(len(blobs)))]))
            buf = io.BytesIO()
            src.save(buf, format="JPEG", quality=60)
            data = buf.getvalue()
        else:
            a = photos[int(rng.integers(len(photos)))]
            h, w = a.shape[:2]
            side = int(min(h, w) * rng.uniform(0.4, 0.9))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            buf = io.BytesIO()
            Image.fromarray(a[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR).save(
                buf, format="JPEG", quality=90
            )
            data = buf.getvalue()
        blobs.append(data)
        rel = f"images/{i:06d}.jpg"
        (root / rel).write_bytes(data)
        records.append(
            {
                "id": f"b{i:06d}",
                "task": "t2i",
                "instruction": "",
                "target": rel,
                "target_width": size,
                "target_height": size,
                "references": [],
                "reference_widths": [],
                "reference_heights": [],
            }
        )
    path = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(records, schema=manifest_schema([])), path)
    return path


def stages() -> dict[str, callable]:
    return {
        "photometric": lambda: PhotometricFilter(),
        "exact_dedup": lambda: ExactDedup(),
        "phash_dedup": lambda: PerceptualDedup(),
        "embed_dedup": lambda: EmbeddingDedup(PixelEmbedder(16), threshold=0.97),
        "layout": lambda: LayoutArtifactFilter(),
    }


def plain_loop(
    make, manifest: Path, partition_rows: int, scratch: Path, limit: int | None = None
) -> tuple[float, int]:
    """Seconds for fit + process over in-memory partitions, and the number of rows dropped."""
    table = ensure_drop_column(pq.read_table(manifest))
    parts = [table.slice(i, partition_rows) for i in range(0, table.num_rows, partition_rows)][:limit]
    stage = make()
    ctx = StageContext(root=manifest.parent, seed=0, stage_dir=scratch, partition="")
    t0 = time.perf_counter()
    stage.setup()
    if callable(getattr(stage, "fit", None)):
        stage.fit(iter(parts), ctx)
    dropped = 0
    for k, p in enumerate(parts):
        ctx.partition = f"part-{k:05d}"
        out = stage.process(p, ctx)
        dropped += out.num_rows - out.column("drop_reason").null_count
    return time.perf_counter() - t0, dropped


def runner_run(make, manifest: Path, partition_rows: int, out: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    res = PipelineRunner([make()], out, partition_rows=partition_rows).run(manifest)
    return time.perf_counter() - t0, res.reports[0].rows - res.reports[0].kept_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--partition-rows", type=int, default=64)
    ap.add_argument(
        "--repeats", type=int, default=2, help="alternate loop/runner this often, keep the minimum"
    )
    ap.add_argument("--stages", nargs="*", default=None, help=f"subset of {list(stages())}")
    ap.add_argument("--record", action="store_true", help="write results.json next to this script")
    args = ap.parse_args(argv)
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    work = Path(tempfile.mkdtemp(prefix="rededit_engine_bench_"))
    try:
        t0 = time.perf_counter()
        manifest = make_corpus(work / "corpus", args.rows, args.size)
        print(
            f"corpus: {args.rows} JPEGs at {args.size}px in {time.perf_counter() - t0:.1f}s", file=sys.stderr
        )
        results = []
        chosen = {k: v for k, v in stages().items() if args.stages is None or k in args.stages}
        for name, make in chosen.items():
            plain_loop(make, manifest, args.partition_rows, work / "warmup", limit=1)  # imports, caches
            # alternate the two and keep each one's minimum: the shared machine's load comes and goes
            loop_s = run_s = float("inf")
            for rep in range(args.repeats):
                t, loop_drop = plain_loop(make, manifest, args.partition_rows, work / f"scratch_{name}")
                loop_s = min(loop_s, t)
                t, run_drop = runner_run(make, manifest, args.partition_rows, work / f"out_{name}_{rep}")
                run_s = min(run_s, t)
            t1 = time.perf_counter()
            PipelineRunner([make()], work / f"out_{name}_0", partition_rows=args.partition_rows).run(manifest)
            resume_s = time.perf_counter() - t1
            if loop_drop != run_drop:
                raise RuntimeError(f"{name}: loop dropped {loop_drop} rows, runner {run_drop}")
            results.append(
                {
                    "stage": name,
                    "rows": args.rows,
                    "dropped": run_drop,
                    "loop_s": round(loop_s, 3),
                    "runner_s": round(run_s, 3),
                    "resume_s": round(resume_s, 3),
                    "loop_img_per_s_core": round(args.rows / loop_s, 1),
                    "runner_img_per_s_core": round(args.rows / run_s, 1),
                    "overhead_ratio": round(run_s / loop_s, 3),
                }
            )
        header = (
            "| stage | rows | dropped | loop img/s/core | runner img/s/core | runner / loop | resume (s) |"
        )
        print(header + "\n|---|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['stage']} | {r['rows']} | {r['dropped']} | {r['loop_img_per_s_core']} | "
                f"{r['runner_img_per_s_core']} | {r['overhead_ratio']} | {r['resume_s']} |"
            )
        machine = {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "OMP_NUM_THREADS": torch_threads,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(machine))
        if args.record:
            payload = {"args": vars(args), "machine": machine, "results": results}
            (HERE / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
