"""Closed forms of the edit metrics (rededit.scoring.edit_metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from rededit.scoring.edit_metrics import (
    METRIC_KEYS,
    PSNR_CAP,
    aggregate,
    aggregate_by_task,
    edit_metrics,
    masked_l1,
    masked_psnr,
    psnr,
)


def _imgs(b: int = 2, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _box_mask(b: int = 2, h: int = 8, w: int = 8) -> torch.Tensor:
    m = torch.zeros(b, 1, h, w)
    m[:, :, 2:6, 1:5] = 1  # 16 of 64 pixels
    return m


def test_identical_prediction_is_perfect() -> None:
    gt, src = _imgs(seed=0), _imgs(seed=1)
    m = edit_metrics(gt.clone(), gt, _box_mask(), source=src)
    assert set(m) == set(METRIC_KEYS)
    assert torch.all(m["edit_region_error"] == 0) and torch.all(m["error_ratio"] == 0)
    assert torch.all(m["l1"] == 0) and torch.all(m["l2"] == 0)
    assert torch.all(m["psnr_outside"] == PSNR_CAP) and torch.all(m["psnr"] == PSNR_CAP)


def test_returning_the_source_has_ratio_one() -> None:
    gt, src = _imgs(seed=0), _imgs(seed=1)
    m = edit_metrics(src.clone(), gt, _box_mask(), source=src)
    assert torch.allclose(m["error_ratio"], torch.ones(2, dtype=torch.float64))
    assert torch.equal(m["edit_region_error"], m["identity_error"])
    assert torch.equal(m["psnr_outside"], m["identity_psnr_outside"])


def test_masked_closed_forms() -> None:
    gt = torch.full((1, 3, 8, 8), -1.0)  # black in [0, 1]
    pred = gt.clone()
    mask = _box_mask(1)
    pred[mask.expand_as(pred) > 0] = 1.0  # inside: off by 1.0 in [0, 1]
    pred[:, :, 7, 7] = 0.0  # one pixel outside: off by 0.5 in [0, 1] on 3 channels
    m = edit_metrics(pred, gt, mask)
    assert m["edit_region_error"].item() == pytest.approx(1.0)
    # Outside: 48 pixels × 3 channels, one pixel with squared error 0.25 per channel.
    assert m["psnr_outside"].item() == pytest.approx(10 * math.log10(48 / 0.25))
    assert m["l1"].item() == pytest.approx((16 * 1.0 + 0.5) / 64)
    assert m["l2"].item() == pytest.approx((16 * 1.0 + 0.25) / 64)
    assert m["psnr"].item() == pytest.approx(10 * math.log10(64 / (16 + 0.25)), rel=1e-6)
    assert math.isnan(m["identity_error"].item()) and math.isnan(m["error_ratio"].item())
    # Changing pixels outside the mask never moves the in-region error, and vice versa.
    pred2 = pred.clone()
    pred2[:, :, 0, 7] = 1.0
    m2 = edit_metrics(pred2, gt, mask)
    assert m2["edit_region_error"].item() == m["edit_region_error"].item()
    assert m2["psnr_outside"].item() < m["psnr_outside"].item()


def test_whole_image_and_empty_masks_are_undefined_not_zero() -> None:
    gt, pred = _imgs(seed=0), _imgs(seed=2)
    full = edit_metrics(pred, gt, torch.ones(2, 1, 8, 8))
    assert torch.isnan(full["psnr_outside"]).all()
    assert torch.allclose(full["edit_region_error"], full["l1"])
    none_mask = edit_metrics(pred, gt, None)
    assert torch.isnan(none_mask["psnr_outside"]).all()
    assert torch.isnan(masked_l1(pred, gt, torch.zeros(2, 1, 8, 8))).all()
    assert torch.isnan(masked_psnr(pred, gt, torch.zeros(2, 1, 8, 8))).all()


def test_full_mask_psnr_matches_torchmetrics_psnr() -> None:
    gt, pred = _imgs(seed=0), _imgs(seed=3)
    assert torch.allclose(masked_psnr(pred, gt, torch.ones(2, 1, 8, 8)), psnr(pred, gt), atol=1e-6)


def test_shape_errors() -> None:
    gt = _imgs()
    with pytest.raises(ValueError, match="mask"):
        edit_metrics(gt, gt, torch.ones(2, 3, 8, 8))
    with pytest.raises(ValueError, match="source"):
        edit_metrics(gt, gt, None, source=_imgs(h=16))
    with pytest.raises(ValueError, match="pred and gt"):
        edit_metrics(gt, _imgs(h=16))


def test_aggregate_means_counts_and_ratio_of_means() -> None:
    rows = [
        {"task": "add", "edit_region_error": 0.1, "identity_error": 0.4, "psnr_outside": 30.0},
        {"task": "add", "edit_region_error": 0.3, "identity_error": 0.4, "psnr_outside": float("nan")},
        {"task": "t2i", "edit_region_error": 0.2, "identity_error": float("nan")},
    ]
    by_task = aggregate_by_task(rows)
    assert list(by_task) == ["add", "t2i"]
    add = by_task["add"]
    assert add["n"] == 2 and add["edit_region_error"] == pytest.approx(0.2)
    assert add["error_ratio"] == pytest.approx(0.5) and add["error_ratio_count"] == 2
    assert add["psnr_outside"] == 30.0 and add["psnr_outside_count"] == 1
    t2i = by_task["t2i"]
    assert t2i["error_ratio"] is None and t2i["identity_error"] is None and t2i["identity_error_count"] == 0
    overall = aggregate(rows)
    assert overall["n"] == 3 and overall["edit_region_error_count"] == 3
