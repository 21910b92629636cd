"""Per-sample metrics of an edit against its ground truth and edit mask, and their per-task aggregation.

The issue's quality bar for the demo editor (held-out bench split, every edit task):

* **edit-region error** ``E = mean_{mask} |pred − gt|`` (L1 inside the edit region), compared with the
  **identity baseline** ``E_id = mean_{mask} |source − gt|`` (return Picture 1 unchanged); goal
  ``E / E_id ≤ 0.5``;
* **PSNR outside the edit region** between ``pred`` and ``gt``; goal ``≥ 25 dB``.

plus the MagicBrush / Emu Edit pixel metrics over the whole image (``l1`` = mean absolute difference,
``l2`` = mean squared difference), full-image PSNR and SSIM.

:func:`reference_metrics` is the one per-edit computation behind every report that scores edits against a
ground truth (``rededit-eval`` through :func:`rededit.eval.harness.score_one`, the demo report, the training
sample grids), so the same edit gets the same numbers everywhere.

Conventions: inputs are ``[B, 3, H, W]`` in [-1, 1] (the VAE range); every metric is computed on images
mapped to [0, 1] (the MagicBrush/Emu Edit protocol), so PSNR uses ``data_range = 1`` (equivalently data
range 2 on [-1, 1]) and the L1 numbers are half of what [-1, 1] would give (ratios are unaffected). Masks are
``[B, 1, H, W]`` in {0, 1} (1 = edited), broadcast over channels.

Undefined values are NaN in tensors and ``None`` in aggregated dicts: the edit-region error of a sample with
an empty mask, the identity baseline (and ratio) of a sample without a source of the target's shape
(text-to-image), and PSNR outside the region of a sample whose mask covers the whole image (global edits
such as stylize/restore have nothing outside). PSNR is capped at :data:`PSNR_CAP` dB (identical images
would give +inf, which no mean survives).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP = 100.0
_MSE_FLOOR = 10 ** (-PSNR_CAP / 10)  # PSNR = 10·log10(1 / MSE) ≤ PSNR_CAP on [0, 1] images

# Metric keys in the order reports list them.
METRIC_KEYS = (
    "edit_region_error",
    "identity_error",
    "error_ratio",
    "psnr_outside",
    "identity_psnr_outside",
    "psnr",
    "l1",
    "l2",
)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] in float64 (clamped: decoded images may overshoot a little)."""
    return ((x.detach().double() + 1) / 2).clamp(0, 1)


def _check(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None) -> None:
    if pred.ndim != 4 or pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must both be [B, C, H, W], got {tuple(pred.shape)} and {tuple(gt.shape)}"
        )
    if mask is not None and (
        mask.ndim != 4
        or mask.shape[1] != 1
        or mask.shape[0] != pred.shape[0]
        or mask.shape[2:] != pred.shape[2:]
    ):
        raise ValueError(
            f"mask must be [B, 1, H, W] = [{pred.shape[0]}, 1, *{tuple(pred.shape[2:])}], got {tuple(mask.shape)}"
        )


def masked_l1(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|pred − gt|`` over the pixels where ``mask = 1`` (all channels), per sample ``[B]``; NaN if empty.

    torchmetrics' L1 / MAE reduces over everything; the region average needs the per-sample pixel count of
    the mask as the denominator, so it is written here.
    """
    _check(pred, gt, mask)
    w = mask.double().expand_as(pred)
    num = ((to_unit(pred) - to_unit(gt)).abs() * w).flatten(1).sum(1)
    den = w.flatten(1).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


def masked_psnr(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, data range 1 on [0, 1] images) over the pixels where ``mask = 1``, per sample ``[B]``.

    NaN where the mask is empty; capped at :data:`PSNR_CAP`. torchmetrics' PSNR has no pixel mask (its
    ``dim`` reduces whole axes), so the masked MSE is formed here: ``10·log10(1 / MSE_mask)``.
    """
    _check(pred, gt, mask)
    w = mask.double().expand_as(pred)
    den = w.flatten(1).sum(1)
    mse = ((to_unit(pred) - to_unit(gt)).pow(2) * w).flatten(1).sum(1) / den.clamp_min(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(_MSE_FLOOR))
    return torch.where(den > 0, psnr, torch.full_like(psnr, math.nan))


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Full-image PSNR per sample ``[B]`` (torchmetrics, data range 1 on [0, 1]), capped at :data:`PSNR_CAP`."""
    _check(pred, gt, None)
    value = peak_signal_noise_ratio(
        to_unit(pred), to_unit(gt), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return value.nan_to_num(posinf=PSNR_CAP).clamp_max(PSNR_CAP)


def edit_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample metrics of a batch of edits (see the module docstring).

    Args:
        pred: edited images ``[B, 3, H, W]`` in [-1, 1].
        gt: ground-truth targets ``[B, 3, H, W]`` in [-1, 1].
        mask: edit region ``[B, 1, H, W]`` in {0, 1}; ``None`` = the whole image is the edit region.
        source: Picture 1 ``[B, 3, H, W]`` in [-1, 1] for the identity baseline; ``None`` (text-to-image, or
            a source of another shape) leaves the baseline and the ratio NaN.

    Returns:
        ``{key: [B] float64}`` for every key of :data:`METRIC_KEYS`; ``error_ratio = E / E_id`` per sample.
    """
    _check(pred, gt, mask)
    if mask is None:
        mask = torch.ones_like(pred[:, :1])
    mask = (mask > 0.5).double()
    nan = torch.full((pred.shape[0],), math.nan, dtype=torch.float64)
    diff = to_unit(pred) - to_unit(gt)
    out = {
        "edit_region_error": masked_l1(pred, gt, mask),
        "psnr_outside": masked_psnr(pred, gt, 1 - mask),
        "psnr": psnr(pred, gt),
        "l1": diff.abs().flatten(1).mean(1),
        "l2": diff.pow(2).flatten(1).mean(1),
        "identity_error": nan.clone(),
        "identity_psnr_outside": nan.clone(),
    }
    if source is not None:
        if source.shape != gt.shape:
            raise ValueError(
                f"source must have the target's shape {tuple(gt.shape)}, got {tuple(source.shape)}"
            )
        out["identity_error"] = masked_l1(source, gt, mask)
        out["identity_psnr_outside"] = masked_psnr(source, gt, 1 - mask)
    out["error_ratio"] = out["edit_region_error"] / out["identity_error"]
    return {k: out[k] for k in METRIC_KEYS}


def reference_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every reference metric of one edit: :func:`edit_metrics` (:data:`METRIC_KEYS`, NaN where undefined)
    plus ``ssim`` (torchmetrics, data range 1 on [0, 1] images).

    Args:
        pred: the edit ``[3, H, W]`` in [-1, 1], as it is saved (8-bit) when it is compared with a saved one.
        gt: the ground truth ``[3, H, W]`` in [-1, 1].
        mask: edit region ``[1, H, W]`` in {0, 1}; ``None`` = the whole image.
        source: the identity baseline's image ``[3, H, W]`` (Picture 1 at the output size) or ``None``.
    """
    m = edit_metrics(
        pred[None],
        gt[None],
        mask[None] if mask is not None else None,
        source[None] if source is not None else None,
    )
    out = {k: float(v[0]) for k, v in m.items()}
    out["ssim"] = float(
        structural_similarity_index_measure(
            to_unit(pred[None]).float(), to_unit(gt[None]).float(), data_range=1.0
        )
    )
    return out


def _finite_mean(values: list[float]) -> tuple[float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and count of every metric over rows (one per sample), skipping undefined values.

    Args:
        rows: dicts with the :data:`METRIC_KEYS` as floats (NaN/None = undefined).

    Returns:
        ``{"n": samples, key: mean or None, f"{key}_count": defined samples, ...}``. ``error_ratio`` is the
        ratio of the mean errors over samples that have both (more stable than a mean of per-sample
        ratios, where a near-zero baseline explodes); ``error_ratio_mean`` keeps the mean of ratios.
    """
    rows = list(rows)
    out: dict[str, Any] = {"n": len(rows)}
    for key in METRIC_KEYS:
        mean, count = _finite_mean([_float(r.get(key)) for r in rows])
        out[key], out[f"{key}_count"] = mean, count
    pairs = [(_float(r.get("edit_region_error")), _float(r.get("identity_error"))) for r in rows]
    pairs = [
        (e, b) for e, b in pairs if e is not None and b is not None and math.isfinite(e) and math.isfinite(b)
    ]
    out["error_ratio_mean"] = out["error_ratio"]
    base = sum(b for _, b in pairs)
    out["error_ratio"] = sum(e for e, _ in pairs) / base if pairs and base > 0 else None
    out["error_ratio_count"] = len(pairs)
    return out


def aggregate_by_task(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`aggregate` per ``row["task"]`` (tasks sorted by name)."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[str(r["task"])].append(r)
    return {task: aggregate(groups[task]) for task in sorted(groups)}


def _float(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
