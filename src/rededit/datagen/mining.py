"""Semi-hard sample mining for DiffusionNFT (report §3.6.2) — ``rededit-data mine-hard``.

The report estimates, with the preceding (DPO) checkpoint, each instruction's reward distribution from a
set of candidate edits and trains NFT on the "competent yet high-variance" rows: a satisfactory mean
reward but an unstable lower tail. Per row, from K edits of a previous checkpoint scored by a
:class:`~rededit.rewards.base.Reward`::

    μ = mean(R_1..K)        low = quantile_q(R_1..K)        spread = μ − low

A row is kept when ``min_mean ≤ μ ≤ max_mean`` (competent, not trivial) and ``spread ≥ min_spread``
(unstable lower bound). Rows whose reward is NaN for every sample (the reward does not apply) are dropped.
Output under ``out``: ``scores.jsonl`` (per row μ, low, std and the K rewards: the resume log) and
``manifest.parquet`` (kept rows, absolute URIs, plus ``mined_reward_mean`` / ``mined_reward_low`` /
``mined_reward_std``), written atomically. The NFT stage reads it as its ``data.manifest`` (that is the
"manifest filter").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rededit.data.datamodule import select_split
from rededit.data.manifest import Manifest
from rededit.data.schema import manifest_schema
from rededit.datagen.preference import (
    append_decision,
    read_decisions,
    rebased_row,
    sample_edits,
    write_manifest,
)
from rededit.scoring.judges.programmatic import bench_sample
from rededit.utils.logging import get_logger
from rededit.utils.progress import track

log = get_logger(__name__)


def reward_batch(row: Mapping[str, Any], root: str | Path, size: tuple[int, int], k: int) -> dict[str, Any]:
    """The batch a :class:`~rededit.rewards.base.Reward` sees for K edits of one row (dataset conventions:
    images in [-1, 1] at the edit's size, Picture 1 first)."""
    s = bench_sample(row, root, size=size)
    h, w = size
    batch: dict[str, Any] = {
        "ids": [row["id"]] * k,
        "tasks": [row["task"]] * k,
        "texts": [row.get("instruction") or ""] * k,
        "ocr_target": [row.get("ocr_target")] * k,
        "target": s["target"].unsqueeze(0).repeat(k, 1, 1, 1),
        "references": [s["source"].unsqueeze(0).repeat(k, 1, 1, 1)] if s.get("source") is not None else [],
        "epoch": 0,
        "step": 0,
    }
    if s.get("edit_mask") is not None:
        batch["edit_mask"] = s["edit_mask"].unsqueeze(0).repeat(k, 1, 1, 1)
        batch["has_edit_mask"] = torch.ones(k, dtype=torch.bool)
    else:
        batch["edit_mask"] = torch.ones(k, 1, h, w)
        batch["has_edit_mask"] = torch.zeros(k, dtype=torch.bool)
    return batch


def row_stats(rewards: np.ndarray, quantile: float) -> dict[str, float]:
    """μ, lower-tail quantile and std of the finite rewards (NaN when none is finite)."""
    r = rewards[np.isfinite(rewards)]
    if r.size == 0:
        return {"mean": math.nan, "low": math.nan, "std": math.nan}
    return {"mean": float(r.mean()), "low": float(np.quantile(r, quantile)), "std": float(r.std())}


def is_semi_hard(stats: Mapping[str, float], *, min_mean: float, max_mean: float, min_spread: float) -> bool:
    """Competent (``min_mean ≤ μ ≤ max_mean``) yet unstable (``μ − low ≥ min_spread``)."""
    m, low = stats["mean"], stats["low"]
    if not (math.isfinite(m) and math.isfinite(low)):
        return False
    return min_mean <= m <= max_mean and (m - low) >= min_spread


def mine_hard(
    manifest: str | Path,
    out: str | Path,
    *,
    editor: Any,
    reward: torch.nn.Module,
    num_samples: int = 8,
    quantile: float = 0.25,
    min_mean: float = 0.5,
    max_mean: float = 0.95,
    min_spread: float = 0.1,
    split: str | None = "train",
    steps: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    passthrough_splits: tuple[str, ...] = ("bench",),
) -> dict[str, int]:
    """Score rows and keep the semi-hard ones (module docstring). Returns ``{"kept", "scored", "resumed"}``.

    Rows of ``passthrough_splits`` (the validation split) are copied unscored, so the mined manifest still
    serves the stage's ``data.val_split``.

    The per-row scores are logged before any selection, so thresholds can be changed and the command re-run
    without generating again.
    """
    if num_samples < 2:
        raise ValueError("mine-hard needs at least 2 samples per row to estimate a spread")
    if not 0.0 <= quantile <= 0.5:
        raise ValueError(f"quantile must be in [0, 0.5] (a lower tail), got {quantile}")
    full = Manifest.open(manifest, validate=True)
    src = select_split(full, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "scores.jsonl"
    done = read_decisions(log_path)
    counts = {"kept": 0, "scored": 0, "resumed": 0}
    n = len(src) if limit is None else min(len(src), int(limit))
    reward.eval()
    for i in track(range(n), desc="mine-hard", unit="rows"):
        row = src.row(i)
        if row["id"] in done:
            counts["resumed"] += 1
            continue
        edits, size = sample_edits(editor, row, src.root, num_samples, seed=seed, steps=steps)
        images01 = ((edits.clamp(-1, 1) + 1) / 2).float()
        with torch.no_grad():
            r = reward(images01, reward_batch(row, src.root, size, num_samples))["reward"]
        rewards = r.detach().float().cpu().numpy()
        rec = {
            "id": row["id"],
            **row_stats(rewards, quantile),
            "rewards": [None if not np.isfinite(x) else float(x) for x in rewards],
        }
        append_decision(log_path, rec)
        done[row["id"]] = rec
        counts["scored"] += 1
    kept = []
    for i in range(len(src)):
        row = src.row(i)
        rec = done.get(row["id"])
        if rec is None:
            continue
        stats = {k: (math.nan if rec[k] is None else rec[k]) for k in ("mean", "low", "std")}
        if is_semi_hard(stats, min_mean=min_mean, max_mean=max_mean, min_spread=min_spread):
            new = rebased_row(row, src.root)
            new.update(
                mined_reward_mean=stats["mean"], mined_reward_low=stats["low"], mined_reward_std=stats["std"]
            )
            kept.append(new)
    counts["kept"] = len(kept)
    if full.has("split") and passthrough_splits:
        for i in range(len(full)):
            row = full.row(i)
            if row.get("split") in passthrough_splits and row.get("split") != split:
                kept.append(rebased_row(row, full.root))
    if not counts["kept"]:
        raise ValueError(
            f"mine-hard: no row is semi-hard under min_mean={min_mean}, max_mean={max_mean}, "
            f"min_spread={min_spread}; per-row scores are in {log_path}"
        )

    write_manifest(
        kept,
        manifest_schema(src.columns),
        {f"mined_reward_{k}": pa.float32() for k in ("mean", "low", "std")},
        out / "manifest.parquet",
    )
    log.info("mine-hard: %s -> %s", counts, out / "manifest.parquet")
    return counts
