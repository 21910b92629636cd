"""``rededit-data make-pairs``: DPO preference pairs by the Mix-Policy recipe (report §3.6.1).

    rededit-data make-pairs MANIFEST --negative-editor outputs/sft/export --out data/pairs
    rededit-data make-pairs MANIFEST --negative-editor outputs/sft/export --positive outputs/expert/export ...

    rededit-data make-pairs MANIFEST --negative-editor outputs/sft/export --judge judge.yaml --min-margin 1 ...

Positives: the ground-truth target (default) or an expert editor's edit that passes the judge; negatives:
candidates from the current model that the task's programmatic judge fails (or that score ``--margin``
below the positive). With ``--judge`` (real data, which has no programmatic judge) the VLM judge of a
``rededit-eval`` ``judge`` node scores the positive and every candidate of every row, and the lowest candidate
at least ``--min-margin`` below the positive is the negative (:mod:`rededit.datagen.pair_judge`). Writes
``OUT/manifest.parquet`` with a ``rejected`` column and the scores and judge id of each pair; re-running resumes.
Exit codes: 0 pairs written, 1 no pair qualified or more judge calls failed than the judge's
``max_failure_rate`` (after writing), 2 bad input (a bad judge config, a judge that does not answer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rededit.cli.args import int_at_least
from rededit.datagen.pair_judge import JudgeConfigError, build_pair_judge, load_judge_node
from rededit.datagen.preference import PairsFolderError, make_pairs
from rededit.inference.editor import EditorLoadError, load_editor
from rededit.scoring.judges.vlm import JudgeUnreachableError
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
        "--margin",
        type=float,
        default=None,
        help="programmatic judges: also accept candidates this far below the positive",
    )
    p.add_argument(
        "--judge",
        default=None,
        help="YAML file with rededit-eval's `judge` node: score every row with that VLM judge instead of the "
        "synthetic bench's programmatic judges",
    )
    p.add_argument(
        "--min-margin",
        type=float,
        default=None,
        help="with --judge: least score gap between the positive and the negative (default 1.0)",
    )
    p.add_argument(
        "--judge-cache", default=None, help="with --judge: answer cache folder (default OUT/judge_cache)"
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
    if args.judge is None and (args.min_margin is not None or args.judge_cache is not None):
        print("error: --min-margin and --judge-cache go with --judge", file=sys.stderr)
        return 2
    if args.judge is not None and args.margin is not None:
        print(
            "error: --margin is the programmatic judges' option; with --judge use --min-margin",
            file=sys.stderr,
        )
        return 2
    judge = None
    if args.judge is not None:
        # Before loading any editor: a judge that cannot answer stops the run before anything is generated.
        cache = Path(args.judge_cache) if args.judge_cache else Path(args.out) / "judge_cache"
        try:
            judge = build_pair_judge(load_judge_node(args.judge), cache, config_path=args.judge)
        except (JudgeConfigError, JudgeUnreachableError, FileNotFoundError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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
            judge=judge,
            min_margin=1.0 if args.min_margin is None else args.min_margin,
        )
    except (JudgeUnreachableError, PairsFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"make-pairs: kept {counts['kept']}, dropped {counts['dropped']} ({counts['resumed']} resumed) -> {args.out}"
    )
    if judge is not None:
        judged, failed = counts["judged"], counts["judge_failed"]
        rate = failed / judged if judged else 0.0
        print(
            f"judge {judge.judge_id}: {judged} edits judged, {failed} failed ({rate:.1%}); see {args.out}/decisions.jsonl"
        )
        if rate > judge.max_failure_rate:
            print(
                f"error: judge failure rate {rate:.3f} is above max_failure_rate={judge.max_failure_rate:g}: the pairs "
                "rest on too few answers (re-run to retry the failed calls; answers are cached)",
                file=sys.stderr,
            )
            return 1
    print(
        f"{args.out}/manifest.parquet names images by absolute path: train on it with data.allow_outside_root=true "
        "(rededit-data validate: --allow-outside-root)"
    )
    return 0
