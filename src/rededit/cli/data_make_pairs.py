"""``rededit-data make-pairs``: DPO preference pairs by the Mix-Policy recipe (report §3.6.1).

    rededit-data make-pairs MANIFEST --negative-editor outputs/sft/export --out data/pairs
    rededit-data make-pairs MANIFEST --negative-editor outputs/sft/export --positive outputs/expert/export ...

Positives: the ground-truth target (default) or an expert editor's edit that passes the judge; negatives:
candidates from the current model that the task's programmatic judge fails (or that score ``--margin``
below the positive). Writes ``OUT/manifest.parquet`` with a ``rejected`` column; re-running resumes.
Exit codes: 0 pairs written, 1 no pair qualified, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from rededit.cli.args import int_at_least
from rededit.datagen.preference import make_pairs
from rededit.inference.editor import EditorLoadError, load_editor
from rededit.scoring.ocr import build_ocr_backend


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-pairs",
        help="build DPO preference pairs (Mix-Policy: strong positives, judged negatives of the current model)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("manifest", help="source manifest.parquet")
    p.add_argument("--out", required=True, help="output folder (manifest.parquet, images/, decisions.jsonl)")
    p.add_argument("--negative-editor", required=True, help="export/run folder of the current model")
    p.add_argument(
        "--positive",
        default="ground_truth",
        help="'ground_truth' or an expert/EMA editor's export/run folder",
    )
    p.add_argument("--candidates", type=int_at_least(1), default=4, help="negatives sampled per row")
    p.add_argument(
        "--margin", type=float, default=None, help="also accept candidates this far below the positive"
    )
    p.add_argument("--split", default="train", help="manifest split to pair ('all' for every row)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="sampler steps (editor default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int_at_least(1), default=None, help="process at most N rows")
    p.add_argument(
        "--ocr", default=None, help="OCR backend for text rows (rededit.scoring.ocr name); default none"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        negative = load_editor(args.negative_editor, args.device)
        positive = (
            "ground_truth" if args.positive == "ground_truth" else load_editor(args.positive, args.device)
        )
    except EditorLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ocr = None
    if args.ocr:
        ocr = build_ocr_backend(args.ocr)
    try:
        counts = make_pairs(
            args.manifest,
            args.out,
            negative_editor=negative,
            positive=positive,
            num_candidates=args.candidates,
            margin=args.margin,
            split=None if args.split == "all" else args.split,
            steps=args.steps,
            seed=args.seed,
            limit=args.limit,
            ocr=ocr,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"make-pairs: kept {counts['kept']}, dropped {counts['dropped']} ({counts['resumed']} resumed) -> {args.out}"
    )
    print(
        f"{args.out}/manifest.parquet names images by absolute path: train on it with data.allow_outside_root=true "
        "(rededit-data validate: --allow-outside-root)"
    )
    return 0
