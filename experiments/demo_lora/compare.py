"""Base vs LoRA on the same held-out bench items: issue 20's `experiment=demo_lora` acceptance check.

    python experiments/demo_lora/compare.py --base <base report>/metrics.json --lora <lora report>/metrics.json \\
        --task invert --out <folder>

Both ``metrics.json`` files are ``python -m rededit.eval.demo_report`` outputs on the same manifest, split, items,
seed and sampler (the script refuses otherwise). Per task it puts the edit-region error (L1 inside the edit mask,
:mod:`rededit.scoring.edit_metrics`) of both side by side with their ratio LoRA / base, the PSNR outside the
edit and the programmatic success. The goal: on ``--task`` the ratio ≤ ``--max-new-ratio`` (0.5); on every other
edit task ≤ 1 + ``--max-regression`` (0.05), i.e. at most 5 % more error than the base. With 16 items per task a
ratio moves by a few per cent from item to item, so each ratio carries a 95 % paired bootstrap interval over the
task's items (the same items resampled in both reports, 2,000 draws, fixed seed): a regression whose interval lies
above 1 is the adapter's, not the draw of items. Writes ``comparison.md`` and ``comparison.json`` into ``--out``
and exits 0 whether or not the goal is met (the table says it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rededit.utils.io import atomic_write_text, write_json

# Settings that must agree for the two reports to score the same edits.
SAME = ("manifest", "split", "max_per_task", "seed", "steps", "cfg")


def _load(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a readable metrics.json ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise SystemExit(f"{path}: no `tasks` table; expected a demo_report metrics.json")
    return data


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and v is not None else math.nan


def paired_interval(
    base: dict[str, Any], lora: dict[str, Any], task: str, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % bootstrap interval of ``sum(lora errors) / sum(base errors)`` over ``task``'s items, each draw
    resampling the same item ids in both reports (``metrics.json``'s ``samples``); NaN when items are missing."""
    b = {s["id"]: s.get("edit_region_error") for s in base.get("samples", []) if s.get("task") == task}
    lo = {s["id"]: s.get("edit_region_error") for s in lora.get("samples", []) if s.get("task") == task}
    ids = sorted(i for i in b if b[i] is not None)
    if not ids or set(ids) != {i for i in lo if lo[i] is not None}:  # not the same items: no interval
        return math.nan, math.nan
    be, le = np.array([b[i] for i in ids]), np.array([lo[i] for i in ids])
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))
    ratios = le[picks].sum(1) / np.maximum(be[picks].sum(1), 1e-12)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(low), float(high)


def compare(
    base: dict[str, Any], lora: dict[str, Any], task: str, max_new_ratio: float, max_regression: float
) -> dict[str, Any]:
    """Per task ``{base_error, lora_error, ratio, ...}`` and the goal verdict."""
    bs, ls = base.get("settings", {}), lora.get("settings", {})
    differ = [k for k in SAME if k in bs and k in ls and str(bs[k]) != str(ls[k])]
    if differ:
        raise SystemExit(f"the reports did not score the same items: settings {differ} differ")
    rows: dict[str, dict[str, float]] = {}
    for name in sorted(set(base["tasks"]) & set(lora["tasks"])):
        b, lo = base["tasks"][name], lora["tasks"][name]
        be, le = _num(b.get("edit_region_error")), _num(lo.get("edit_region_error"))
        low, high = paired_interval(base, lora, name)
        rows[name] = {
            "n": _num(lo.get("n")),
            "base_error": be,
            "lora_error": le,
            "ratio": le / be if be > 0 else math.nan,
            "ratio_low": low,
            "ratio_high": high,
            "base_psnr_outside": _num(b.get("psnr_outside")),
            "lora_psnr_outside": _num(lo.get("psnr_outside")),
            "base_success": _num(b.get("success")),
            "lora_success": _num(lo.get("success")),
        }
    if task not in rows:
        raise SystemExit(f"task {task!r} is in neither report's bench; tasks: {sorted(rows)}")
    others = {k: v for k, v in rows.items() if k != task and not math.isnan(v["ratio"])}
    worst = max(others.items(), key=lambda kv: kv[1]["ratio"]) if others else (None, {"ratio": math.nan})
    new_ok = rows[task]["ratio"] <= max_new_ratio
    others_ok = all(v["ratio"] <= 1 + max_regression for v in others.values())
    return {
        "task": task,
        "rows": rows,
        "goal": {
            "new_task_ratio": rows[task]["ratio"],
            "new_task_ok": bool(new_ok),
            "worst_other": worst[0],
            "worst_other_ratio": worst[1]["ratio"],
            "others_ok": bool(others_ok),
            "met": bool(new_ok and others_ok),
            "max_new_ratio": max_new_ratio,
            "max_regression": max_regression,
        },
    }


def _f(v: float, spec: str) -> str:
    return "n/a" if math.isnan(v) else format(v, spec)


def render(result: dict[str, Any]) -> str:
    g = result["goal"]
    lines = [
        "| task | n | edit-region L1, base | LoRA | LoRA / base | 95 % interval | PSNR outside base → LoRA (dB) "
        "| success base → LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        mark = " (new)" if name == result["task"] else ""
        lines.append(
            f"| {name}{mark} | {_f(r['n'], '.0f')} | {_f(r['base_error'], '.4f')} | {_f(r['lora_error'], '.4f')} | "
            f"{_f(r['ratio'], '.3f')} | {_f(r['ratio_low'], '.3f')}–{_f(r['ratio_high'], '.3f')} | "
            f"{_f(r['base_psnr_outside'], '.2f')} → {_f(r['lora_psnr_outside'], '.2f')} | "
            f"{_f(r['base_success'], '.2f')} → {_f(r['lora_success'], '.2f')} |"
        )
    lines += [
        "",
        f"Goal: `{result['task']}` LoRA / base ≤ {g['max_new_ratio']}: {_f(g['new_task_ratio'], '.3f')} "
        f"({'met' if g['new_task_ok'] else 'NOT met'}); every other task ≤ {1 + g['max_regression']:.2f}: worst "
        f"`{g['worst_other']}` {_f(g['worst_other_ratio'], '.3f')} ({'met' if g['others_ok'] else 'NOT met'}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="demo_report metrics.json of the base editor")
    p.add_argument("--lora", required=True, help="demo_report metrics.json of the LoRA editor")
    p.add_argument("--task", default="invert", help="the task the LoRA learned")
    p.add_argument("--max-new-ratio", type=float, default=0.5)
    p.add_argument("--max-regression", type=float, default=0.05)
    p.add_argument("--out", required=True, help="folder for comparison.md / comparison.json")
    args = p.parse_args(argv)
    result = compare(_load(args.base), _load(args.lora), args.task, args.max_new_ratio, args.max_regression)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = render(result)
    atomic_write_text(out / "comparison.md", text)
    write_json(out / "comparison.json", result)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
