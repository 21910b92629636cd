"""Photometric & statistical filtering (report §2.2.2).

Five descriptors per target image (analysed at ``max_side`` px, luma Y = BT.601 in 0..255):

* ``brightness`` — mean Y / 255: under- and over-exposure.
* ``saturation`` — mean HSV saturation ``(max - min) / max`` of RGB: abnormal colour responses.
* ``entropy`` — mean over R, G, B of the Shannon entropy (bits, 256 bins): flat / uniform images.
* ``texture`` — log(1 + mean gradient magnitude |∇Y|): irregular high-frequency patterns (noise, heavy
  compression) on the high side.
* ``sharpness`` — log(1 + Var(∇²Y)) with the 4-neighbour Laplacian: motion blur / defocus on the low side.

:class:`PhotometricFilter` is a global stage: ``fit`` computes the descriptors of every kept row and sets
a keep range per descriptor from the corpus' empirical distribution — ``method="mad"``:
``median ± k · 1.4826 · MAD`` (robust to the outliers it is meant to find) or ``method="quantile"``:
``[q_low, q_high]`` — on the configured ``sides`` only (a low-entropy image is bad, a high-entropy one is
not). ``fixed`` ranges override fitted ones. The ranges are the stage state (``state.json``); ``process``
drops rows outside with ``"photometric:<descriptor>_low|high"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from rededit.datagen.engine.filters.common import PartitionMemo, load_rgb, map_kept, to_gray
from rededit.datagen.engine.stage import GlobalEngineStage, StageContext, apply_drops, kept_mask, set_column

DESCRIPTORS = ("brightness", "saturation", "entropy", "texture", "sharpness")
DEFAULT_SIDES = {
    "brightness": "both",
    "saturation": "high",
    "entropy": "low",
    "texture": "high",
    "sharpness": "low",
}


def photometric_descriptors(rgb: np.ndarray) -> dict[str, float]:
    """The five descriptors of one ``[H, W, 3]`` uint8 image (see the module docstring)."""
    rgb = rgb[..., :3]
    y = to_gray(rgb)
    f = rgb.astype(np.float32)
    mx, mn = f.max(axis=2), f.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    ent = []
    for c in range(3):
        p = np.bincount(rgb[..., c].reshape(-1), minlength=256).astype(np.float64)
        p = p[p > 0] / p.sum()
        ent.append(float(-(p * np.log2(p)).sum()))
    gx = np.diff(y, axis=1)[:-1, :]
    gy = np.diff(y, axis=0)[:, :-1]
    grad = np.sqrt(gx * gx + gy * gy)
    lap = y[1:-1, :-2] + y[1:-1, 2:] + y[:-2, 1:-1] + y[2:, 1:-1] - 4.0 * y[1:-1, 1:-1]
    return {
        "brightness": float(y.mean() / 255.0),
        "saturation": float(sat.mean()),
        "entropy": float(np.mean(ent)),
        "texture": float(np.log1p(grad.mean())) if grad.size else 0.0,
        "sharpness": float(np.log1p(lap.var())) if lap.size else 0.0,
    }


class PhotometricFilter(GlobalEngineStage):
    """Drop statistical outliers of the photometric descriptors (report §2.2.2).

    Args:
        method: ``mad`` (``median ± k·1.4826·MAD``) or ``quantile`` (``[q_low, q_high]``).
        k: MAD multiplier.
        q_low, q_high: quantiles for ``method="quantile"``.
        sides: descriptor → ``low`` | ``high`` | ``both`` | ``none`` (which tail is filtered).
        fixed: descriptor → ``[lo, hi]`` (null for an open end) used instead of the fitted range.
        min_scale: floor on the MAD scale per descriptor, so a very homogeneous corpus does not drop
            normal variation (in the descriptor's units).
        max_side: analysis size.
    """

    name = "photometric"
    version = "1"

    def __init__(
        self,
        method: str = "mad",
        k: float = 3.5,
        q_low: float = 0.01,
        q_high: float = 0.99,
        sides: Mapping[str, str] | None = None,
        fixed: Mapping[str, Any] | None = None,
        min_scale: float = 0.02,
        max_side: int = 512,
        name: str = "photometric",
    ):
        if method not in ("mad", "quantile"):
            raise ValueError(f"{name}: method must be 'mad' or 'quantile', got {method!r}")
        self.name = name
        self.method = method
        self.k = float(k)
        self.q_low, self.q_high = float(q_low), float(q_high)
        self.sides = {**DEFAULT_SIDES, **dict(sides or {})}
        bad = {
            d: s
            for d, s in self.sides.items()
            if d not in DESCRIPTORS or s not in ("low", "high", "both", "none")
        }
        if bad:
            raise ValueError(f"{name}: bad sides {bad}; descriptors {DESCRIPTORS}, sides low|high|both|none")
        self.fixed = {d: list(v) for d, v in dict(fixed or {}).items()}
        self.min_scale = float(min_scale)
        self.max_side = int(max_side)
        self._ranges: dict[str, list[float | None]] = {}
        self._memo = PartitionMemo()

    def _describe(self, table: pa.Table, ctx: StageContext) -> list[dict[str, float] | None]:
        """Descriptors of the kept rows (None elsewhere), memoised so fit and process decode each image once."""

        def compute():
            res, _ = map_kept(
                table, lambda row: photometric_descriptors(load_rgb(row["target"], ctx.root, self.max_side))
            )
            return res

        return self._memo.get(table, compute)

    def fit(self, partitions: Iterable[pa.Table], ctx: StageContext) -> None:
        values: dict[str, list[float]] = {d: [] for d in DESCRIPTORS}
        for table in partitions:
            for desc in self._describe(table, ctx):
                if desc is not None:
                    for d in DESCRIPTORS:
                        values[d].append(desc[d])
        self._ranges = {}
        for d in DESCRIPTORS:
            side = self.sides[d]
            v = np.asarray(values[d], np.float64)
            if d in self.fixed:
                lo, hi = self.fixed[d]
            elif side == "none" or v.size == 0:
                lo = hi = None
            elif self.method == "mad":
                med = float(np.median(v))
                scale = max(1.4826 * float(np.median(np.abs(v - med))), self.min_scale)
                lo, hi = med - self.k * scale, med + self.k * scale
            else:
                lo, hi = float(np.quantile(v, self.q_low)), float(np.quantile(v, self.q_high))
            if d not in self.fixed:
                lo = lo if side in ("low", "both") else None
                hi = hi if side in ("high", "both") else None
            self._ranges[d] = [lo, hi]

    @property
    def ranges(self) -> dict[str, list[float | None]]:
        return dict(self._ranges)

    def state_dict(self) -> dict[str, Any]:
        return {"ranges": self._ranges}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ranges = {d: list(v) for d, v in state["ranges"].items()}

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        if not self._ranges:
            raise RuntimeError(f"{self.name}: process() before fit() (run it through the PipelineRunner)")
        descs = self._describe(table, ctx)
        keep = kept_mask(table)
        reasons: list[str | None] = []
        for desc, k in zip(descs, keep):
            if not k:
                reasons.append(None)
            elif desc is None:
                reasons.append(self.drop("unreadable"))
            else:
                reasons.append(self._why(desc))
        for d in DESCRIPTORS:
            col = [None if x is None else x[d] for x in descs]
            table = set_column(table, f"{self.name}_{d}", pa.array(col, pa.float32()))
        return apply_drops(table, reasons)

    def _why(self, desc: dict[str, float]) -> str | None:
        for d in DESCRIPTORS:
            lo, hi = self._ranges.get(d, [None, None])
            if lo is not None and desc[d] < lo:
                return self.drop(f"{d}_low")
            if hi is not None and desc[d] > hi:
                return self.drop(f"{d}_high")
        return None
