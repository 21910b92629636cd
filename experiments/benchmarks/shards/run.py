"""Benchmark: random-access payload reads from indexed tar shards vs one file per image (issue 7).

Synthesises a corpus (``rededit-data synth``), packs it with ``rededit-data shard`` (bucket-major),
then reads the same random sequence of image URIs through :func:`rededit.data.uri.resolve_uri` from
both copies, in the same process, alternating passes so load drifts hit both alike:

* ``bytes`` - the raw payload (what the index buys: no open/stat/close per image, one pread);
* ``decode`` - bytes + full PNG decode (:func:`rededit.data.images.load_image`, what the dataset does).

Each pass first evicts the files it will read from the page cache (``posix_fadvise(DONTNEED)``, no
root needed, other processes' files untouched) unless ``--warm``; a fresh process reads via a cold
cache on a real cluster, and on this machine's local disk eviction is the closest stand-in.

    python experiments/benchmarks/shards/run.py                     # 3000 samples, 5000 reads
    python experiments/benchmarks/shards/run.py --n 40 --reads 200  # smoke (tests/test_shards.py)
    python experiments/benchmarks/shards/run.py --record            # write results.json beside this file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rededit.data import shards
from rededit.data.images import load_image
from rededit.data.manifest import Manifest
from rededit.data.uri import resolve_path, resolve_uri, split_shard_uri
from rededit.datagen import shard_writer
from rededit.utils.seeding import numpy_rng

HERE = Path(__file__).resolve().parent


def _uris(manifest: Manifest) -> list[str]:
    out = []
    for col in shards.URI_COLUMNS:
        if manifest.has(col):
            for v in manifest.table.column(col).to_pylist():
                out.extend(u for u in (v if isinstance(v, list) else [v]) if u)
    return out


def _evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _pass(uris: list[str], root: Path, decode: bool) -> tuple[float, int]:
    shards.clear_cache()  # a fresh worker: shard handles and indexes are opened inside the timing
    nbytes = 0
    t0 = time.perf_counter()
    for u in uris:
        if decode:
            img = load_image(u, root)
            nbytes += img.width * img.height
        else:
            nbytes += len(resolve_uri(u, root))
    return time.perf_counter() - t0, nbytes


def run(
    n: int, reads: int, repeats: int, seed: int, warm: bool, work: Path, shard_size: str
) -> dict[str, Any]:
    from rededit.datagen.synth.writer import synthesize

    t0 = time.perf_counter()
    manifest_path = synthesize(work / "files", n=n, seed=seed, bench_n=0, min_side=256, max_side=512)
    t_synth = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = shard_writer.write_shards(manifest_path, work / "sharded", shard_size=shard_size, buckets="ct")
    t_shard = time.perf_counter() - t0
    plain, packed = (
        Manifest.open(manifest_path, validate=False),
        Manifest.open(summary.manifest, validate=False),
    )
    a, b = _uris(plain), _uris(packed)
    order = numpy_rng(seed, 0, 0, 0).integers(0, len(a), size=reads)
    seq = {"files": ([a[i] for i in order], plain.root), "shards": ([b[i] for i in order], packed.root)}
    paths = {
        "files": sorted({resolve_path(u, plain.root) for u in a}),
        "shards": sorted({resolve_path(split_shard_uri(u)[0], packed.root) for u in b}),
    }
    total_bytes = {k: sum(p.stat().st_size for p in v) for k, v in paths.items()}
    results: dict[str, Any] = {}
    for mode in ("bytes", "decode"):
        times: dict[str, list[float]] = {"files": [], "shards": []}
        for _ in range(repeats):
            for kind in ("files", "shards"):  # alternate: load drift on a shared box hits both
                if not warm:
                    _evict(paths[kind])
                dt, _ = _pass(*seq[kind], decode=mode == "decode")
                times[kind].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[mode] = {
            "files_reads_per_s": reads / med["files"],
            "shards_reads_per_s": reads / med["shards"],
            "speedup_shards_over_files": med["files"] / med["shards"],
            "times_s": times,
        }
    return {
        "samples": len(plain),
        "images": len(a),
        "reads": reads,
        "repeats": repeats,
        "cache": "warm" if warm else "evicted (posix_fadvise DONTNEED) before every pass",
        "files": len(paths["files"]),
        "shards": len(paths["shards"]),
        "shard_size": shard_size,
        "payload_mib": {k: v / 2**20 for k, v in total_bytes.items()},
        "synth_s": t_synth,
        "shard_write_s": t_shard,
        "results": results,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="synthetic samples")
    p.add_argument("--reads", type=int, default=5000, help="random reads per pass")
    p.add_argument("--repeats", type=int, default=3, help="passes per kind (median reported)")
    p.add_argument("--shard-size", default="64MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm", action="store_true", help="do not evict the page cache before a pass")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--record", action="store_true", help="write results.json beside this script")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rededit-shard-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        out = run(args.n, args.reads, args.repeats, args.seed, args.warm, work, args.shard_size)
    sys.stdout.write(
        f"{out['samples']} samples, {out['images']} images: {out['files']} files "
        f"({out['payload_mib']['files']:.1f} MiB) vs {out['shards']} shards "
        f"({out['payload_mib']['shards']:.1f} MiB); {out['reads']} random reads, cache {out['cache']}\n"
    )
    sys.stdout.write(f"{'mode':<8} {'files reads/s':>14} {'shards reads/s':>15} {'shards/files':>13}\n")
    for mode, r in out["results"].items():
        sys.stdout.write(
            f"{mode:<8} {r['files_reads_per_s']:>14.0f} {r['shards_reads_per_s']:>15.0f} "
            f"{r['speedup_shards_over_files']:>12.2f}x\n"
        )
    if args.record:
        (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
