"""Preference pairs for DPO by the Mix-Policy recipe (report §3.6.1) — ``rededit-data make-pairs``.

For each manifest row (a condition: references + instruction):

* **positive** ``x_w``: from a stronger source than the model being tuned — the row's ground-truth target
  (``positive="ground_truth"``) or an expert / EMA editor's edit (``positive=<export folder>``, loaded with
  :func:`rededit.inference.editor.load_editor`); an expert edit is kept only if the judge passes it.
* **negatives** ``x_l``: ``num_candidates`` edits sampled from the *current* model (an exported editor),
  each judged by the harness's programmatic judge of the row's task
  (:func:`rededit.scoring.judges.programmatic.judge`); a candidate qualifies if the judge says it fails, or
  (``margin``) its soft score is below the positive's by at least ``margin``. The qualifying candidate
  with the lowest score becomes the ``rejected`` image ("VLM-filtered negatives from the base model",
  with the programmatic judge standing in for the VLM on the synthetic task).

Rows whose task has no judge, whose judge is undecided, or with no qualifying negative are dropped (the
reason is recorded).

**VLM judge** (``judge=``, ``rededit-data make-pairs --judge <judge config>``; real data has no programmatic
judge): every row is judged, whatever its task, by the VLM judge of ``rededit-eval``'s ``judge`` node
(:class:`~rededit.datagen.pair_judge.VLMPairJudge`: cached answers, failed calls counted, never scored 0). The
positive and each candidate get a score; the lowest-scoring candidate at least ``min_margin`` below the positive
becomes ``rejected``. Rows whose positive cannot be judged, or with no candidate that far below, are dropped with
the reason; a candidate whose call failed is left out (its failure counted in ``judge_failed``). A re-run judges
the rows with a failed call again (the cached answers are reused, the failed calls retried).

Output under ``out``: ``images/<id>_rejected.png`` (and ``<id>_chosen.png`` for expert positives) at the
target's native size, ``decisions.jsonl`` (one line per processed row: the resume
log) and ``manifest.parquet`` (kept rows, URIs made absolute so the manifest can live anywhere, a
``rejected`` column, ``pair_pos_score`` / ``pair_neg_score`` and the judge that gave them: ``pair_judge`` =
the VLM's judge id or :data:`PROGRAMMATIC_JUDGE`, ``pair_judge_prompts`` = the prompt set's hash), written
atomically at the end. An output folder judged by one judge is not resumed with another.
Candidate ``k``'s noise derives from (seed, row id, k) through the shared edit loop
(:mod:`rededit.inference.edit_loop`), so a resumed run makes the same pairs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rededit.data.datamodule import select_split
from rededit.data.dataset import object_boxes_at
from rededit.data.images import load_image
from rededit.data.manifest import Manifest
from rededit.data.schema import manifest_schema
from rededit.data.uri import resolve_path, split_shard_uri
from rededit.inference.edit_loop import EditRequest, run_edits
from rededit.inference.images import image_tensor, save_image, tensor_to_pil
from rededit.inference.sizing import editor_buckets, sizes_fn
from rededit.scoring.judges.programmatic import JUDGES, bench_sample, judge
from rededit.utils.io import atomic_path
from rededit.utils.logging import get_logger
from rededit.utils.progress import track

log = get_logger(__name__)

URI_COLUMNS = ("target", "edit_mask", "rejected")
#: ``pair_judge`` of pairs judged by the synthetic bench's programmatic judges.
PROGRAMMATIC_JUDGE = "rededit.scoring.judges.programmatic"


class PairsFolderError(ValueError):
    """The output folder holds decisions of another judge (resuming would mix two judges' pairs)."""


# ----------------------------------------------------------------------------------------- helpers
def absolute_uri(uri: str | None, root: str | Path) -> str | None:
    """A file or shard URI relative to ``root`` made absolute (None stays None)."""
    if not uri:
        return uri
    shard = split_shard_uri(uri)
    if shard is not None:
        return f"{resolve_path(shard[0], root).resolve()}#{shard[1]}"
    return str(resolve_path(uri, root).resolve())


def rebased_row(row: Mapping[str, Any], root: str | Path) -> dict[str, Any]:
    """``row`` with every image URI absolute."""
    out = dict(row)
    for col in URI_COLUMNS:
        if out.get(col):
            out[col] = absolute_uri(out[col], root)
    out["references"] = [absolute_uri(u, root) for u in (row.get("references") or [])]
    return out


def row_text(row: Mapping[str, Any]) -> str:
    for col in ("instruction", "instruction_concise", "caption"):
        if row.get(col):
            return str(row[col])
    raise ValueError(f"row {row.get('id')!r} has no instruction or caption to edit with")


@torch.no_grad()
def sample_edits(
    editor: Any, row: Mapping[str, Any], root: str | Path, n: int, *, seed: int, steps: int | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``n`` edits of one row, ``[n, 3, h, w]`` in [-1, 1], and their ``(h, w)``: the row's images at the
    editor's sizes (its training buckets, as ``rededit-eval`` and the demo report size them), its object
    boxes passed, edit ``k``'s noise from (seed, row id, k) — edit 0 is the one every other caller makes."""
    sizes = sizes_fn(editor, editor_buckets(editor))
    images = [load_image(uri, root) for uri in row.get("references") or []]
    src_hw = (int(row["target_height"]), int(row["target_width"]))
    (h, w), *ref_hws = sizes([src_hw] + [(im.height, im.width) for im in images])
    refs = [image_tensor(im, rh, rw)[0] for im, (rh, rw) in zip(images, ref_hws)]
    boxes = object_boxes_at(row, (h, w))
    requests = [
        EditRequest(
            id=row["id"], text=row_text(row), references=refs, hw=(h, w), object_boxes=boxes, sample=k
        )
        for k in range(n)
    ]
    out = run_edits(editor, requests, seed=seed, batch_size=n, steps=steps)
    return torch.stack(out).float(), (h, w)


def _save(x: torch.Tensor, path: Path, size_wh: tuple[int, int]) -> None:
    from PIL import Image

    img = tensor_to_pil(x)
    if img.size != tuple(size_wh):
        img = img.resize(tuple(size_wh), Image.Resampling.BICUBIC)
    save_image(img, path)


def read_decisions(path: Path) -> dict[str, dict[str, Any]]:
    """``{row id: decision}`` from a JSON-lines log; a torn last line (crash mid-write) is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["id"]] = rec
    return done


def append_decision(path: Path, rec: Mapping[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()


def write_manifest(
    rows: Sequence[Mapping[str, Any]], schema: pa.Schema, extra: Mapping[str, pa.DataType], out: Path
) -> Path:
    """Rows → Parquet at ``out`` (atomic), with ``schema``'s columns plus ``extra`` ones."""
    fields = list(schema) + [pa.field(k, t) for k, t in extra.items() if k not in schema.names]
    full = pa.schema(fields)
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in full} for r in rows], schema=full)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return out


# ------------------------------------------------------------------------------------------- pairs
def make_pairs(
    manifest: str | Path,
    out: str | Path,
    *,
    negative_editor: Any,
    positive: str | Any = "ground_truth",
    num_candidates: int = 4,
    margin: float | None = None,
    split: str | None = "train",
    steps: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    ocr: Any = None,
    passthrough_splits: tuple[str, ...] = ("bench",),
    judge: Any = None,
    min_margin: float = 1.0,
) -> dict[str, int]:
    """Build pairs (see the module docstring). Returns counts ``{"kept", "dropped", "resumed", "judged",
    "judge_failed"}`` (the last two: VLM-judged edits of every processed row, resumed ones included).

    Rows of ``passthrough_splits`` (the validation split) are copied unpaired, so the new manifest still
    serves ``data.val_split`` (DPO validation samples their negatives from the reference).

    Args:
        manifest: source manifest.
        out: output folder (created; re-running resumes from ``decisions.jsonl``).
        negative_editor: the current model (a loaded editor with ``generate``).
        positive: ``"ground_truth"`` or a loaded expert editor.
        num_candidates: negatives sampled per row.
        margin: also accept a candidate that passes but scores ``margin`` below the positive (None: only
            failing candidates qualify).
        split: manifest split to pair (None: all rows).
        steps: sampler steps (None: each editor's default).
        seed: base of the candidate noise.
        limit: process at most this many rows (in manifest order).
        ocr: OCR backend for the text judge (None: its closeness fallback).
        judge: a :class:`~rededit.datagen.pair_judge.VLMPairJudge` (None: the programmatic judges).
        min_margin: with ``judge``: the least score gap between the positive and the rejected candidate.
    """
    if judge is not None and margin is not None:
        raise ValueError(
            "make-pairs: margin is the programmatic judges' option; with a VLM judge use min_margin"
        )
    if judge is not None and not math.isfinite(min_margin):
        raise ValueError(f"make-pairs: min_margin must be a finite number, got {min_margin}")
    identity = (
        {"judge": PROGRAMMATIC_JUDGE, "judge_prompts": None}
        if judge is None
        else {"judge": judge.judge_id, "judge_prompts": judge.prompts_hash}
    )
    full = Manifest.open(manifest, validate=True)
    src = select_split(full, split)
    root = src.root
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    log_path = out / "decisions.jsonl"
    done = read_decisions(log_path)
    for rec in done.values():
        seen = {"judge": rec.get("judge", PROGRAMMATIC_JUDGE), "judge_prompts": rec.get("judge_prompts")}
        if seen != identity:
            raise PairsFolderError(
                f"make-pairs: {log_path} holds decisions of judge {seen['judge']!r} (prompts "
                f"{seen['judge_prompts']}), not of {identity['judge']!r} (prompts {identity['judge_prompts']}): "
                "pair into a fresh --out folder"
            )
    counts = {"kept": 0, "dropped": 0, "resumed": 0, "judged": 0, "judge_failed": 0}
    n = len(src) if limit is None else min(len(src), int(limit))
    for i in track(range(n), desc="make-pairs", unit="rows"):
        row = src.row(i)
        prev = done.get(row["id"])
        # A row with a failed judge call is judged again (answers that came are cached, failed calls are not):
        # a re-run retries exactly the failures, and the pair is chosen among every candidate's score.
        if prev is not None and not prev.get("judge_failed"):
            counts["resumed"] += 1
            continue
        rec: dict[str, Any] = {"id": row["id"], "kept": False, **identity}
        if judge is not None:
            rec.update(
                _pair_row_vlm(
                    row, root, out, negative_editor, positive, num_candidates, min_margin, steps, seed, judge
                )
            )
        elif row["task"] not in JUDGES:
            rec["reason"] = f"no judge for task {row['task']!r}"
        else:
            rec.update(
                _pair_row(row, root, out, negative_editor, positive, num_candidates, margin, steps, seed, ocr)
            )
        append_decision(log_path, rec)
        done[row["id"]] = rec
    kept_rows = []
    for i in range(len(src)):
        row = src.row(i)
        rec = done.get(row["id"])
        if rec is None or not rec.get("kept"):
            continue
        new = rebased_row(row, root)
        if rec.get("chosen"):
            new["target"] = str((out / rec["chosen"]).resolve())
        new["rejected"] = str((out / rec["rejected"]).resolve())
        new["pair_pos_score"], new["pair_neg_score"] = rec["pos_score"], rec["neg_score"]
        new["pair_judge"], new["pair_judge_prompts"] = (
            rec.get("judge", PROGRAMMATIC_JUDGE),
            rec.get("judge_prompts"),
        )
        kept_rows.append(new)
    counts["kept"] = len(kept_rows)
    counts["dropped"] = sum(1 for r in done.values() if not r.get("kept"))
    counts["judged"] = sum(int(r.get("judged", 0)) for r in done.values())
    counts["judge_failed"] = sum(int(r.get("judge_failed", 0)) for r in done.values())
    if full.has("split") and passthrough_splits:
        for i in range(len(full)):
            row = full.row(i)
            if row.get("split") in passthrough_splits and row.get("split") != split:
                kept_rows.append(rebased_row(row, full.root))
    if not counts["kept"]:
        raise ValueError(f"make-pairs: no pair qualified in {manifest} (see {log_path} for the reasons)")

    write_manifest(
        kept_rows,
        manifest_schema([c for c in src.columns if c not in ("rejected",)] + ["rejected"]),
        {
            "pair_pos_score": pa.float32(),
            "pair_neg_score": pa.float32(),
            "pair_judge": pa.string(),
            "pair_judge_prompts": pa.string(),
        },
        out / "manifest.parquet",
    )
    log.info("make-pairs: %s -> %s", counts, out / "manifest.parquet")
    return counts


def _positive_edit(row, root, out: Path, positive, steps, seed, hw) -> tuple[torch.Tensor, str | None]:
    """An expert editor's edit of the row ``[3, h, w]`` saved as ``images/<id>_chosen.png`` (its relative path)."""
    pos_img, _ = sample_edits(positive, row, root, 1, seed=seed + 1, steps=steps)
    pos_img = torch.nn.functional.interpolate(pos_img, size=hw, mode="bilinear", align_corners=False)
    rel = f"images/{row['id']}_chosen.png"
    _save(pos_img[0], out / rel, (int(row["target_width"]), int(row["target_height"])))
    return pos_img[0], rel


def _pair_row_vlm(
    row, root, out: Path, negative_editor, positive, num_candidates, min_margin, steps, seed, judge
) -> dict:
    """One row judged by the VLM: positive and candidates scored, the lowest candidate ``min_margin`` below."""
    cands, (h, w) = sample_edits(negative_editor, row, root, num_candidates, seed=seed, steps=steps)
    sample = bench_sample(row, root, size=(h, w))
    text = row_text(row)
    rec: dict[str, Any] = {}
    if isinstance(positive, str):
        if positive != "ground_truth":
            raise ValueError(f"positive must be 'ground_truth' or an editor, got {positive!r}")
        pos_img = sample["target"]
    else:
        pos_img, rec["chosen"] = _positive_edit(row, root, out, positive, steps, seed, (h, w))
    pos = judge.score(pos_img, sample, text, f"{row['id']}/positive")
    scores = [judge.score(cands[k], sample, text, f"{row['id']}/candidate{k}") for k in range(cands.shape[0])]
    rec.update(
        {
            "pos_score": pos.score,
            "cand_scores": [c.score for c in scores],
            "judged": 1 + len(scores),
            "judge_failed": int(pos.score is None) + sum(c.score is None for c in scores),
        }
    )
    if pos.score is None:
        return {**rec, "reason": f"the judge failed on the positive: {pos.error}"}
    below = [
        (c.score, k)
        for k, c in enumerate(scores)
        if c.score is not None and pos.score - c.score >= min_margin
    ]
    if not below:
        return {
            **rec,
            "reason": f"no candidate scored at least {min_margin:g} below the positive ({pos.score:g})",
        }
    neg_score, best = min(below)
    rel = f"images/{row['id']}_rejected.png"
    _save(cands[best], out / rel, (int(row["target_width"]), int(row["target_height"])))
    return {
        **rec,
        "kept": True,
        "rejected": rel,
        "neg_score": float(neg_score),
        "pos_score": float(pos.score),
    }


def _pair_row(
    row, root, out: Path, negative_editor, positive, num_candidates, margin, steps, seed, ocr
) -> dict:
    cands, (h, w) = sample_edits(negative_editor, row, root, num_candidates, seed=seed, steps=steps)
    sample = bench_sample(row, root, size=(h, w))
    size_wh = (int(row["target_width"]), int(row["target_height"]))
    rec: dict[str, Any] = {}
    if isinstance(positive, str):
        if positive != "ground_truth":
            raise ValueError(f"positive must be 'ground_truth' or an editor, got {positive!r}")
        pos = judge(sample["target"], sample, ocr)
    else:
        pos_img, _ = sample_edits(positive, row, root, 1, seed=seed + 1, steps=steps)
        pos_img = torch.nn.functional.interpolate(pos_img, size=(h, w), mode="bilinear", align_corners=False)
        pos = judge(pos_img[0], sample, ocr)
        if not (pos.defined and pos.passed):
            return {"reason": f"expert positive does not pass the judge: {pos.detail}"}
        rel = f"images/{row['id']}_chosen.png"
        _save(pos_img[0], out / rel, size_wh)
        rec["chosen"] = rel
    if not pos.defined:
        return {"reason": f"judge undecided on the positive: {pos.detail}"}
    best, best_score = None, math.inf
    for k in range(cands.shape[0]):
        res = judge(cands[k], sample, ocr)
        if not res.defined:
            continue
        qualifies = not res.passed or (margin is not None and res.score <= pos.score - margin)
        if qualifies and res.score < best_score:
            best, best_score = k, res.score
    if best is None:
        return {"reason": "no candidate failed the judge (or fell below the positive by the margin)"}
    rel = f"images/{row['id']}_rejected.png"
    _save(cands[best], out / rel, size_wh)
    return {
        **rec,
        "kept": True,
        "rejected": rel,
        "pos_score": float(pos.score),
        "neg_score": float(best_score),
    }
