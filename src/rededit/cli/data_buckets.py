"""``rededit-data buckets``: bucket statistics and the per-rank schedule of one epoch (report §3.2).

    rededit-data buckets --manifest data/manifest.parquet --buckets ct --token-budget 20480 \\
        --world-size 8 [--seed 0] [--epoch 0] [--rank-schedule schedule.jsonl]

Each schedule line is ``{"step", "rank", "bucket", "ids": [sample ids], "rows": [manifest rows],
"shapes": {"target": [h, w], "references": [[h, w], ...]}}``; the shapes are the resolution every
sample of the line is served at (merged leftovers included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rededit.data.buckets import ResolutionSet, assign_buckets, load_bucket_config
from rededit.data.manifest import Manifest
from rededit.data.sampler import MultiConditionBucketSampler
from rededit.utils.io import atomic_path

_SIZE_COLUMNS = ["id", "task", "target_height", "target_width", "reference_heights", "reference_widths"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "buckets",
        help="bucket statistics and per-rank schedule of the Multi-Condition Aware Bucket Sampler",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--manifest", required=True, help="Parquet manifest")
    p.add_argument("--buckets", required=True, help="bucket set: a name in conf/data/buckets/ or a YAML path")
    p.add_argument("--token-budget", type=int, required=True, help="token capacity C per device and step")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--small-bucket-policy", choices=("merge", "drop"), default="merge")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--cluster-balance", action="store_true", help="uniform over the manifest's clusters")
    p.add_argument("--top", type=int, default=40, help="buckets listed in the table (largest first)")
    p.add_argument("--rank-schedule", default=None, help="write one JSON line per (step, rank) here")
    p.add_argument("--validate", action="store_true", help="validate the manifest before bucketing")
    p.set_defaults(func=run)
    return p


def _hw(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def run(args: argparse.Namespace) -> int:
    path = Path(args.manifest)
    if not path.exists():
        sys.stderr.write(f"manifest not found: {path}\n")
        return 2
    present = set(pq.read_schema(path).names)
    columns = [c for c in [*_SIZE_COLUMNS, "cluster"] if c in present]
    manifest = Manifest.open(path, validate=args.validate, columns=None if args.validate else columns)
    cfg = load_bucket_config(args.buckets)
    resset = ResolutionSet.from_config(cfg)
    assignment = assign_buckets(manifest.sizes(), resset, task_groups=cfg.get("task_groups"))
    try:
        sampler = MultiConditionBucketSampler(
            assignment,
            token_budget=args.token_budget,
            world_size=args.world_size,
            seed=args.seed,
            small_bucket_policy=args.small_bucket_policy,
            cluster_balance=args.cluster_balance,
            max_batch_size=args.max_batch_size,
        )
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sampler.set_epoch(args.epoch)
    st = sampler.stats(args.epoch, top=args.top)

    out = sys.stdout
    out.write(
        f"manifest {path} ({st['rows']} rows)  buckets {args.buckets} ({len(resset)} resolutions, "
        f"patch {resset.patch})  C={st['token_budget']}  world_size={st['world_size']}  epoch={st['epoch']}\n"
    )
    header = f"{'bucket key':<48} {'samples':>8} {'batch':>6} {'steps':>6} {'tok/step/rank':>13} {'crop':>6}"
    out.write(header + "\n" + "-" * len(header) + "\n")
    for row in st["per_bucket"]:
        out.write(
            f"{row['key']:<48} {row['samples']:>8} {row['batch_size']:>6} {row['steps']:>6} "
            f"{row['tokens_per_rank_step']:>13} {row['crop_loss']:>6.3f}\n"
        )
    shown = len(st["per_bucket"])
    if st["buckets_served"] > shown:
        out.write(f"... {st['buckets_served'] - shown} more served buckets\n")
    tok = st["tokens_per_rank_step"]
    out.write(
        f"totals: steps/epoch {st['steps']}  scheduled {st['scheduled']}  merged {st['merged']}  "
        f"dropped {st['dropped']}  buckets {st['buckets']} (served {st['buckets_served']})\n"
        f"tokens per rank-step: mean {tok['mean']:.1f} (min {tok['min']:.0f}, max {tok['max']:.0f}) "
        f"vs budget {st['token_budget']} = {st['budget_utilisation']:.1%}  padding waste "
        f"{st['padding_waste']:.1%}  rank imbalance {st['rank_imbalance']:.3f}  "
        f"crop loss {st['crop_loss_mean']:.3f}\n"
    )

    if args.rank_schedule:
        sched = sampler.schedule(args.epoch)
        shapes = {}
        ids = manifest.ids if manifest.has("id") else None
        with atomic_path(args.rank_schedule) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for step in range(len(sched)):
                b = int(sched.step_bucket[step])
                if b not in shapes:
                    sh = assignment.bucket_shapes(b)
                    shapes[b] = {
                        "target": list(sh["target"]),
                        "references": [list(r) for r in sh["references"]],
                    }
                batch = sched.global_batch(step)
                for rank in range(sched.world_size):
                    rows = np.asarray(batch[rank])
                    line = {
                        "step": step,
                        "rank": rank,
                        "bucket": b,
                        "ids": [str(v) for v in ids[rows]] if ids is not None else rows.tolist(),
                        "rows": rows.tolist(),
                        "shapes": shapes[b],
                    }
                    fh.write(json.dumps(line) + "\n")
        out.write(f"wrote {len(sched) * sched.world_size} (step, rank) lines to {args.rank_schedule}\n")
    return 0
