"""The demo's evaluation report: edits of held-out bench samples, per-task numbers against the issue's goal.

    python -m rededit.eval.demo_report --checkpoint outputs/demo/export \\
        --manifest outputs/demo/corpus/manifest.parquet --out outputs/demo/report \\
        --runs pretrain=outputs/demo/pretrain sft=outputs/demo/sft

:func:`build_demo_report` edits up to ``max_per_task`` rows of every task of the ``bench`` split with the
editor (through the edit loop of :mod:`rededit.inference.edit_loop`, every image cover-resized to the bucket its sample maps to in the
editor's training bucket set, ``data.buckets``, eq. (1) of the report via
:meth:`~rededit.data.buckets.ResolutionSet.assign`), and scores them with ``rededit-eval``'s own code: items
are prepared by :func:`rededit.eval.harness.prepare`, each edit is scored as its saved 8-bit image by
:func:`rededit.eval.harness.score_one` (:func:`rededit.scoring.edit_metrics.reference_metrics` and the
programmatic judge) and aggregated by :func:`rededit.eval.harness.summarize`, so a task's numbers here equal
``rededit-eval``'s for the same items (``benchmark.max_per_task`` = ``--max-per-task``, same seed and steps).
It writes into ``out_dir`` (each file atomically):

* ``grid.png``: rows = samples (``grid_per_task`` of every task), columns source (Picture 1; blank for
  text-to-image) | instruction | edit | ground truth;
* ``metrics.json``: per task and overall ``n``, edit-region error, identity baseline, their ratio, PSNR
  outside the edit region (and the full-image metrics), programmatic success (the synthetic bench's judges,
  :mod:`rededit.scoring.judges.programmatic`; text without OCR), the colour text-following check
  (:mod:`rededit.eval.text_following`), the goal summary, and the settings (checkpoint, weights, steps, cfg,
  seed, split);
* ``report.md``: the per-task table with the goal check (ratio ≤ 0.5 and PSNR outside ≥ 25 dB) and the demo
  issue's goals (:func:`goal_summary`: ≥ 7 tasks incl. ≥ 4 object-level at the per-task goal, every ratio
  < 0.9, text-following ≥ 0.7, object-level success ≥ 0.5, T2I success ≥ 0.3);
* ``loss_curves.png`` (when Lightning CSV logs are given): the loss per σ bin (``train/loss_tbin*``), the
  total training loss and the validation loss (``val/loss``, when the run validated) against ``step``, with a
  caption on how to read them (:func:`plot_loss_curves`).

Goal check per edit task: ``ratio ≤ 0.5`` and, where the task has pixels outside its edit region, mean PSNR
outside ≥ 25 dB (global edits, whose mask is the whole image, are checked on the ratio alone and marked
"n/a" for PSNR). Text-to-image has no source, hence no identity baseline, and is listed without a check.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rededit.data.images import to_tensor
from rededit.data.manifest import Manifest
from rededit.eval.benchmarks import synthetic_item
from rededit.eval.harness import Scorers, prepare, score_one, summarize
from rededit.eval.tables import render_grid
from rededit.eval.text_following import colour_text_following
from rededit.inference.edit_loop import EditRequest
from rededit.inference.edit_loop import run_edits as run_edit_loop
from rededit.inference.editor import EditorLoadError, load_editor
from rededit.inference.images import save_image, tensor_to_pil
from rededit.inference.sizing import editor_buckets, sizes_fn
from rededit.scoring.judges.programmatic import judge
from rededit.utils.io import atomic_path, atomic_write_text, json_safe, write_json
from rededit.utils.logging import get_logger

log = get_logger(__name__)

GOAL_RATIO_MAX = 0.5
GOAL_PSNR_OUTSIDE_MIN = 25.0
GOAL_RATIO_ALL = 0.9  # every edit task strictly below
GOAL_MIN_TASKS = 7
GOAL_MIN_OBJECT_TASKS = 4
GOAL_TEXT_FOLLOWING = 0.7
GOAL_OBJECT_SUCCESS = 0.5
GOAL_T2I_SUCCESS = 0.3
OBJECT_TASKS = ("add", "color", "remove", "replace", "compose", "text")
LOSS_COLUMN = "train/loss_step"


# ------------------------------------------------------------------------------------------- samples
def select_rows(manifest: Any, split: str, max_per_task: int) -> list[int]:
    """Row indices of ``split``: the first ``max_per_task`` of every task, in manifest order."""
    splits = manifest.column_numpy("split") if manifest.has("split") else None
    if splits is None:
        raise ValueError(f"{manifest.path}: the manifest has no `split` column, cannot select {split!r}")
    tasks = manifest.column_numpy("task")
    taken: dict[str, int] = defaultdict(int)
    rows = []
    for i in np.nonzero(splits == split)[0].tolist():
        if taken[tasks[i]] < max_per_task:
            taken[tasks[i]] += 1
            rows.append(i)
    if not rows:
        raise ValueError(f"{manifest.path}: no rows with split == {split!r}")
    return rows


def load_samples(manifest: Any, rows: Sequence[int], sizes) -> list[dict[str, Any]]:
    """Bench rows prepared exactly as ``rededit-eval`` prepares its items
    (:func:`rededit.eval.benchmarks.synthetic_item` → :func:`rededit.eval.harness.prepare`: the same resize,
    mask, boxes, instruction and identity baseline), as sample dicts: ``id``, ``task``, ``text``, ``target``,
    ``references``, ``mask`` ``[1, H, W]`` or None, ``boxes``, ``key`` and ``prepared`` (the harness's item)."""
    samples = []
    for i in rows:
        p = prepare(synthetic_item(manifest, i), sizes)
        samples.append(
            {
                "id": p.item.id,
                "task": p.item.task,
                "text": p.text,
                "target": p.target,
                "references": p.refs,
                "mask": p.mask,
                "boxes": p.item.object_boxes,
                "key": (p.item.task, p.hw, tuple(tuple(r.shape[1:]) for r in p.refs)),
                "prepared": p,
            }
        )
    return samples


# ------------------------------------------------------------------------------------------- edits
def edit_request(sample: Mapping[str, Any]) -> EditRequest:
    """The edit loop's request for a loaded sample (:func:`load_samples`)."""
    hw = tuple(sample["target"].shape[-2:])
    return EditRequest(
        id=sample["id"],
        text=sample["text"],
        references=sample["references"],
        hw=hw,
        object_boxes=sample["boxes"],
    )


def run_edits(
    editor: Any,
    samples: list[dict[str, Any]],
    *,
    steps: int | None,
    cfg: float | None,
    seed: int,
    negative_prompt: str | None = None,
    batch_size: int = 8,
    score: bool = True,
    chunk_size: int = 64,
) -> None:
    """Fill ``sample["pred"]`` (``[3, H, W]`` in [-1, 1]) and ``sample["metrics"]`` through the edit loop
    (:func:`rededit.inference.edit_loop.run_edits`: per-item noise, object boxes passed).

    Samples are edited ``chunk_size`` at a time in batches of ``batch_size``, as ``rededit-eval`` does with
    its defaults (``sampler.chunk_size``, ``sampler.batch_size``): each item's noise is its own, but which items
    share a batch (and their text padding) still moves float rounding, so the same batching gives
    bit-identical edits, hence identical numbers. ``score=False`` fills ``pred`` only (edits with a changed
    instruction have no ground truth to score).
    """
    requests = [edit_request(s) for s in samples]
    preds = []
    for lo in range(0, len(requests), chunk_size):
        preds += run_edit_loop(
            editor,
            requests[lo : lo + chunk_size],
            seed=seed,
            batch_size=batch_size,
            steps=steps,
            cfg_scale=cfg,
            negative_prompt=negative_prompt,
        )
    for s, pred in zip(samples, preds):
        s["pred"] = pred
    if not score:
        return
    # rededit-eval's scoring of one edit (reference metrics, programmatic judge; text without OCR), on the
    # edit as rededit-eval reads it back: its 8-bit PNG. Same item, same edit, same numbers.
    scorers = Scorers(reference=True, programmatic=judge)
    for s in samples:
        saved = to_tensor(tensor_to_pil(s["pred"]))
        s["metrics"] = score_one(saved, s["prepared"], scorers)


# ------------------------------------------------------------------------------------------ curves
def _csv_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "logs" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no Lightning CSV log at {path}")
    return path


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _series(rows: Sequence[Mapping[str, str]], column: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for rec in rows:
        if rec.get(column) not in ("", None):
            steps.append(int(float(rec["step"])))
            values.append(float(rec[column]))
    return np.asarray(steps), np.asarray(values)


def read_loss_csv(path: str | os.PathLike, column: str = LOSS_COLUMN) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the rows of a Lightning CSV log that have ``column``.

    Args:
        path: ``metrics.csv`` or a run folder (then ``<run>/logs/metrics.csv``).
    """
    path = _csv_path(path)
    fields, rows = _read_csv(path)
    if column not in fields or "step" not in fields:
        raise ValueError(f"{path}: needs columns 'step' and {column!r}, has {fields}")
    return _series(rows, column)


def _pick(fields: Sequence[str], name: str) -> str | None:
    """The CSV column of a logged metric: ``name_step`` (logged per step and per epoch), else ``name``."""
    return next((c for c in (f"{name}_step", name, f"{name}_epoch") if c in fields), None)


def loss_columns(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The loss curves of a Lightning CSV log: ``total`` (``train/loss``), ``tbin<k>`` (``train/loss_tbin<k>``,
    the unweighted flow-matching error of the samples whose σ fell in bin k of K equal bins), ``val``
    (``val/loss``) and ``val_tbin<k>``; a curve the run did not log is left out (validation is optional)."""
    path = _csv_path(path)
    fields, rows = _read_csv(path)
    if "step" not in fields:
        raise ValueError(f"{path}: needs a 'step' column, has {fields}")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    bins = sorted({int(m.group(1)) for f in fields if (m := re.match(r"^train/loss_tbin(\d+)", f))})
    names = {"total": "train/loss", "val": "val/loss"}
    names.update({f"tbin{k}": f"train/loss_tbin{k}" for k in bins})
    val_bins = sorted({int(m.group(1)) for f in fields if (m := re.match(r"^val/loss_tbin(\d+)", f))})
    names.update({f"val_tbin{k}": f"val/loss_tbin{k}" for k in val_bins})
    for key, name in names.items():
        column = _pick(fields, name)
        if column is not None:
            steps, values = _series(rows, column)
            if steps.size:
                out[key] = (steps, values)
    return out


LOSS_CAPTION = (
    "Training loss per noise level σ: each coloured curve is the flow-matching error of the samples whose σ "
    "fell in that bin (train/loss_tbin*, faint: logged values, solid: moving average), so it compares like "
    "with like; a falling curve is learning. The grey total (train/loss) averages whichever σ each batch drew, "
    "with the loss weighting applied: the error differs by orders of magnitude between low and high σ, so the "
    "total jumps whenever a batch draws low-σ samples, and it can rise while every bin falls when the σ mix, "
    "the edit-region weight or the learning rate changes. Dots: held-out validation loss (val/loss), when the "
    "run validated."
)


def _smoothed(
    ax: Any, steps: np.ndarray, values: np.ndarray, colour: Any, name: str, lw: float = 1.6
) -> None:
    """Logged values (faint) and their moving average (solid, labelled)."""
    ax.plot(steps, values, color=colour, alpha=0.25, lw=0.7)
    k = max(1, min(50, steps.size // 10))
    smooth = np.convolve(values, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1 :], smooth, color=colour, lw=lw, label=name)


def plot_loss_curves(
    csv_paths: Mapping[str, str | os.PathLike], out_png: str | os.PathLike, *, strict: bool = False
) -> Path:
    """One panel per labelled CSV log: the loss per σ bin (:func:`loss_columns`, raw faint and a moving
    average), the total training loss (grey) and the validation loss when it was logged, with a caption that
    says how to read them (:data:`LOSS_CAPTION`).

    A log without loss values (Lightning writes step values every ``log_every_n_steps``, so a very short run
    has none) is skipped with a warning and named on the plot, so a report is still written; with
    ``strict`` it raises instead. A missing file always raises.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for label, path in csv_paths.items():
        try:
            found = loss_columns(path)
        except ValueError as err:
            if strict:
                raise
            log.warning("loss curves: skipping %s: %s", label, err)
            found = {}
        if strict and not any(k == "total" or k.startswith("tbin") for k in found):
            raise ValueError(f"{path}: no {LOSS_COLUMN} or train/loss_tbin* values")
        curves[label] = found
    n = max(1, len(curves))
    caption = textwrap.fill(LOSS_CAPTION, 150)
    caption_h = 0.13 * (caption.count("\n") + 1) + 0.15  # inches below the panels
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.4 * n + caption_h), dpi=100, squeeze=False)
    try:
        for ax, (label, found) in zip(axes[:, 0], curves.items()):
            bins = sorted(int(k[4:]) for k in found if k.startswith("tbin"))
            nbins = (max(bins) + 1) if bins else 0
            colours = plt.cm.viridis(np.linspace(0.0, 0.9, max(1, nbins)))

            for b in bins:
                name = f"σ ∈ [{b / nbins:.2f}, {(b + 1) / nbins:.2f})"
                _smoothed(ax, *found[f"tbin{b}"], colours[b], name)
            if "total" in found:
                _smoothed(ax, *found["total"], "0.45", "total (train/loss)", lw=1.0)
            if "val" in found:
                ax.plot(*found["val"], "o", color="black", ms=4, label="validation (val/loss)")
            for b in bins:
                if f"val_tbin{b}" in found:
                    ax.plot(*found[f"val_tbin{b}"], "o", color=colours[b], ms=3, mec="black", mew=0.5)
            if not found:
                ax.text(0.5, 0.5, f"{label}: no loss values logged", transform=ax.transAxes, ha="center")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            if ax.lines and all(v > 0 for ln in ax.lines for v in np.asarray(ln.get_ydata(), float)):
                ax.set_yscale("log")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
        fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom")
        fig.tight_layout(rect=(0, caption_h / (3.4 * n + caption_h), 1, 1))
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(out_png)


# ---------------------------------------------------------------------------------------- report
def goal_check(task: str, stats: Mapping[str, Any]) -> dict[str, Any]:
    """Pass/fail of the issue's goal for one task (``None`` where it does not apply)."""
    ratio, po = stats.get("error_ratio"), stats.get("psnr_outside")
    if ratio is None:
        return {"applies": False, "ratio_ok": None, "psnr_ok": None, "pass": None}
    ratio_ok = ratio <= GOAL_RATIO_MAX
    psnr_ok = None if po is None else po >= GOAL_PSNR_OUTSIDE_MIN
    return {
        "applies": True,
        "ratio_ok": ratio_ok,
        "psnr_ok": psnr_ok,
        "pass": ratio_ok and psnr_ok is not False,
    }


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def goal_summary(tasks: Mapping[str, Mapping[str, Any]], following: Mapping[str, Any]) -> dict[str, Any]:
    """The demo issue's goals 2–4 from the per-task table and the text-following check.

    2. ratio ≤ 0.5 (and PSNR outside ≥ 25 dB where defined) on ≥ 7 of the 10 edit tasks, including ≥ 4 of the
       6 object-level tasks; every edit task's ratio strictly below 0.9;
    3. colour text-following success ≥ 0.7, and programmatic success averaged over the object-level tasks
       ≥ 0.5;
    4. text-to-image programmatic success ≥ 0.3.
    """
    checked = [t for t, st in tasks.items() if st["goal"]["applies"]]
    passed = [t for t in checked if tasks[t]["goal"]["pass"]]
    objects = [t for t in OBJECT_TASKS if t in tasks]
    obj_passed = [t for t in objects if t in passed]
    below = [
        t for t in checked if tasks[t]["error_ratio"] is not None and tasks[t]["error_ratio"] < GOAL_RATIO_ALL
    ]
    obj_success = [tasks[t]["success"] for t in objects if tasks[t].get("success") is not None]
    obj_success_mean = sum(obj_success) / len(obj_success) if obj_success else None
    t2i = tasks.get("t2i", {}).get("success")
    tf = following.get("success")
    goals = {
        "tasks_passed": len(passed) >= GOAL_MIN_TASKS and len(obj_passed) >= GOAL_MIN_OBJECT_TASKS,
        "all_below_0.9": len(below) == len(checked) and bool(checked),
        "text_following": tf is not None and tf >= GOAL_TEXT_FOLLOWING,
        "object_success": obj_success_mean is not None and obj_success_mean >= GOAL_OBJECT_SUCCESS,
        "t2i_success": t2i is not None and t2i >= GOAL_T2I_SUCCESS,
    }
    return {
        "ratio_max": GOAL_RATIO_MAX,
        "psnr_outside_min": GOAL_PSNR_OUTSIDE_MIN,
        "checked": len(checked),
        "passed": len(passed),
        "failed": [t for t in checked if t not in passed],
        "object_tasks_passed": len(obj_passed),
        "object_tasks": len(objects),
        "not_below_0.9": [t for t in checked if t not in below],
        "object_success_mean": obj_success_mean,
        "t2i_success": t2i,
        "text_following_success": tf,
        "goals": goals,
        "all_met": all(goals.values()),
    }


def render_markdown(result: Mapping[str, Any], *, loss_png: str | None, grid_png: str = "grid.png") -> str:
    s = result["settings"]
    lines = [
        "# Demo editor on the held-out bench split",
        "",
        f"Checkpoint `{s['checkpoint']}` ({s['weights']} weights); split `{s['split']}`, up to "
        f"{s['max_per_task']} samples per task; Euler steps {s['steps']}, CFG {s['cfg']}, seed {s['seed']}.",
        "",
        f"Per task: edit-region L1 at most {GOAL_RATIO_MAX} × the identity baseline (returning Picture 1 "
        f"unchanged) and PSNR outside the edit region ≥ {GOAL_PSNR_OUTSIDE_MIN:g} dB. Images in [0, 1]; PSNR "
        "outside is n/a for global edits (mask = whole image), the ratio is n/a for text-to-image (no source). "
        "Success: the synthetic bench's programmatic judge (text without OCR: closeness on the glyph mask).",
        "",
        "| task | n | edit-region L1 | identity L1 | ratio | PSNR outside (dB) | identity PSNR outside | "
        f"full PSNR (dB) | success | ratio ≤ {GOAL_RATIO_MAX} | PSNR ≥ {GOAL_PSNR_OUTSIDE_MIN:g} | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|:-:|",
    ]
    for task, st in result["tasks"].items():
        g = st["goal"]
        lines.append(
            f"| {task} | {st['n']} | {_fmt(st['edit_region_error'], '.4f')} | {_fmt(st['identity_error'], '.4f')} | "
            f"{_fmt(st['error_ratio'], '.3f')} | {_fmt(st['psnr_outside'], '.2f')} | "
            f"{_fmt(st['identity_psnr_outside'], '.2f')} | {_fmt(st['psnr'], '.2f')} | "
            f"{_fmt(st.get('success'), '.2f')} | {_mark(g['ratio_ok'])} | {_mark(g['psnr_ok'])} | {_mark(g['pass'])} |"
        )
    o = result["overall"]
    lines.append(
        f"| **all** | {o['n']} | {_fmt(o['edit_region_error'], '.4f')} | {_fmt(o['identity_error'], '.4f')} | "
        f"{_fmt(o['error_ratio'], '.3f')} | {_fmt(o['psnr_outside'], '.2f')} | "
        f"{_fmt(o['identity_psnr_outside'], '.2f')} | {_fmt(o['psnr'], '.2f')} | | | | |"
    )
    g = result["goal"]
    tf = result.get("text_following") or {}
    met = g["goals"]
    lines += [
        "",
        f"**Per-task goal met on {g['passed']} of {g['checked']} edit tasks** "
        f"({g['object_tasks_passed']} of {g['object_tasks']} object-level)"
        + (f"; not met: {', '.join(g['failed'])}." if g["failed"] else "."),
        "",
        "| goal | measured | target | met |",
        "|---|---|---|:-:|",
        f"| edit tasks at the per-task goal | {g['passed']}/{g['checked']} ({g['object_tasks_passed']}/"
        f"{g['object_tasks']} object-level) | ≥ {GOAL_MIN_TASKS} (≥ {GOAL_MIN_OBJECT_TASKS} object-level) | "
        f"{_mark(met['tasks_passed'])} |",
        f"| every edit task's ratio < {GOAL_RATIO_ALL} | "
        f"{'all' if not g['not_below_0.9'] else 'not: ' + ', '.join(g['not_below_0.9'])} | all | "
        f"{_mark(met['all_below_0.9'])} |",
        f"| colour edits follow the text (another colour asked) | {_fmt(tf.get('success'), '.2f')} "
        f"({tf.get('passed', 0)}/{tf.get('n', 0)}, {tf.get('skipped', 0)} skipped) | ≥ {GOAL_TEXT_FOLLOWING} | "
        f"{_mark(met['text_following'])} |",
        f"| programmatic success, object-level tasks (mean) | {_fmt(g['object_success_mean'], '.2f')} | "
        f"≥ {GOAL_OBJECT_SUCCESS} | {_mark(met['object_success'])} |",
        f"| text-to-image programmatic success | {_fmt(g['t2i_success'], '.2f')} | ≥ {GOAL_T2I_SUCCESS} | "
        f"{_mark(met['t2i_success'])} |",
        "",
        f"![edits]({grid_png})",
    ]
    if loss_png:
        lines += ["", f"![loss curves]({loss_png})", "", LOSS_CAPTION]
    return "\n".join(lines) + "\n"


def build_demo_report(
    editor: Any,
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "bench",
    max_per_task: int = 8,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    negative_prompt: str | None = None,
    grid_per_task: int = 2,
    batch_size: int = 8,
    runs: Mapping[str, str | os.PathLike] | None = None,
    buckets: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Edit the bench rows, score them and write the report files (module docstring).

    Args:
        editor: a stage from :func:`rededit.inference.editor.load_editor` (any object with ``generate``, ``vae``,
            ``backbone``; ``inference_config`` supplies the bucket set and ``checkpoint_path`` the label).
        manifest_path: Parquet manifest with a ``split`` column.
        out_dir: folder for ``grid.png``, ``metrics.json``, ``report.md`` (and ``loss_curves.png``).
        split: rows to evaluate.
        max_per_task: first rows of each task taken from ``split``.
        steps / cfg / seed / negative_prompt: sampler settings (``None``: the stage's defaults).
        grid_per_task: samples of every task shown in the grid.
        runs: ``{label: run folder or metrics.csv}`` for ``loss_curves.png``.
        buckets: bucket-set config overriding the editor's ``data.buckets``.

    Returns:
        the content of ``metrics.json`` plus ``files`` (written paths).
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(manifest_path)
    buckets = dict(buckets) if buckets is not None else editor_buckets(editor)
    samples = load_samples(manifest, select_rows(manifest, split, max_per_task), sizes_fn(editor, buckets))
    steps = steps or getattr(editor, "sample_steps", None)
    cfg = getattr(editor, "cfg_scale", 1.0) if cfg is None else cfg
    run_edits(
        editor,
        samples,
        steps=steps,
        cfg=cfg,
        seed=seed,
        negative_prompt=negative_prompt,
        batch_size=batch_size,
    )

    following = colour_text_following(
        samples,
        lambda items: run_edits(
            editor,
            items,
            steps=steps,
            cfg=cfg,
            seed=seed,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
            score=False,
        ),
    )
    per_sample = [{"id": s["id"], "task": s["task"], **s["metrics"]} for s in samples]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in per_sample:
        by_task[r["task"]].append(r)
    tasks = {task: summarize(by_task[task]) for task in sorted(by_task)}  # rededit-eval's aggregation
    for task, st in tasks.items():
        st["goal"] = goal_check(task, st)
    result: dict[str, Any] = {
        "settings": {
            "checkpoint": str(getattr(editor, "checkpoint_path", None)),
            "weights": getattr(editor, "weights", None),
            "manifest": str(manifest_path),
            "split": split,
            "max_per_task": max_per_task,
            "steps": steps,
            "cfg": cfg,
            "seed": seed,
            "negative_prompt": negative_prompt
            if negative_prompt is not None
            else getattr(editor, "negative_prompt", ""),
            "buckets": buckets,
        },
        "tasks": tasks,
        "overall": summarize(per_sample),
        "text_following": following,
        "goal": goal_summary(tasks, following),
        "samples": json_safe(per_sample),
    }

    files = {}
    shown: dict[str, int] = defaultdict(int)
    grid_rows = []
    for s in sorted(samples, key=lambda s: s["task"]):
        if shown[s["task"]] < grid_per_task:
            shown[s["task"]] += 1
            grid_rows.append(s)

    files["grid"] = str(save_image(render_grid(grid_rows), out_dir / "grid.png"))
    loss_png = None
    if runs:
        files["loss_curves"] = str(plot_loss_curves(runs, out_dir / "loss_curves.png"))
        loss_png = "loss_curves.png"
    write_json(out_dir / "metrics.json", result)
    files["metrics"] = str(out_dir / "metrics.json")
    atomic_write_text(out_dir / "report.md", render_markdown(result, loss_png=loss_png))
    files["report"] = str(out_dir / "report.md")
    log.info(
        "demo report: per-task goal met on %d of %d edit tasks, all goals met: %s; files in %s",
        result["goal"]["passed"],
        result["goal"]["checked"],
        result["goal"]["all_met"],
        out_dir,
    )
    return {**result, "files": files}


# ------------------------------------------------------------------------------------------- CLI
def _parse_runs(items: Sequence[str]) -> dict[str, str]:
    runs = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--runs expects label=path, got {item!r}")
        runs[label] = path
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rededit.eval.demo_report", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="export folder, run folder or .ckpt")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--runs", nargs="*", default=[], help="label=run_folder_or_metrics.csv for the loss curves"
    )
    p.add_argument("--split", default="bench")
    p.add_argument("--max-per-task", type=int, default=8)
    p.add_argument("--grid-per-task", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--raw", action="store_true", help="raw instead of EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    try:
        runs = _parse_runs(args.runs)
        if not Path(args.manifest).is_file():
            raise FileNotFoundError(f"--manifest {args.manifest}: no such file")
        editor = load_editor(args.checkpoint, args.device, raw=args.raw)
    except (EditorLoadError, FileNotFoundError, ValueError) as err:
        p.error(str(err))
    result = build_demo_report(
        editor,
        args.manifest,
        args.out,
        split=args.split,
        max_per_task=args.max_per_task,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        grid_per_task=args.grid_per_task,
        runs=runs,
    )
    g = result["goal"]
    sys.stdout.write(
        f"goal met on {g['passed']} of {g['checked']} edit tasks; report in {args.out}/report.md\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
