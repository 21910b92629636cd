"""Learning curves of long runs: per-task edit-region ratio (and PSNR outside) against optimizer steps.

Each scored checkpoint is a folder ``<arm>_<step>/`` holding the demo report's ``metrics.json`` (the learnability
runs' intermediate checkpoints, consolidated with ``rededit-consolidate`` and scored by
``python -m rededit.eval.demo_report``; see README round 15). One command redraws the table:

    python experiments/benchmarks/learnability/curve.py results/r15_long > results/r15_long/curve.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

OBJECT = ("add", "color", "compose", "remove", "replace", "text")
GLOBAL = ("background", "restore", "stylize", "viewpoint")


def load(folder: Path) -> dict[str, dict[int, dict]]:
    """``{arm: {step: metrics}}`` from ``folder/<arm>_<step>/metrics.json``."""
    curves: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*_*/metrics.json")):
        m = re.fullmatch(r"(.+)_(\d+)", path.parent.name)
        if m:
            curves.setdefault(m[1], {})[int(m[2])] = json.loads(path.read_text())
    return curves


def _cell(task: dict) -> str:
    ratio, psnr = task.get("error_ratio"), task.get("psnr_outside")
    if ratio is None:
        return "n/a"
    return f"{ratio:.2f}" + (f" / {psnr:.0f}" if psnr is not None else "")


def render(curves: dict[str, dict[int, dict]]) -> str:
    tasks = (*OBJECT, *GLOBAL)
    lines = []
    for arm, by_step in curves.items():
        lines += [
            f"### {arm}",
            "",
            "| steps | " + " | ".join(tasks) + " | colour follows text | goal tasks (object) |",
            "|---:|" + "---:|" * len(tasks) + "---:|---:|",
        ]
        for step, metrics in sorted(by_step.items()):
            per = metrics["tasks"]
            goal = metrics["goal"]
            tf = goal.get("text_following_success")
            lines.append(
                f"| {step} | "
                + " | ".join(_cell(per.get(t, {})) for t in tasks)
                + f" | {'n/a' if tf is None else f'{tf:.2f}'} | {goal['passed']} ({goal['object_tasks_passed']}) |"
            )
        lines.append("")
    lines.append("Cells: edit-region error ratio to the identity baseline / PSNR outside the edit (dB).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    sys.stdout.write(render(load(args.folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
