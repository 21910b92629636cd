"""``rededit-data transform invert|split``: Task Inversion / Task Splitting over a manifest (report §2.3).

* ``invert`` appends ``<id>-inv`` rows (source and target swapped, instructions rewritten by rule; texts
  no rule can invert stay null with ``inversion_text = pending`` for the captioning engine, unless
  ``--no-pending``).
* ``split`` marks composite instructions (``edit_steps``, ``n_edit_steps``) and appends single-step rows
  for those that carry an ``intermediates`` column of step images.

The output manifest (``--out``, may equal ``--manifest``) is written atomically; the printed JSON says
what was added and why rows were skipped. Exit codes: 0 done, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rededit.datagen.engine.stage import StageContext
from rededit.datagen.engine.transforms import TaskSplitStage, invert_tasks, split_tasks
from rededit.utils.io import atomic_path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "transform", help="Task Inversion / Task Splitting (report §2.3)", description=__doc__
    )
    sub = p.add_subparsers(dest="transform_command", required=True)
    inv = sub.add_parser("invert", help="append source/target-swapped rows for invertible tasks")
    inv.add_argument("--prob", type=float, default=1.0, help="fraction of eligible rows to invert")
    inv.add_argument("--seed", type=int, default=0)
    inv.add_argument("--no-pending", action="store_true", help="skip rows whose instruction no rule inverts")
    sp = sub.add_parser("split", help="mark composite instructions; split rows that have intermediates")
    sp.add_argument("--column", default="instruction", help="instruction column to split")
    sp.add_argument(
        "--drop-parent", action="store_true", help="drop decomposed parent rows (split:decomposed)"
    )
    for s in (inv, sp):
        s.add_argument("--manifest", required=True)
        s.add_argument("--out", required=True, help="output manifest (may be the input)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    src = Path(args.manifest)
    try:
        if not src.is_file():
            raise FileNotFoundError(f"manifest not found: {src}")
        table = pq.read_table(src)
        if args.transform_command == "invert":
            out, report = invert_tasks(
                table, prob=args.prob, seed=args.seed, keep_pending=not args.no_pending
            )
        else:
            if "edit_steps" not in table.column_names:
                ctx = StageContext(root=src.parent, seed=0, stage_dir=src.parent, partition="all")
                table = TaskSplitStage(column=args.column).process(table, ctx)
            if "intermediates" not in table.column_names:
                out = table
                n_comp = sum(1 for n in table.column("n_edit_steps").to_pylist() if n and n > 1)
                report = {
                    "composite": n_comp,
                    "split": 0,
                    "added": 0,
                    "skipped": {"no intermediates column": n_comp},
                }
            else:
                out, report = split_tasks(table, src.parent, drop_parent=args.drop_parent)
    except (FileNotFoundError, ValueError) as e:
        print(f"rededit-data transform {args.transform_command}: {e}", file=sys.stderr)
        return 2
    dst = Path(args.out)
    if dst.resolve().parent != src.resolve().parent:
        print(
            f"note: image URIs stay relative to {src.parent}; keep {dst.name} beside it or move the images too"
        )
    with atomic_path(dst) as tmp:
        pq.write_table(out, tmp, compression="zstd")
    print(json.dumps({"rows_in": table.num_rows, "rows_out": out.num_rows, **report}, indent=1))
    return 0
