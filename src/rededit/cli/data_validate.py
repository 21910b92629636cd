"""``rededit-data validate MANIFEST``: list every problem in a manifest (row id, column, what is wrong).

Exit codes: 0 valid, 1 problems found, 2 the manifest cannot be read at all.
"""

from __future__ import annotations

import argparse
import sys

import pyarrow as pa

from rededit.cli.args import int_at_least
from rededit.data.manifest import Manifest
from rededit.data.validate import validate_manifest_report

_non_negative = int_at_least(0)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate",
        help="check a manifest's columns, rows and image files",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("manifest", help="path to manifest.parquet")
    p.add_argument("--no-files", action="store_true", help="skip opening and decoding the image files")
    p.add_argument(
        "--sample", type=_non_negative, default=None, metavar="K", help="check the files of K rows only"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --sample row choice")
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept image URIs that are absolute or leave the manifest's folder (make-pairs / mine-hard output)",
    )
    p.add_argument(
        "--max-report", type=_non_negative, default=None, metavar="N", help="print at most N problem lines"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        manifest = Manifest.open(args.manifest, validate=False)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (pa.ArrowException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: cannot read manifest {args.manifest} as Parquet: {reason}", file=sys.stderr)
        return 2
    if len(manifest) == 0:
        # Nothing to train on is a failed validation, not "OK: 0 rows" (issue 17 §4).
        print(f"FAILED: {args.manifest} has no rows")
        return 1
    report = validate_manifest_report(
        manifest, check_files=not args.no_files, sample=args.sample, seed=args.seed
    )
    shown = report.problems if args.max_report is None else report.problems[: args.max_report]
    for problem in shown:
        print(problem)
    if len(report.problems) > len(shown):
        print(f"... and {len(report.problems) - len(shown)} more (raise --max-report to see them)")
    if report.problems:
        n = len(report.problems)
        print(
            f"FAILED: {n} problem{'s' if n != 1 else ''} in {report.num_rows} rows "
            f"({report.images_checked} images checked)"
        )
        return 1
    print(f"OK: {report.num_rows} rows, {report.images_checked} images checked")
    return 0
