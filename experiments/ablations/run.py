"""Run one of the report's ablations end to end on the CPU recipe and write its table (issue 9).

    python experiments/ablations/run.py <study> [--n 1500] [--steps 300] [--seeds 0,1,2] [-- <extra overrides>]

1. the study corpus (``outputs/ablations/corpus``: ``rededit-data synth`` + ``encode-text``), built once;
2. the multirun ``rededit-train +ablation=<study>`` (conf/ablation/<study>.yaml: the factor × seeds);
3. the collector (``collect.py``): loss statistics + held-out ``rededit-eval`` per job → ``table.md``,
   ``plot.png``, ``results.json`` in ``experiments/ablations/<study>/``.

Extra Hydra overrides after ``--`` go to every job (e.g. ``trainer.max_steps=600`` or a GPU recipe).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CORPUS = REPO / "outputs" / "ablations" / "corpus"
CACHE = REPO / "outputs" / "ablations" / "text_cache"
PORTRAITS = REPO / "outputs" / "ablations" / "portraits"


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def prepare(n: int) -> None:
    if not (CORPUS / "manifest.parquet").exists():
        sh(
            str(BIN / "rededit-data"),
            "synth",
            "--out",
            str(CORPUS),
            "--n",
            str(n),
            "--seed",
            "0",
            "--min-side",
            "64",
            "--max-side",
            "128",
        )
    if not (CACHE / "index.json").exists():
        sh(
            str(BIN / "rededit-data"),
            "encode-text",
            "--manifest",
            str(CORPUS / "manifest.parquet"),
            "--cache",
            str(CACHE),
        )


def prepare_portraits(n: int) -> None:
    """The consistency study's corpus: real portraits, restoration edits (blur + colour cast), YuNet
    landmarks, 48 rows held out."""
    if not (PORTRAITS / "manifest.parquet").exists():
        sys.path.insert(0, str(REPO / "src"))
        from rededit.datagen.synth.portraits import make_portrait_corpus

        print(f"+ make_portrait_corpus({PORTRAITS}, rows={n})", flush=True)
        _, report = make_portrait_corpus(PORTRAITS, rows=n, seed=0, side=128, bench_n=48)
        print(report, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("--n", type=int, default=1500, help="training samples of the study corpus")
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the recipe's)")
    p.add_argument("--seeds", default=None, help="e.g. 0,1,2 (default: the study file's)")
    p.add_argument("--max-per-task", type=int, default=4)
    p.add_argument("--skip-train", action="store_true", help="collect the latest sweep only")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    if args.study == "consistency":  # the one study that needs faces (conf/ablation/consistency.yaml)
        prepare_portraits(min(args.n, 600))
    else:
        prepare(args.n)
    if not args.skip_train:
        overrides = [f"+ablation={args.study}", "hydra/job_logging=disabled", "~callbacks.progress", *extra]
        if args.steps:
            overrides.append(f"trainer.max_steps={args.steps}")
        if args.seeds:
            overrides.append(f"seed={args.seeds}")
        sh(str(BIN / "rededit-train"), *overrides)
    sh(
        sys.executable,
        str(Path(__file__).with_name("collect.py")),
        args.study,
        "--max-per-task",
        str(args.max_per_task),
    )
    print(f"{args.study}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
