"""``rededit-data synth``: write the synthetic edit corpus (report §2.3) to a folder."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rededit.datagen.synth import synthesize


def _weights(text: str) -> dict[str, float]:
    """``"add=2,remove=1"`` or a JSON object → task weights."""
    text = text.strip()
    if text.startswith("{"):
        return {str(k): float(v) for k, v in json.loads(text).items()}
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"task weight {part!r} is not NAME=WEIGHT")
        out[name.strip()] = float(value)
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic edit corpus (PNGs + manifest.parquet)",
        description=__doc__,
    )
    p.add_argument("--out", required=True, help="output folder (manifest.parquet and images/ go here)")
    p.add_argument("--n", type=int, required=True, help="forward train samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench-n", type=int, default=None, help="held-out bench samples (default n // 10)")
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument(
        "--max-objects",
        type=int,
        default=4,
        help="scene complexity: most shapes per scene (default 4, the full mix)",
    )
    p.add_argument(
        "--backgrounds",
        default=None,
        help="world: background kinds to draw from, comma list of solid,gradient,radial,stripes,checker,noise (default all)",
    )
    p.add_argument(
        "--object-size",
        default=None,
        help="world: LOW,HIGH shape side as a fraction of the short side (default 0.2,0.34)",
    )
    p.add_argument(
        "--sign-prob",
        type=float,
        default=1.0,
        help="world: multiplier of the chance of a sign outside the text task",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a corpus already in --out (refused without this flag)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--inverse-prob", type=float, default=0.3, help="Task Inversion rate for reversible edits")
    p.add_argument("--zh-prob", type=float, default=0.3, help="fraction of rows with Chinese texts")
    p.add_argument(
        "--task-weights",
        type=_weights,
        default=None,
        help='task weights, "add=2,remove=1" or JSON; unnamed tasks are dropped (default: built-in mix)',
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    try:
        path = synthesize(
            args.out,
            args.n,
            args.seed,
            bench_n=args.bench_n,
            task_weights=args.task_weights,
            min_side=args.min_side,
            max_side=args.max_side,
            workers=args.workers,
            inverse_prob=args.inverse_prob,
            zh_prob=args.zh_prob,
            max_objects=args.max_objects,
            backgrounds=args.backgrounds.split(",") if args.backgrounds else None,
            object_size=tuple(float(v) for v in args.object_size.split(",")) if args.object_size else None,
            sign_prob=args.sign_prob,
            overwrite=args.overwrite,
        )
    except FileExistsError as err:
        sys.stderr.write(f"rededit-data synth: {err}\n")
        return 2
    table = pq.read_table(path, columns=["task", "split"])
    counts: dict[str, int] = {}
    for task, split in zip(table.column("task").to_pylist(), table.column("split").to_pylist()):
        counts[f"{split}/{task}"] = counts.get(f"{split}/{task}", 0) + 1
    print(f"wrote {table.num_rows} rows to {path} in {time.perf_counter() - t0:.1f} s")
    for key in sorted(counts):
        print(f"  {key:24s} {counts[key]}")
    return 0
