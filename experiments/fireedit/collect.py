"""Table of the FireEdit options study (issue 10) from its sweep: loss statistics + held-out rededit-eval.

    python experiments/fireedit/collect.py [--sweep-dir DIR] [--max-per-task N] [--no-eval]

Reuses the ablation collector (``experiments/ablations/collect.py``: job discovery, loss statistics, the
cached ``rededit-eval`` of each job's export, mean ± std over seeds, table and plot). The metrics come from
the study file (``conf/ablation/fireedit.yaml``, ``ablation.metrics``): the MagicBrush / Emu Edit figures
that need no learned weights — L1 and L2 to the ground-truth edit, PSNR outside the edit region
(preservation) — plus the synthetic bench's programmatic success and the edit-region error relative to the
identity baseline. Outputs: ``experiments/fireedit/results.json``, ``table.md``, ``plot.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STUDY = "fireedit"


def ablation_collector():
    """``experiments/ablations/collect.py`` as a module."""
    spec = importlib.util.spec_from_file_location(
        "ablation_collect", REPO / "experiments" / "ablations" / "collect.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep-dir", type=Path, default=None, help="default: the study's latest sweep")
    p.add_argument("--max-per-task", type=int, default=8)
    p.add_argument("--no-eval", action="store_true", help="loss statistics only")
    p.add_argument("--out", type=Path, default=HERE, help="folder of results.json / table.md / plot.png")
    args = p.parse_args(argv)
    forward = [STUDY, "--max-per-task", str(args.max_per_task), "--out", str(args.out)]
    forward += ["--sweep-dir", str(args.sweep_dir)] if args.sweep_dir else []
    forward += ["--no-eval"] if args.no_eval else []
    return ablation_collector().main(forward)


if __name__ == "__main__":
    sys.exit(main())
