"""Training-time validation: edit a fixed set of held-out samples every N steps, save a grid
(source | instruction | edit | truth) and log per-category success of the programmatic judges and the
preservation numbers (``val/success_<category>``, ``val/edit_ratio``, ``val/psnr_outside``).

Uses the EMA weights when the EMA callback is active (swapped in and out around the sampling, never
across a checkpoint write), a fixed seed, and the same batching/metrics as the demo report, so the
grids of one run are comparable step to step. Each grid is a PNG under ``samples/`` and, when those
loggers are on, an image (``samples/grid``) in TensorBoard and wandb. Every rank runs the sampler (under
FSDP2/HSDP, FSDP1 or ZeRO-3 each backbone forward is a collective: all ranks must take part, and under DDP
the other ranks would only wait at the next collective anyway); rank 0 alone scores, writes the files
(atomically) and logs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import lightning as L

from rededit.callbacks.ema import EMA
from rededit.callbacks.loggers import log_image
from rededit.eval.demo_report import load_samples, render_grid, run_edits, select_rows
from rededit.scoring.categories import load_category_map
from rededit.scoring.judges.programmatic import bench_sample, judge
from rededit.utils.io import atomic_path
from rededit.utils.logging import get_logger

log = get_logger(__name__)


class SampleImages(L.Callback):
    """Args:
    every_n_steps: optimizer steps between grids (and one at the end of fit).
    split: manifest split to draw samples from (the datamodule's manifest).
    per_task: samples of each task.
    steps / cfg_scale / seed: sampler settings (None: the stage's).
    out_dir: folder of the PNGs (default ``<trainer.default_root_dir>/samples``).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        split: str = "bench",
        per_task: int = 1,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
        out_dir: str | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.every_n_steps = int(every_n_steps)
        self.split, self.per_task = split, int(per_task)
        self.steps, self.cfg_scale, self.seed = steps, cfg_scale, int(seed)
        self.out_dir = out_dir
        self._samples: list[dict[str, Any]] | None = None
        self._rows: list[int] = []
        self._last = -1
        self.history: list[dict[str, float]] = []

    def _load(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        dm = trainer.datamodule
        manifest, rs = dm.manifest, dm.resset
        self._rows = select_rows(manifest, self.split, self.per_task)
        return load_samples(manifest, self._rows, lambda hw: rs.resolutions[rs.assign(hw)])

    def _scores(self, trainer: L.Trainer) -> dict[str, float]:
        """Per-category judge success and mean preservation of the samples' current edits."""
        import math

        manifest = trainer.datamodule.manifest
        categories = load_category_map(unknown="other")
        per_cat: dict[str, list[float]] = {}
        ratios, psnrs = [], []
        for row, s in zip(self._rows, self._samples):
            sample = bench_sample(manifest.row(row), manifest.root, size=tuple(s["target"].shape[-2:]))
            result = judge(s["pred"], sample)
            cat = categories.category_of(s["task"]) or s["task"]
            if result.defined:
                per_cat.setdefault(cat, []).append(float(result.passed))
            m = s.get("metrics", {})
            if m.get("error_ratio") is not None and math.isfinite(m["error_ratio"]):
                ratios.append(m["error_ratio"])
            if m.get("psnr_outside") is not None and math.isfinite(m["psnr_outside"]):
                psnrs.append(m["psnr_outside"])
        scores = {f"val/success_{c}": sum(v) / len(v) for c, v in sorted(per_cat.items())}
        passed = [x for v in per_cat.values() for x in v]
        if passed:
            scores["val/success"] = sum(passed) / len(passed)
        if ratios:
            scores["val/edit_ratio"] = sum(ratios) / len(ratios)
        if psnrs:
            scores["val/psnr_outside"] = sum(psnrs) / len(psnrs)
        return scores

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, log_metrics: bool = False) -> None:
        if trainer.global_step == self._last:
            return
        self._last = trainer.global_step
        if self._samples is None:
            self._samples = self._load(trainer)
        ema = next((c for c in trainer.callbacks if isinstance(c, EMA) and c.shadow), None)
        ctx = ema.averaged(pl_module) if ema is not None else contextlib.nullcontext()
        with ctx:  # on every rank: the (sharded) backbone's forwards are collectives
            run_edits(pl_module, self._samples, steps=self.steps, cfg=self.cfg_scale, seed=self.seed)
        if trainer.global_rank != 0:
            return
        out = (
            Path(self.out_dir or Path(trainer.default_root_dir) / "samples")
            / f"step{trainer.global_step:07d}.png"
        )
        grid = render_grid(self._samples)
        with atomic_path(out) as tmp:
            grid.save(tmp, format="PNG")
        # TensorBoard / wandb, when those loggers are on (the CSV logger cannot show images).
        log_image(trainer, "samples/grid", grid, trainer.global_step, caption=f"step {trainer.global_step}")
        scores = self._scores(trainer)
        self.history.append({"step": float(trainer.global_step), **scores})
        with atomic_path(out.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(self.history[-1], indent=2))
        if log_metrics:  # Lightning allows logging from batch hooks, not from on_train_end
            for key, value in scores.items():
                pl_module.log(key, value, on_step=True, batch_size=len(self._samples))
        log.info("sample grid (%s weights) written to %s: %s", "EMA" if ema else "raw", out, scores)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, pl_module, log_metrics=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)
