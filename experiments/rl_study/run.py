"""RL-stage study (issue 6, report §3.6): standard Diffusion-DPO vs PSR (ω > 1, λ > 0), and DiffusionNFT with
the plain OCR reward vs the layout-aware OCR reward (eq. 5), on the synthetic text-edit task, 3 seeds.

    nice -n 10 python experiments/rl_study/run.py --base outputs/demo/export --corpus <manifest> \
        --out experiments/rl_study/results [--seeds 0 1 2] [--dpo-steps 100] [--nft-steps 50] [--smoke]

Steps (every artefact under --out; each step is skipped when its output exists, so the script resumes):

1. ``rededit-data make-pairs`` with the base (SFT) editor as the current model, ground-truth positives.
2. per seed, ``experiment=demo_dpo`` from the base with (ω, λ) = (1, 0) ["dpo_standard"] and (2, 0.1)
   ["dpo_psr"]; collected: the per-step ``dpo/win_diff`` and ``dpo/lose_diff`` trajectories (the §3.6.1
   "double degradation" is both rising), and the held-out success rate of the programmatic judges on the
   bench split (:func:`held_out`).
3. per seed, ``experiment=demo_nft`` from the base with ``reward=ocr_plain`` and ``reward=ocr_layout``;
   collected: training reward, ``reward/ocr_text_area`` (text-area hack monitor) at the first and last
   step, and on the bench text rows the plain OCR text score, the layout-aware reward and the text area.
4. ``results.json``, ``results.md`` (mean ± std over seeds) and ``plot.png`` (``plot.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

DPO_VARIANTS = {
    "dpo_standard": ("stage.omega=1.0", "stage.lam=0.0"),
    "dpo_psr": ("stage.omega=2.0", "stage.lam=0.1"),
}
NFT_VARIANTS = {"nft_ocr_plain": ("reward=ocr_plain",), "nft_ocr_layout": ("reward=ocr_layout",)}


def sh(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(["nice", "-n", "10", *cmd], check=True, cwd=REPO, env=env)


def metric_series(run_dir: Path, key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return out
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get(key):
                out[int(row["step"]) + 1] = float(row[key])
    return out


COMMON: list[str] = []  # --override values, added to every training run


def train(
    run_dir: Path, experiment: str, base: Path, manifest: Path, seed: int, steps: int, extra: tuple[str, ...]
) -> None:
    if (run_dir / "export").is_dir():
        return
    sh(
        [
            PY, "-m", "rededit.cli.train", f"experiment={experiment}", f"stage.init_from={base}",
            f"data.manifest={manifest}", f"seed={seed}", f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1", f"paths.output_dir={run_dir}", f"export_dir={run_dir}/export", *COMMON, *extra,
        ]
    )  # fmt: skip
    if not metric_series(run_dir, "train/loss_step"):
        raise RuntimeError(
            f"{run_dir}: the run logged no training step (too few rows for the bucket sampler?)"
        )


def held_out(export: Path, corpus: Path, *, text_only: bool, steps: int, limit: int) -> dict[str, float]:
    """Bench-split scores of an editor: programmatic success (all tasks) or OCR scores (text rows)."""
    import torch

    from rededit.data.datamodule import select_split
    from rededit.data.manifest import Manifest
    from rededit.datagen.mining import reward_batch
    from rededit.datagen.preference import sample_edits
    from rededit.inference.editor import load_editor
    from rededit.scoring.judges.programmatic import JUDGES, bench_sample, judge

    editor = load_editor(export)
    bench = select_split(Manifest.open(corpus), "bench")
    rows = [bench.row(i) for i in range(len(bench))]
    rows = [r for r in rows if not text_only or r["task"] == "text"][:limit]
    if not text_only:
        passed = []
        for r in rows:
            if r["task"] not in JUDGES:
                continue
            x, size = sample_edits(editor, r, bench.root, 1, seed=1234, steps=steps)
            res = judge(x[0], bench_sample(r, bench.root, size=size))
            if res.defined:
                passed.append(float(res.passed))
        return {"success": float(np.mean(passed)) if passed else math.nan, "n": len(passed)}
    from rededit.rewards import OCRReward

    layout, plain = OCRReward(w_layout=1.0), OCRReward(w_layout=0.0)
    vals: dict[str, list[float]] = {"ocr_text": [], "ocr_layout_reward": [], "text_area": []}
    for r in rows:
        x, size = sample_edits(editor, r, bench.root, 1, seed=1234, steps=steps)
        img = ((x.clamp(-1, 1) + 1) / 2).float()
        batch = reward_batch(r, bench.root, size, 1)
        with torch.no_grad():
            lo, pl = layout(img, batch), plain(img, batch)
        vals["ocr_text"].append(float(pl["ocr_text"][0]))
        vals["ocr_layout_reward"].append(float(lo["reward"][0]))
        vals["text_area"].append(float(lo["ocr_text_area"][0]))
    return {k: float(np.nanmean(v)) if v else math.nan for k, v in vals.items()} | {"n": len(rows)}


def stats(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return "n/a" if v.size == 0 else f"{v.mean():.4f} ± {v.std():.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, type=Path, help="SFT editor (export or run folder)")
    p.add_argument("--corpus", required=True, type=Path, help="synthetic corpus manifest (train + bench)")
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "rl_study" / "results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dpo-steps", type=int, default=100)
    p.add_argument("--nft-steps", type=int, default=50)
    p.add_argument("--pair-rows", type=int, default=200, help="rows to pair (make-pairs --limit)")
    p.add_argument("--eval-rows", type=int, default=40)
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="2 steps, 40 pair rows, 4 eval rows, one seed")
    p.add_argument("--override", action="append", default=[], help="Hydra override for every training run")
    a = p.parse_args(argv)
    COMMON[:] = a.override
    if a.smoke:
        a.seeds, a.dpo_steps, a.nft_steps, a.pair_rows, a.eval_rows = a.seeds[:1], 2, 2, 40, 4
    a.out.mkdir(parents=True, exist_ok=True)
    pairs = a.out / "pairs"
    if not (pairs / "manifest.parquet").is_file():
        sh([PY, "-m", "rededit.cli.data", "make-pairs", str(a.corpus), "--out", str(pairs), "--negative-editor",
            str(a.base), "--limit", str(a.pair_rows), "--candidates", "4"])  # fmt: skip
    results: dict[str, dict] = {}
    for seed in a.seeds:
        for name, extra in DPO_VARIANTS.items():
            run = a.out / f"{name}_s{seed}"
            train(run, "demo_dpo", a.base, pairs / "manifest.parquet", seed, a.dpo_steps, extra)
            res = results.setdefault(
                name, {"win_diff": [], "lose_diff": [], "success": [], "both_rising": []}
            )
            win = metric_series(run, "dpo/win_diff_step")
            lose = metric_series(run, "dpo/lose_diff_step")
            res["win_diff"].append(win)
            res["lose_diff"].append(lose)
            last = max(win) if win else None
            res["both_rising"].append(bool(last and win[last] > 0 and lose[last] > 0))
            res["success"].append(
                held_out(run / "export", a.corpus, text_only=False, steps=a.sample_steps, limit=a.eval_rows)[
                    "success"
                ]
            )
        for name, extra in NFT_VARIANTS.items():
            run = a.out / f"{name}_s{seed}"
            train(run, "demo_nft", a.base, a.corpus, seed, a.nft_steps, extra)
            res = results.setdefault(
                name,
                {"reward_first": [], "reward_last": [], "area_first": [], "area_last": [], "held_out": []},
            )
            reward = metric_series(run, "reward/mean_step")
            area = metric_series(run, "reward/ocr_text_area_step")
            for key, series in (("reward", reward), ("area", area)):
                res[f"{key}_first"].append(series[min(series)] if series else math.nan)
                res[f"{key}_last"].append(series[max(series)] if series else math.nan)
            res["held_out"].append(
                held_out(run / "export", a.corpus, text_only=True, steps=a.sample_steps, limit=a.eval_rows)
            )
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plot import plot  # plot.py beside this script (it also redraws alone from a results.json)

    plot(results, a.out / "plot.png")
    lines = ["| variant | metric | mean ± std over seeds |", "|---|---|---|"]
    for name in DPO_VARIANTS:
        r = results[name]

        def final(key: str, r: dict = r) -> list[float]:
            return [s[max(s)] if s else math.nan for s in r[key]]

        lines += [f"| {name} | final win diff | {stats(final('win_diff'))} |",
                  f"| {name} | final lose diff | {stats(final('lose_diff'))} |",
                  f"| {name} | both diffs > 0 at the end (runs) | {sum(r['both_rising'])}/{len(r['both_rising'])} |",
                  f"| {name} | held-out judge success | {stats(r['success'])} |"]  # fmt: skip
    for name in NFT_VARIANTS:
        r = results[name]
        lines += [f"| {name} | train reward first → last | {stats(r['reward_first'])} → {stats(r['reward_last'])} |",
                  f"| {name} | text-area monitor first → last | {stats(r['area_first'])} → {stats(r['area_last'])} |"]  # fmt: skip
        for key in ("ocr_text", "ocr_layout_reward", "text_area"):
            lines.append(f"| {name} | held-out {key} | {stats([h[key] for h in r['held_out']])} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
