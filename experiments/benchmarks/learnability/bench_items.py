"""Shared by the probe scripts here: the command line and the bench items they read.

``parser(doc, per_task)`` gives ``--checkpoint --manifest --per-task --threads``; :func:`load` sets the torch
threads, loads the editor (EMA weights) and returns the bench items with one reference and an edit mask, prepared
exactly as the demo report prepares them.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from rededit.data.manifest import Manifest
from rededit.eval.demo_report import load_samples, select_rows
from rededit.inference.editor import load_editor
from rededit.inference.sizing import editor_buckets, sizes_fn


def parser(doc: str, per_task: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="export or run folder")
    p.add_argument("--manifest", required=True, help="corpus manifest with a bench split")
    p.add_argument("--per-task", type=int, default=per_task)
    p.add_argument("--threads", type=int, default=2)
    return p


def load(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    """``(editor, samples)``: the demo report's sample dicts with exactly one reference and an edit mask."""
    torch.set_num_threads(args.threads)
    editor = load_editor(args.checkpoint)
    manifest = Manifest.open(args.manifest)
    rows = select_rows(manifest, "bench", args.per_task)
    samples = load_samples(manifest, rows, sizes_fn(editor, editor_buckets(editor)))
    return editor, [s for s in samples if len(s["references"]) == 1 and s["mask"] is not None]
