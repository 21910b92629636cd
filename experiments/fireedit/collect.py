"""Table of the FireEdit options study (issue 10) from its sweep: loss statistics + held-out rededit-eval.

    python experiments/fireedit/collect.py [--sweep-dir DIR] [--max-per-task N] [--no-eval]

Reuses the ablation collector (``experiments/ablations/collect.py``: job discovery, loss statistics, the
cached ``rededit-eval`` of each job's export, mean ± std over seeds, table and plot) with this study's
metrics: the MagicBrush / Emu Edit figures that need no learned weights — L1 and L2 to the ground-truth
edit, PSNR outside the edit region (preservation) — plus the synthetic bench's programmatic success and
the edit-region error relative to the identity baseline. Outputs: ``experiments/fireedit/results.json``,
``table.md``, ``plot.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STUDY = "fireedit"
METRICS = (
    ("l1", "L1 ↓", ".4f"),
    ("l2", "L2 ↓", ".4f"),
    ("psnr_outside", "PSNR outside dB ↑", ".2f"),
    ("success", "success ↑", ".3f"),
    ("error_ratio", "edit err / identity ↓", ".3f"),
)


def ablation_collector():
    """``experiments/ablations/collect.py`` as a module, with this study's metric list."""
    spec = importlib.util.spec_from_file_location(
        "ablation_collect", REPO / "experiments" / "ablations" / "collect.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.METRICS = METRICS  # evaluate_job / collect / render_table / plot read the module global
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep-dir", type=Path, default=None, help="default: the study's latest sweep")
    p.add_argument("--max-per-task", type=int, default=8)
    p.add_argument("--no-eval", action="store_true", help="loss statistics only")
    p.add_argument("--out", type=Path, default=HERE, help="folder of results.json / table.md / plot.png")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "src"))
    from rededit.utils.io import atomic_write_text

    col = ablation_collector()
    sweep = args.sweep_dir or col.latest_sweep(STUDY)
    result = col.collect(STUDY, sweep, args.max_per_task, not args.no_eval)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=1, default=str))
    table = col.render_table(result)
    atomic_write_text(args.out / "table.md", table)
    col.plot(result, args.out / "plot.png")
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
