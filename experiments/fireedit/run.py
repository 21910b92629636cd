"""Run the FireEdit options study end to end on the CPU recipe (issue 10).

    python experiments/fireedit/run.py [--steps 300] [--seeds 0,1,2] [--max-per-task 8] [-- <extra overrides>]

1. the ablation corpus and text cache (``outputs/ablations/``), built once by the ablation runner's
   ``prepare``;
2. the multirun ``rededit-train +ablation=fireedit`` (conf/ablation/fireedit.yaml: baseline / region_tokens /
   tati / hvca × seeds), jobs under ``outputs/ablations/fireedit/<time>/``;
3. this study's collector (``collect.py``) → ``experiments/fireedit/table.md`` (+ ``results.json``,
   ``plot.png``).

``python experiments/ablations/run.py fireedit`` runs the same sweep and collector (the metrics come from the
study file's ``ablation.metrics``), with the table under ``experiments/ablations/fireedit/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _ablation_runner():
    spec = importlib.util.spec_from_file_location(
        "ablation_run", REPO / "experiments" / "ablations" / "run.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--n", type=int, default=1500, help="training samples of the ablation corpus (if not built)"
    )
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the recipe's)")
    p.add_argument("--seeds", default=None, help="e.g. 0,1,2 (default: the study file's)")
    p.add_argument("--max-per-task", type=int, default=8)
    p.add_argument("--skip-train", action="store_true", help="collect the latest sweep only")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runner = _ablation_runner()
    t0 = time.perf_counter()
    runner.prepare(args.n)
    if not args.skip_train:
        overrides = ["+ablation=fireedit", "hydra/job_logging=disabled", *extra]
        if args.steps:
            overrides.append(f"trainer.max_steps={args.steps}")
        if args.seeds:
            overrides.append(f"seed={args.seeds}")
        runner.sh(str(runner.BIN / "rededit-train"), *overrides)
    runner.sh(sys.executable, str(HERE / "collect.py"), "--max-per-task", str(args.max_per_task))
    print(f"fireedit: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
