"""Learnability benchmark: how much editing a recipe learns in a fixed wall-clock budget on CPU.

Each *arm* is a set of Hydra overrides of a training recipe. The arm trains with ``rededit-train`` for a fixed
wall-clock budget (``trainer.max_time``; the step cap is set high so the clock decides), then its exported EMA
editor is scored on the held-out ``bench`` split by the demo report (:mod:`rededit.eval.demo_report`: the
demo's sampler settings, per-task edit-region error ratio to the identity baseline, PSNR outside the edit,
programmatic success, the colour text-following check and text-to-image success). One table row per arm, so
every lever of the demo issue is a number, not an impression.

    python experiments/benchmarks/learnability/run.py --manifest <corpus>/manifest.parquet \\
        --text-cache <cache> --budget-s 300 --threads 1 \\
        --arm 'coarse=vae=pixel backbone=tiny' --arm 'fine=vae=pixel_fine backbone=tiny_fine'

Arms run one after another (``--jobs 2`` runs two at once, each on ``--threads`` threads: only with
``jobs × threads`` ≤ the cores, and the machine's load is written beside the figures). Outputs:
``<out>/<arm>/`` (the run and its ``report/``), ``<out>/results.json`` and ``<out>/table.md``.

``--collect DIR`` only redraws ``DIR/table.md`` from the ``*.json`` arm files in ``DIR`` (the recorded lever
table in ``results/`` is regenerated this way). ``--smoke`` shrinks everything (a few steps, 2 samples per task) for the default test tier.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TASKS = (
    "add",
    "background",
    "color",
    "compose",
    "remove",
    "replace",
    "restore",
    "stylize",
    "text",
    "viewpoint",
)


def _bin(name: str) -> str:
    """An entry point of this interpreter's environment (the venv's ``rededit-train``)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def train_and_score(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm for the budget, score its export; returns the arm's row (also in ``<arm>/arm.json``)."""
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    hh, rem = divmod(int(args.budget_s), 3600)
    mm, ss = divmod(rem, 60)
    cmd = [
        _bin("rededit-train"),
        f"experiment={args.experiment}",
        f"data.manifest={args.manifest}",
        f"data.text_cache={args.text_cache or 'null'}",
        f"torch_threads={args.threads}",
        f"seed={args.seed}",
        f"++trainer.max_time=00:{hh:02d}:{mm:02d}:{ss:02d}",
        f"trainer.max_steps={args.max_steps}",
        f"hydra.run.dir={out}",
        *overrides,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    t0 = time.perf_counter()
    with open(out / "train.stdout", "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=env)
    train_s = time.perf_counter() - t0
    report = out / "report"
    cmd_eval = [
        sys.executable,
        "-m",
        "rededit.eval.demo_report",
        "--checkpoint",
        str(out / "export"),
        "--manifest",
        args.manifest,
        "--out",
        str(report),
        "--max-per-task",
        str(args.max_per_task),
        "--runs",
        f"{name}={out}",
    ]
    with open(out / "eval.stdout", "w") as fh:
        subprocess.run(
            cmd_eval,
            check=True,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**env, "OMP_NUM_THREADS": str(args.threads)},
        )
    metrics = json.loads((report / "metrics.json").read_text())
    steps = _last_step(out)
    row = {
        "arm": name,
        "overrides": overrides,
        "train_wall_s": round(train_s, 1),
        "optimizer_steps": steps,
        "tasks": {
            t: {k: st.get(k) for k in ("n", "error_ratio", "psnr_outside", "success")}
            for t, st in metrics["tasks"].items()
        },
        "text_following": metrics.get("text_following"),
        "goal": metrics["goal"],
    }
    (out / "arm.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def _last_step(run: Path) -> int | None:
    """Optimizer steps the run took (the last ``step`` in its Lightning CSV log)."""
    import csv

    last = None
    for path in sorted(run.glob("**/metrics*.csv")):
        with open(path, newline="") as fh:
            for rec in csv.DictReader(fh):
                if rec.get("step"):
                    last = max(int(rec["step"]), last or 0)
    return None if last is None else last + 1


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def render_table(rows: list[dict[str, Any]]) -> str:
    """One line per arm: steps, per-task error ratio (programmatic success), mean PSNR outside the edit over
    the local-edit tasks, T2I success, colour text-following and the per-task goal count."""
    head = (
        "| arm | steps | "
        + " | ".join(TASKS)
        + " | PSNR outside, local edits (dB) | t2i success | colour follows text | ratio ≤ 0.5 & PSNR ≥ 25 |"
    )
    lines = [head, "|" + "---|" * (len(TASKS) + 6)]
    for r in rows:
        cells = []
        for t in TASKS:
            st = r["tasks"].get(t, {})
            cells.append(f"{_fmt(st.get('error_ratio'), '.2f')} ({_fmt(st.get('success'), '.2f')})")
        outside = [st.get("psnr_outside") for st in r["tasks"].values() if st.get("psnr_outside") is not None]
        outside_mean = sum(outside) / len(outside) if outside else None
        t2i = r["tasks"].get("t2i", {}).get("success")
        tf = (r.get("text_following") or {}).get("success")
        g = r["goal"]
        lines.append(
            f"| {r['arm']} | {r['optimizer_steps']} | "
            + " | ".join(cells)
            + f" | {_fmt(outside_mean, '.1f')} | {_fmt(t2i, '.2f')} | "
            f"{_fmt(tf, '.2f')} | {g['passed']}/{g['checked']} |"
        )
    return "\n".join(lines) + "\n"


def collect(folder: Path) -> int:
    """Write ``folder/table.md`` from every arm file (``*.json`` with an ``"arm"`` key) in ``folder``, by name."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if "arm" in data:
            rows.append({**data, "arm": path.stem})
    if not rows:
        raise SystemExit(f"--collect {folder}: no arm JSON files")
    (folder / "table.md").write_text(render_table(rows))
    sys.stdout.write(render_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", default=None, help="corpus manifest (required unless --collect)")
    p.add_argument("--text-cache", default=None)
    p.add_argument("--out", default=str(HERE / "runs"))
    p.add_argument("--experiment", default="demo")
    p.add_argument(
        "--arm", action="append", default=[], help="NAME=OVERRIDES (space-separated Hydra overrides)"
    )
    p.add_argument("--budget-s", type=float, default=300.0, help="training wall-clock budget per arm")
    p.add_argument("--max-steps", type=int, default=100_000, help="step cap (the clock decides by default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-per-task", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="a few steps and 2 samples per task (test tier)")
    p.add_argument(
        "--collect", default=None, help="redraw DIR/table.md from the arm JSON files in DIR, then exit"
    )
    args = p.parse_args(argv)
    if args.collect:
        return collect(Path(args.collect))
    if not args.manifest:
        p.error("--manifest is required")
    if args.smoke:
        args.max_steps, args.max_per_task = 3, 2
    arms = []
    for spec in args.arm or ["default="]:
        name, sep, rest = spec.partition("=")
        if not sep or not name:
            p.error(f"--arm {spec!r} is not NAME=OVERRIDES")
        arms.append((name, shlex.split(rest)))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda a: train_and_score(a[0], a[1], args), arms))
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads} × jobs {args.jobs}",
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "budget_s": args.budget_s,
        "experiment": args.experiment,
        "manifest": args.manifest,
        "max_per_task": args.max_per_task,
        "arms": rows,
    }
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.md").write_text(render_table(rows))
    sys.stdout.write(render_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
