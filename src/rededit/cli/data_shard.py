"""``rededit-data shard``: pack a manifest's images into tar shards with an index (random access).

    rededit-data shard --manifest data/manifest.parquet --out data/sharded --shard-size 1GB --buckets ct

Writes ``DIR/shard-NNNNN.tar`` (standard tar, ``tar tf`` lists it) + ``shard-NNNNN.tar.idx.json``
(member → data offset, size, CRC-32), ``DIR/manifest.parquet`` (same rows and order, image URIs
rewritten to ``shard-NNNNN.tar#<key>``) and ``DIR/shards.json`` (sha256 per shard). With ``--buckets``
the payloads are written bucket-major. A rerun skips finished shards. Train on the result with
``data.manifest=DIR/manifest.parquet``; nothing is extracted.

Exit codes: 0 done, 2 bad input (missing manifest or image, bad size).
"""

from __future__ import annotations

import argparse
import sys

from rededit.cli.args import int_at_least
from rededit.datagen.shard_writer import parse_size, write_shards


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "shard",
        help="pack a manifest's images into indexed tar shards (bucket-major) and rewrite its URIs",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--manifest", required=True, help="input Parquet manifest")
    p.add_argument("--out", required=True, help="output folder (shards, index files, rewritten manifest)")
    p.add_argument(
        "--shard-size", type=parse_size, default=parse_size("1GB"), help="payload bytes per shard (1GB)"
    )
    p.add_argument("--max-samples", type=int_at_least(1), default=None, help="also cap rows per shard")
    p.add_argument(
        "--buckets",
        default=None,
        help="bucket set (conf/data/buckets/ name or YAML) for bucket-major order; default: manifest order",
    )
    p.add_argument("--verify", action="store_true", help="re-hash finished shards before skipping them")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        summary = write_shards(
            args.manifest,
            args.out,
            shard_size=args.shard_size,
            max_samples=args.max_samples,
            buckets=args.buckets,
            verify_existing=args.verify,
        )
    except (FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    total = sum(s["bytes"] for s in summary.shards)
    sys.stdout.write(
        f"{len(summary.shards)} shards ({summary.written} written, {summary.skipped} already done), "
        f"{total / 2**20:.1f} MiB -> {summary.out_dir}; manifest {summary.manifest}\n"
    )
    return 0
