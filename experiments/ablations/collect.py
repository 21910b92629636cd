"""Turn an ablation's run folders into a table, a plot and ``results.json`` (issue 9).

    python experiments/ablations/collect.py <study> [--sweep-dir DIR] [--max-per-task N] [--no-eval]

For every job folder of the study's latest sweep (``outputs/ablations/<study>/<time>/<overrides>/``, each
with the ``config.yaml`` that ``rededit-train`` saves and its CSV log), the collector reads

* the training-loss statistics over the second half of training (``train/loss_step``): mean, std and the
  coefficient of variation ``std / mean`` (the loss-variance figure of §3.8), and the std of step-to-step
  differences;
* held-out edit quality: ``rededit-eval`` on the job's exported editor over the synthetic corpus's bench split
  (resumable: edits already on disk are reused), once per evaluation variant the study asks for (EMA vs raw
  weights; references as given vs reversed). Figures: programmatic success rate, edit-region error as a
  fraction of the identity baseline's, and PSNR outside the edit region.

and aggregates mean ± std over seeds per factor value. Outputs go to ``experiments/ablations/<study>/``:
``results.json`` (every job and the aggregate), ``table.md`` and ``plot.png``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUT_ROOT = REPO / "outputs" / "ablations"
# rededit-eval's overall figures a study can list in ``ablation.metrics`` (key → table label, format).
BENCH_METRICS = {
    "success": ("success ↑", ".3f"),
    "error_ratio": ("edit err / identity ↓", ".3f"),
    "psnr_outside": ("PSNR outside dB ↑", ".2f"),
    "l1": ("L1 ↓", ".4f"),
    "l2": ("L2 ↓", ".4f"),
}
METRICS = tuple((k, *BENCH_METRICS[k]) for k in ("success", "error_ratio", "psnr_outside"))  # the default
LOSS_METRICS = (("loss_cv", "loss CV ↓", ".3f"), ("loss_mean", "loss (2nd half)", ".4f"))


def study_metrics(meta: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """Held-out figures of a study: identity similarity on portraits (§3.7), the synthetic bench's figures
    the study file lists (``ablation.metrics``, e.g. FireEdit's L1/L2), or the default :data:`METRICS`."""
    if meta.get("evaluation") == "portrait_identity":
        from identity_eval import METRICS as IDENTITY_METRICS

        return IDENTITY_METRICS
    names = meta.get("metrics")
    if not names:
        return METRICS
    unknown = [k for k in names if k not in BENCH_METRICS]
    if unknown:
        raise SystemExit(f"ablation.metrics: unknown {unknown}; known: {sorted(BENCH_METRICS)}")
    return tuple((k, *BENCH_METRICS[k]) for k in names)


def latest_sweep(study: str) -> Path:
    runs = sorted(p for p in (OUT_ROOT / study).glob("*") if p.is_dir())
    if not runs:
        raise SystemExit(
            f"no sweep of {study!r} under {OUT_ROOT / study}: run `rededit-train +ablation={study}`"
        )
    return runs[-1]


def loss_stats(job: Path) -> dict[str, float | None]:
    """Statistics of ``train/loss_step`` over the second half of the logged steps."""
    path = job / "logs" / "metrics.csv"
    if not path.exists():
        return {"loss_mean": None, "loss_std": None, "loss_cv": None, "loss_diff_std": None}
    losses: dict[int, float] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("train/loss_step"):
                losses[int(row["step"])] = float(row["train/loss_step"])
    vals = [losses[s] for s in sorted(losses)][len(losses) // 2 :]
    if len(vals) < 3:
        return {"loss_mean": None, "loss_std": None, "loss_cv": None, "loss_diff_std": None}
    mean, std = statistics.fmean(vals), statistics.stdev(vals)
    diffs = [b - a for a, b in itertools.pairwise(vals)]
    return {
        "loss_mean": mean,
        "loss_std": std,
        "loss_cv": std / mean,
        "loss_diff_std": statistics.stdev(diffs),
    }


def evaluate_job(
    job: Path, manifest: str, max_per_task: int, raw: bool, order: str, meta: dict[str, Any]
) -> dict[str, Any]:
    """Overall model metrics of ``rededit-eval`` on the job's export (cached in ``job/eval_<variant>``), or
    the portrait identity figures for a study with ``evaluation: portrait_identity``."""
    if meta.get("evaluation") == "portrait_identity":
        from identity_eval import evaluate_identity

        return evaluate_identity(job, manifest, raw=raw)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rededit.eval.harness import evaluate

    out = job / f"eval_{'raw' if raw else 'ema'}_{order}"
    # Quoted: job folders are named by their overrides (commas, braces) and Hydra parses these values.
    overrides = [
        f"checkpoint='{job / 'export'}'",
        f"out_dir='{out}'",
        f"benchmark.manifest_path='{manifest}'",
        f"benchmark.max_per_task={max_per_task}",
        f"benchmark.reference_order={order}",
        f"raw={str(raw).lower()}",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    overall = evaluate(cfg)["systems"]["model"]["overall"]
    return {k: (overall.get(k) or {}).get("mean") for k in BENCH_METRICS}


def factor_value(job: Path, cfg: Any, factor: str) -> str:
    """The job's value of the study's factor: the command-line choice (a group option such as
    ``timestep=stratified`` reads better than its node), else the resolved config value."""
    from omegaconf import OmegaConf

    overrides = job / ".hydra" / "overrides.yaml"
    if overrides.exists():
        for line in OmegaConf.load(overrides):
            key, _, val = str(line).partition("=")
            if key.lstrip("+~") == factor:
                return val
    value = OmegaConf.select(cfg, factor)
    return (
        json.dumps(OmegaConf.to_container(value), sort_keys=True)
        if OmegaConf.is_config(value)
        else str(value)
    )


def mean_std(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) >= 2 else None,
        "n": len(vals),
    }


def fmt(stat: dict[str, Any], spec: str) -> str:
    if stat["mean"] is None:
        return "n/a"
    s = format(stat["mean"], spec)
    return s + (f" ± {format(stat['std'], spec)}" if stat["std"] is not None else "")


def collect(study: str, sweep: Path, max_per_task: int, do_eval: bool) -> dict[str, Any]:
    from omegaconf import OmegaConf

    # Job folders are named by their overrides; a group override (loss/consistency=face) nests them one
    # level deeper. Every job has Hydra's .hydra/ folder beside the config.yaml rededit-train saves.
    jobs = sorted(p.parent for p in sweep.rglob(".hydra") if (p.parent / "config.yaml").is_file())
    if not jobs:
        raise SystemExit(f"{sweep}: no job folders with config.yaml")
    meta = OmegaConf.to_container(OmegaConf.load(jobs[0] / "config.yaml").ablation, resolve=True)
    # Which figures to tabulate is a collection choice: the study file's current list applies to sweeps run
    # before it was added to the file.
    study_file = REPO / "conf" / "ablation" / f"{study}.yaml"
    if "metrics" not in meta and study_file.is_file():
        listed = OmegaConf.select(OmegaConf.load(study_file), "ablation.metrics")
        if listed is not None:
            meta["metrics"] = list(listed)
    weights = [False, True] if meta.get("compare_raw") else [False]
    orders = list(meta.get("reference_orders") or ["as_is"])
    rows = []
    for job in jobs:
        cfg = OmegaConf.load(job / "config.yaml")
        value = factor_value(job, cfg, meta["factor"])
        row: dict[str, Any] = {
            "job": job.name,
            "factor": str(value),
            "seed": int(cfg.seed),
            **loss_stats(job),
        }
        finished = (job / "export" / "WEIGHTS").exists() or (job / "export" / "rededit.yaml").exists()
        row["finished"] = finished
        for raw in weights:
            for order in orders:
                variant = f"{'raw' if raw else 'ema'}/{order}"
                if do_eval and finished:
                    row[variant] = evaluate_job(job, str(cfg.data.manifest), max_per_task, raw, order, meta)
        rows.append(row)
    variants = [f"{'raw' if raw else 'ema'}/{order}" for raw in weights for order in orders]
    metrics = study_metrics(meta)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["factor"]].append(r)
    summary = {}
    for value, rs in groups.items():
        s: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rs)}
        for key, _, _ in LOSS_METRICS:
            s[key] = mean_std([r.get(key) for r in rs])
        for variant in variants:
            s[variant] = {k: mean_std([(r.get(variant) or {}).get(k) for r in rs]) for k, _, _ in metrics}
        summary[value] = s
    return {
        "study": study,
        "meta": meta,
        "sweep": str(sweep),
        "max_per_task": max_per_task,
        "variants": variants,
        "metrics": [list(m) for m in metrics],
        "jobs": rows,
        "summary": summary,
    }


def render_table(result: dict[str, Any]) -> str:
    meta, variants = result["meta"], result["variants"]
    metrics = [tuple(m) for m in result.get("metrics") or METRICS]
    head = [meta["factor"], "seeds", *(t for _, t, _ in LOSS_METRICS)]
    for variant in variants:
        head += [f"{t} [{variant}]" for _, t, _ in metrics]
    lines = [
        f"# {result['study']} ({meta['section']})",
        "",
        f"Claim: {meta['claim']}. Mean ± std over seeds; held-out: "
        + (
            "the portrait corpus's bench split (SFace identity similarity, experiments/ablations/identity_eval.py)."
            if meta.get("evaluation") == "portrait_identity"
            else f"synthetic bench, {result['max_per_task']} items per task."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for value, s in result["summary"].items():
        cells = [f"`{value}`", str(len(s["seeds"]))] + [fmt(s[k], spec) for k, _, spec in LOSS_METRICS]
        for variant in variants:
            cells += [fmt(s[variant][k], spec) for k, _, spec in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [tuple(m) for m in result.get("metrics") or METRICS]
    keys = [("loss_cv", None)] + [(k, v) for v in result["variants"] for k, _, _ in metrics]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
    names = list(result["summary"])
    for ax, (key, variant) in zip(axes, keys):
        stats = [
            result["summary"][n][key] if variant is None else result["summary"][n][variant][key]
            for n in names
        ]
        means = [s["mean"] if s["mean"] is not None else float("nan") for s in stats]
        errs = [s["std"] or 0.0 for s in stats]
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color="tab:red")
        ax.set_xticks(range(len(names)), [n[:18] for n in names], rotation=30, ha="right", fontsize=7)
        ax.set_title(key if variant is None else f"{key}\n{variant}", fontsize=8)
    fig.suptitle(f"{result['study']}: mean ± std over seeds", fontsize=9)
    from rededit.utils.io import save_figure

    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("--sweep-dir", type=Path, default=None, help="default: the study's latest sweep")
    p.add_argument("--max-per-task", type=int, default=4)
    p.add_argument("--no-eval", action="store_true", help="loss statistics only")
    p.add_argument("--out", type=Path, default=None, help="default: experiments/ablations/<study>/")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # identity_eval
    from rededit.utils.io import atomic_write_text

    sweep = args.sweep_dir or latest_sweep(args.study)
    result = collect(args.study, sweep, args.max_per_task, not args.no_eval)
    out = args.out or REPO / "experiments" / "ablations" / args.study
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result, indent=1, default=str))
    table = render_table(result)
    atomic_write_text(out / "table.md", table)
    plot(result, out / "plot.png")
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
