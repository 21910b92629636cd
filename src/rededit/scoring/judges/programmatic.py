"""Programmatic judges for the synthetic bench: exact pass/fail checks that need no learned weights.

The synthetic generator (report §2.3, ``src/rededit/datagen/synth``) renders source and target from a scene
description, so each bench row carries the exact ground truth ``gt``, Picture 1 (the ``source``) and the
edit mask ``M`` (the edited object's pixels, the background, the glyphs of a sign, or the whole image).
Instead of a VLM asking "did the edit follow the instruction?" (§4.2), these judges compare the prediction
``x`` with ``gt`` and ``source`` where the edit happened, in a way that survives blur (an editor's outputs
are smoother than the flat renders):

* **region closeness** (add / remove / replace / color / invert / background / compose, text without OCR): on the
  discriminative pixels ``D = M ∧ ‖gt − source‖ > τ`` (where the edit changes something), the per-pixel
  colour distances ``d_gt = ‖x − gt‖`` and ``d_src = ‖x − source‖`` give the closeness
  ``c = mean_D d_src / (d_gt + d_src)``: 1 for ``x = gt``, 0 for ``x = source``, 0.5 half-way (a half-done
  edit). It is also measured with the three images blurred (σ = 1 px) and the larger value counts, so a
  correct but soft edit passes while an unchanged or half-done one does not. Pass if
  ``c ≥ min_closeness``.
* **region IoU** (object edits): the pixels the prediction changed (``‖x − source‖ > τ``) against ``D``,
  inside a window around the mask (``M`` dilated by ``iou_context · sqrt|M|`` pixels); outside ``D``,
  pixels within ``iou_edge`` pixels of a colour step of the source or the ground truth are ignored (any
  blur changes them, edited or not). It fails an edit that repaints the object's surroundings too, which
  closeness alone cannot see; changes far from the object are the preservation check's job.
* **global ratio** (stylize / restore / viewpoint): ``L1(x, gt) ≤ max_ratio · L1(source, gt)``, the
  identity-baseline ratio of :mod:`rededit.scoring.edit_metrics` (a source of another shape, as in
  low-resolution restores and quarter turns, is resized to the target's shape for the baseline).
* **text**: with an OCR backend (anything with ``read_text(PIL image) -> str``, e.g. the backends of
  ``rededit.scoring.ocr``), the sign region must read ``ocr_target`` (normalised: case-folded, whitespace
  removed; similarity ``1 − Levenshtein / max length``); without one the region closeness on the glyph
  mask stands in, and ``detail`` says so.
* **t2i** (no source): an 8×8 colour layout of ``x`` closer to ``gt``'s than ``gt``'s flat mean colour is
  (``L1 ≤ max_ratio ·`` that baseline), and the mean colour of most object boxes matching.
* **preservation** (usable with every judge, ``judge(..., preserve_psnr=25.0)``): PSNR between ``x`` and
  ``gt`` outside the mask (:func:`rededit.scoring.edit_metrics.masked_psnr`) ≥ the threshold.

Conventions: images are ``[3, H, W]`` in [-1, 1] (a leading batch dimension of 1 is accepted), compared on
[0, 1] (colour distances are Euclidean over RGB, so ``τ = 0.15`` is about 38/255 on one channel). A judge
that cannot decide (no discriminative pixels, a ground truth equal to its source, an OCR call that raised)
returns ``defined=False`` and ``score = nan``: it is reported as undecided, never counted as a failure
(the judge-drift trap of docs/architecture.md).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rededit.data.images import load_image, resize_to_bucket, tensor_to_pil, to_tensor, transform_boxes
from rededit.scoring.categories import load_category_map
from rededit.scoring.edit_metrics import PSNR_CAP, masked_psnr, to_unit
from rededit.scoring.ocr_metric import levenshtein

__all__ = [
    "JUDGES",
    "JudgeResult",
    "bench_sample",
    "judge",
    "judge_add",
    "judge_background",
    "judge_color",
    "judge_compose",
    "judge_invert",
    "judge_many",
    "judge_remove",
    "judge_replace",
    "judge_restore",
    "judge_stylize",
    "judge_t2i",
    "judge_text",
    "judge_viewpoint",
    "preservation_check",
    "success_rate_by_category",
]

# Defaults (see the module docstring for what each one thresholds).
TAU = 0.15  # colour distance (RGB, [0, 1]) above which a pixel counts as changed
MIN_CLOSENESS = 0.65
MIN_IOU = 0.5
IOU_CONTEXT = 0.5
CLOSENESS_SIGMA = 1.0  # pixels: the coarse scale at which closeness is also measured
IOU_EDGE = 1  # pixels: colour steps of source / gt this close are blur-tolerant in the IoU
MAX_RATIO = 0.5
MIN_BASELINE = 0.002  # L1 on [0, 1]: below it the ground truth equals its source and nothing is decidable
T2I_GRID = 8
T2I_MAX_RATIO = 0.5
T2I_MIN_OBJECTS = 0.5
OCR_MIN_SIMILARITY = 1.0
OCR_MIN_HEIGHT = 64  # pixels: OCR engines read small sign crops better upscaled
INVERT_MAX_ERROR = 0.2  # RGB distance on [0, 1] (≈ 30/255 per channel): invert's absolute check
PRESERVE_PSNR = 25.0  # dB, the demo editor's goal for PSNR outside the edit region


@dataclass(frozen=True)
class JudgeResult:
    """The verdict of one judge on one sample.

    Attributes:
        passed: the edit does what the instruction asked (False when undecided).
        score: a soft version in [0, 1] (1 = the ground truth); ``nan`` when undecided.
        detail: one line saying what was checked and with which numbers.
        defined: False when the judge could not decide; such results are left out of success rates.
        values: the numbers behind the verdict (closeness, iou, ratio, psnr_outside, ...).
    """

    passed: bool
    score: float
    detail: str
    defined: bool = True
    values: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def undecided(cls, detail: str, **values: float) -> JudgeResult:
        return cls(False, math.nan, detail, False, dict(values))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "score": None if math.isnan(self.score) else self.score,
            "detail": self.detail,
            "defined": self.defined,
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.values.items()},
        }


# ------------------------------------------------------------------------------------------ tensors
def _image(x: torch.Tensor, what: str) -> torch.Tensor:
    """[-1, 1] ``[3, H, W]`` (or ``[1, 3, H, W]``) → float64 [0, 1] ``[3, H, W]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [3, H, W] in [-1, 1], got {type(x).__name__}")
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"{what} must be [3, H, W] (or [1, 3, H, W]), got {tuple(x.shape)}")
    return to_unit(x.cpu())


def _resized(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0].clamp(
        0, 1
    )


def _source(sample: Mapping[str, Any]) -> torch.Tensor | None:
    src = sample.get("source")
    if src is None and sample.get("references"):
        src = sample["references"][0]
    return src


def _mask(sample: Mapping[str, Any], hw: tuple[int, int]) -> torch.Tensor | None:
    """The edit mask as ``[H, W]`` bool (None when the sample has none)."""
    m = sample.get("edit_mask")
    if m is None:
        m = sample.get("mask")
    if m is None:
        return None
    m = torch.as_tensor(m)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != hw:
        raise ValueError(
            f"edit_mask must be [1, H, W] with (H, W) = {hw} like the images, got {tuple(m.shape)}"
        )
    return m.cpu() > 0.5


def _prepare(pred: torch.Tensor, sample: Mapping[str, Any], need_source: bool = True):
    """(x, gt, source at gt's shape or None, mask or None) on [0, 1]."""
    if sample.get("target") is None:
        raise ValueError("sample has no `target` (ground truth); programmatic judges need one")
    gt = _image(sample["target"], "sample['target']")
    x = _image(pred, "pred")
    if x.shape != gt.shape:
        raise ValueError(
            f"pred {tuple(x.shape)} and the ground truth {tuple(gt.shape)} differ in shape: generate (or "
            "resize) the edit at the target's evaluated resolution"
        )
    hw = tuple(gt.shape[-2:])
    src = _source(sample)
    src = None if src is None else _resized(_image(src, "sample['source']"), hw)
    if need_source and src is None:
        raise ValueError(
            f"task {sample.get('task')!r} needs the source image (Picture 1) in sample['source']"
        )
    return x, gt, src, _mask(sample, hw)


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel Euclidean RGB distance ``[H, W]``."""
    return (a - b).pow(2).sum(0).sqrt()


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    if r <= 0:
        return m
    return F.max_pool2d(m[None, None].double(), 2 * r + 1, stride=1, padding=r)[0, 0] > 0.5


# ------------------------------------------------------------------------------------------ checks
def _gaussian(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[C, H, W]`` (replicated borders)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    out = F.pad(img[None], (r, r, r, r), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def _closeness(x: torch.Tensor, gt: torch.Tensor, src: torch.Tensor, d: torch.Tensor) -> float:
    dg, ds = _dist(x, gt)[d], _dist(x, src)[d]
    return float((ds / (dg + ds)).mean())


def region_closeness(
    x: torch.Tensor,
    gt: torch.Tensor,
    src: torch.Tensor,
    region: torch.Tensor,
    tau: float = TAU,
    sigma: float = CLOSENESS_SIGMA,
) -> tuple[float, int]:
    """(closeness ``mean_D d_src / (d_gt + d_src)``, ``|D|``) on ``D = region ∧ ‖gt − src‖ > τ``.

    Inputs on [0, 1]; ``region`` ``[H, W]`` bool. ``nan`` closeness when ``D`` is empty. The denominator
    never vanishes on ``D``: ``d_gt + d_src ≥ ‖gt − src‖ > τ`` (triangle inequality). With ``sigma > 0``
    the closeness is also measured with all three images blurred by a Gaussian of ``sigma`` pixels (on
    that scale's ``D``) and the larger value counts: a correct but soft edit is right at the coarse scale,
    while an unchanged or half-done edit scores the same (0, 0.5) at every scale.
    """
    d = region & (_dist(gt, src) > tau)
    n = int(d.sum())
    if n == 0:
        return math.nan, 0
    close = _closeness(x, gt, src, d)
    if sigma > 0:
        xs, gs, ss = (_gaussian(v, sigma) for v in (x, gt, src))
        ds = region & (_dist(gs, ss) > tau)
        if bool(ds.any()):
            close = max(close, _closeness(xs, gs, ss, ds))
    return close, n


def _edges(img: torch.Tensor, r: int) -> torch.Tensor:
    """``[H, W]`` bool: pixels whose ``(2r+1)²`` neighbourhood spans a colour range above :data:`TAU`.

    The per-channel range (max-pool of ``img`` plus max-pool of ``−img``) bounds every pairwise distance in
    the window, so this marks both sides of every colour step ``> τ``: the pixels a blur of radius ``r``
    changes.
    """
    if r <= 0:
        return torch.zeros(img.shape[-2:], dtype=torch.bool)
    k = 2 * r + 1
    hi = F.max_pool2d(img[None], k, stride=1, padding=r)[0]
    lo = -F.max_pool2d(-img[None], k, stride=1, padding=r)[0]
    return (hi - lo).pow(2).sum(0).sqrt() > TAU


def region_iou(
    x: torch.Tensor,
    gt: torch.Tensor,
    src: torch.Tensor,
    mask: torch.Tensor,
    tau: float = TAU,
    context: float = IOU_CONTEXT,
    edge: int = IOU_EDGE,
) -> float:
    """IoU of the pixels ``x`` changed w.r.t. ``src`` and those ``gt`` changed inside the mask.

    Computed in the window ``M`` dilated by ``max(2, context · sqrt|M|)`` pixels, leaving out the pixels
    within ``edge`` pixels of a colour step of ``src`` or ``gt`` (a blurred but correct edit differs from
    both there) unless they belong to the ground-truth change itself, which always counts. ``nan`` when the
    ground truth changes nothing inside the mask.
    """
    d = mask & (_dist(gt, src) > tau)
    if not bool(d.any()):
        return math.nan
    r = max(2, round(context * math.sqrt(float(mask.sum()))))
    window = _dilate(mask, r)
    # Every pixel of the ground-truth change counts; elsewhere, colour steps are blur-tolerant.
    valid = window & (d | ~(_edges(src, edge) | _edges(gt, edge)))
    changed = _dist(x, src) > tau
    inter = int((changed & d & valid).sum())
    union = int(((changed | d) & valid).sum())
    return inter / union if union else math.nan


def _region_judge(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    what: str,
    *,
    use_iou: bool,
    tau: float,
    min_closeness: float,
    min_iou: float,
    iou_context: float,
    iou_edge: int,
) -> JudgeResult:
    x, gt, src, mask = _prepare(pred, sample)
    if mask is None:
        raise ValueError(f"task {sample.get('task')!r} needs sample['edit_mask'] ([1, H, W] in {{0, 1}})")
    close, n = region_closeness(x, gt, src, mask, tau)
    if n == 0:
        return JudgeResult.undecided(
            f"{what}: the ground truth does not differ from the source inside the mask (τ={tau})",
            closeness=math.nan,
        )
    values = {"closeness": close, "pixels": float(n)}
    ok = close >= min_closeness
    detail = f"{what}: closeness {close:.3f} (≥{min_closeness}) on {n} px"
    score = close
    if use_iou:
        iou = region_iou(x, gt, src, mask, tau, iou_context, iou_edge)
        values["iou"] = iou
        ok = ok and iou >= min_iou  # never nan here: the change D is not empty
        detail += f", region IoU {iou:.3f} (≥{min_iou})"
        score = min(close, iou)
    return JudgeResult(bool(ok), float(min(max(score, 0.0), 1.0)), detail, True, values)


def _object_judge(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    what: str,
    tau: float,
    min_closeness: float,
    min_iou: float,
    iou_context: float,
    iou_edge: int,
) -> JudgeResult:
    return _region_judge(
        pred,
        sample,
        what,
        use_iou=True,
        tau=tau,
        min_closeness=min_closeness,
        min_iou=min_iou,
        iou_context=iou_context,
        iou_edge=iou_edge,
    )


def judge_add(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    tau: float = TAU,
    min_closeness: float = MIN_CLOSENESS,
    min_iou: float = MIN_IOU,
    iou_context: float = IOU_CONTEXT,
    iou_edge: int = IOU_EDGE,
) -> JudgeResult:
    """``add``: inside the new object's mask the prediction shows the object (closeness to the ground truth
    ≥ ``min_closeness``) and the pixels it changed are the object's (IoU ≥ ``min_iou``)."""
    return _object_judge(pred, sample, "object added", tau, min_closeness, min_iou, iou_context, iou_edge)


def judge_remove(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    tau: float = TAU,
    min_closeness: float = MIN_CLOSENESS,
    min_iou: float = MIN_IOU,
    iou_context: float = IOU_CONTEXT,
    iou_edge: int = IOU_EDGE,
) -> JudgeResult:
    """``remove``: inside the removed object's mask the prediction shows the ground-truth background
    (closeness ≥ ``min_closeness``), changing just that region (IoU ≥ ``min_iou``)."""
    return _object_judge(pred, sample, "object removed", tau, min_closeness, min_iou, iou_context, iou_edge)


def judge_replace(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    tau: float = TAU,
    min_closeness: float = MIN_CLOSENESS,
    min_iou: float = MIN_IOU,
    iou_context: float = IOU_CONTEXT,
    iou_edge: int = IOU_EDGE,
) -> JudgeResult:
    """``replace``: on the union of the old and new shapes' masks the prediction has the new shape
    (closeness ≥ ``min_closeness``; IoU ≥ ``min_iou`` of the changed pixels, which for a same-colour
    replacement are only where the two shapes differ)."""
    return _object_judge(pred, sample, "object replaced", tau, min_closeness, min_iou, iou_context, iou_edge)


def judge_color(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    tau: float = TAU,
    min_closeness: float = MIN_CLOSENESS,
    min_iou: float = MIN_IOU,
    iou_context: float = IOU_CONTEXT,
    iou_edge: int = IOU_EDGE,
) -> JudgeResult:
    """``color``: inside the object's mask the prediction has the target colour (closeness
    ≥ ``min_closeness``) over the object's pixels and not its surroundings (IoU ≥ ``min_iou``)."""
    return _object_judge(
        pred, sample, "object recoloured", tau, min_closeness, min_iou, iou_context, iou_edge
    )


def judge_invert(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    tau: float = TAU,
    min_closeness: float = MIN_CLOSENESS,
    min_iou: float = MIN_IOU,
    iou_context: float = IOU_CONTEXT,
    iou_edge: int = IOU_EDGE,
    max_error: float = INVERT_MAX_ERROR,
) -> JudgeResult:
    """``invert`` (opt-in synthetic task): inside the object's mask the prediction is the negative
    ``1 − source`` (the ground truth there), and only the object's pixels changed.

    The ``color`` checks (closeness ≥ ``min_closeness``, region IoU ≥ ``min_iou``) plus an absolute one: the
    mean colour distance to the ground truth on the changed pixels ``D``, ``mean_D ‖x − gt‖`` (also measured
    with both blurred by :data:`CLOSENESS_SIGMA` px, the smaller counts, so a soft but right edit passes)
    ≤ ``max_error``. Why the extra check: closeness is relative to the source, so any colour far from the
    object's (a removal to a background that happens to lie on the negative's side) scores ≥ 0.65, while an
    inversion has exactly one right colour per pixel. The synthesis never inverts a colour whose negative is
    within ``INVERT_MIN_DISTANCE`` of itself (grey), so ``D`` is the whole visible object.
    """
    res = _object_judge(pred, sample, "object inverted", tau, min_closeness, min_iou, iou_context, iou_edge)
    if not res.defined:
        return res
    x, gt, src, mask = _prepare(pred, sample)
    d = mask & (_dist(gt, src) > tau)
    err = float(_dist(x, gt)[d].mean())
    xs, gs, ss = (_gaussian(v, CLOSENESS_SIGMA) for v in (x, gt, src))
    ds = mask & (_dist(gs, ss) > tau)
    if bool(ds.any()):
        err = min(err, float(_dist(xs, gs)[ds].mean()))
    ok = res.passed and err <= max_error
    return JudgeResult(
        bool(ok),
        res.score,
        f"{res.detail}, error to the negative {err:.3f} (≤{max_error})",
        True,
        {**res.values, "error": err},
    )


def judge_compose(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    tau: float = TAU,
    min_closeness: float = MIN_CLOSENESS,
    min_iou: float = MIN_IOU,
    iou_context: float = IOU_CONTEXT,
    iou_edge: int = IOU_EDGE,
) -> JudgeResult:
    """``compose``: the objects of Pictures 2..3 appear in Picture 1 where the ground truth has them
    (closeness ≥ ``min_closeness`` on their mask, IoU ≥ ``min_iou``)."""
    return _object_judge(pred, sample, "objects composed", tau, min_closeness, min_iou, iou_context, iou_edge)


def judge_background(
    pred: torch.Tensor, sample: Mapping[str, Any], *, tau: float = TAU, min_closeness: float = MIN_CLOSENESS
) -> JudgeResult:
    """``background``: the region outside the objects and the sign (the mask) is closer to the new
    background than to the old one (closeness ≥ ``min_closeness``); keeping the objects is preservation's
    job (``judge(..., preserve_psnr=...)``)."""
    return _region_judge(
        pred,
        sample,
        "background swapped",
        use_iou=False,
        tau=tau,
        min_closeness=min_closeness,
        min_iou=0.0,
        iou_context=IOU_CONTEXT,
        iou_edge=IOU_EDGE,
    )


def _global_judge(
    pred: torch.Tensor, sample: Mapping[str, Any], what: str, max_ratio: float, min_baseline: float
) -> JudgeResult:
    x, gt, src, _ = _prepare(pred, sample)
    base = float((src - gt).abs().mean())
    err = float((x - gt).abs().mean())
    if base < min_baseline:
        return JudgeResult.undecided(
            f"{what}: the source already equals the ground truth (L1 {base:.4f} < {min_baseline})",
            ratio=math.nan,
            l1=err,
            identity_l1=base,
        )
    ratio = err / base
    return JudgeResult(
        ratio <= max_ratio,
        float(min(max(1.0 - ratio, 0.0), 1.0)),
        f"{what}: L1 {err:.4f} = {ratio:.3f} × the identity baseline {base:.4f} (≤{max_ratio})",
        True,
        {"ratio": ratio, "l1": err, "identity_l1": base},
    )


def judge_stylize(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    max_ratio: float = MAX_RATIO,
    min_baseline: float = MIN_BASELINE,
) -> JudgeResult:
    """``stylize``: the whole image is closer to the filtered ground truth than the source is,
    ``L1(pred, gt) ≤ max_ratio · L1(source, gt)``."""
    return _global_judge(pred, sample, "style applied", max_ratio, min_baseline)


def judge_restore(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    max_ratio: float = MAX_RATIO,
    min_baseline: float = MIN_BASELINE,
) -> JudgeResult:
    """``restore``: ``L1(pred, clean) ≤ max_ratio · L1(degraded source, clean)`` (a low-resolution source is
    upsampled to the target's shape for the baseline)."""
    return _global_judge(pred, sample, "image restored", max_ratio, min_baseline)


def judge_viewpoint(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    max_ratio: float = MAX_RATIO,
    min_baseline: float = MIN_BASELINE,
) -> JudgeResult:
    """``viewpoint``: the flipped / turned / zoomed view, ``L1(pred, gt) ≤ max_ratio · L1(source, gt)`` (a
    quarter-turned target has another shape: the source is resized to it for the baseline)."""
    return _global_judge(pred, sample, "view changed", max_ratio, min_baseline)


# ------------------------------------------------------------------------------------------ text
def _normalise_text(s: str) -> str:
    return "".join(str(s).casefold().split())


def text_similarity(read: str, target: str) -> float:
    """``1 − Levenshtein / max length`` of the normalised strings (1.0 when the target is contained)."""
    r, t = _normalise_text(read), _normalise_text(target)
    if not t:
        return 1.0 if not r else 0.0
    if t in r:
        return 1.0
    return 1.0 - levenshtein(r, t) / max(len(r), len(t))


def _text_crop(x: torch.Tensor, mask: torch.Tensor | None, min_height: int) -> Image.Image:
    """The sign region of ``x`` ([0, 1]) as a PIL image: the mask's box plus half its height of margin."""
    h, w = x.shape[-2:]
    x0, y0, x1, y1 = 0, 0, w, h
    if mask is not None and bool(mask.any()):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        pad = max(4, (y1 - y0) // 2)
        x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    img = tensor_to_pil(x[:, y0:y1, x0:x1], value_range=(0.0, 1.0))
    if img.height < min_height:
        s = min_height / img.height
        img = img.resize((max(1, round(img.width * s)), min_height), Image.Resampling.BICUBIC)
    return img


def _read(ocr: Any, img: Image.Image) -> str:
    if hasattr(ocr, "read_text"):
        return str(ocr.read_text(img))
    if callable(ocr):
        return str(ocr(img))
    raise TypeError(f"ocr must have read_text(PIL.Image) -> str (or be callable), got {type(ocr).__name__}")


def judge_text(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    ocr: Any = None,
    *,
    min_similarity: float = OCR_MIN_SIMILARITY,
    min_height: int = OCR_MIN_HEIGHT,
    tau: float = TAU,
    min_closeness: float = MIN_CLOSENESS,
) -> JudgeResult:
    """``text`` (and T2I rows with a sign): OCR of the sign region reads ``sample['ocr_target']``.

    Args:
        ocr: an OCR backend with ``read_text(PIL.Image) -> str``; None falls back to the region closeness
            on the glyph mask (old and new text), which ``detail`` states.
        min_similarity: normalised similarity (1 − Levenshtein / max length, case and whitespace ignored;
            1.0 if the target is contained in the reading) needed to pass; 1.0 = exact.
        min_height: the crop handed to OCR is upscaled to at least this many pixels high.
        tau, min_closeness: the fallback pixel check's thresholds.
    """
    if ocr is None:
        res = _region_judge(
            pred,
            sample,
            "text changed (no OCR backend: pixel check inside the text mask)",
            use_iou=False,
            tau=tau,
            min_closeness=min_closeness,
            min_iou=0.0,
            iou_context=IOU_CONTEXT,
            iou_edge=IOU_EDGE,
        )
        return res
    x, _gt, _src, mask = _prepare(pred, sample, need_source=False)
    target = sample.get("ocr_target")
    if not target:
        return JudgeResult.undecided("text: the sample has no ocr_target to read")
    try:
        read = _read(ocr, _text_crop(x, mask, min_height))
    except Exception as e:  # an OCR failure is undecided, never a failed edit (judge-drift trap)
        return JudgeResult.undecided(f"text: OCR backend failed ({type(e).__name__}: {e})")
    sim = text_similarity(read, target)
    return JudgeResult(
        sim >= min_similarity,
        float(sim),
        f"text: OCR read {read!r}, expected {target!r}, similarity {sim:.3f} (≥{min_similarity})",
        True,
        {"similarity": sim},
    )


# ------------------------------------------------------------------------------------------ t2i
def _boxes(sample: Mapping[str, Any]) -> np.ndarray:
    b = sample.get("object_boxes")
    if b is None:
        return np.zeros((0, 4))
    b = np.asarray(torch.as_tensor(b).cpu(), dtype=np.float64)
    if b.size % 4:
        raise ValueError(f"object_boxes must be [O, 4] (x0, y0, x1, y1), got shape {b.shape}")
    return b.reshape(-1, 4)


def judge_t2i(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    *,
    grid: int = T2I_GRID,
    max_ratio: float = T2I_MAX_RATIO,
    min_objects: float = T2I_MIN_OBJECTS,
) -> JudgeResult:
    """``t2i`` (no source): the picture has the ground truth's colour layout and objects.

    Layout: ``L1(pool(pred), pool(gt)) ≤ max_ratio · L1(mean colour of gt, pool(gt))`` on a
    ``grid``×``grid`` average-pooled image (the flat mean colour is the best "no layout" guess, so a blank or
    grey picture fails). Objects: in each box of ``object_boxes``, the prediction's mean colour must be
    nearer the ground truth's than half the distance of gt's global mean colour; at least ``min_objects``
    of the decidable boxes must match.
    """
    x, gt, _src, _ = _prepare(pred, sample, need_source=False)
    h, w = gt.shape[-2:]
    g = (min(grid, h), min(grid, w))
    px, pg = F.adaptive_avg_pool2d(x[None], g)[0], F.adaptive_avg_pool2d(gt[None], g)[0]
    mean = gt.mean(dim=(1, 2), keepdim=True)
    base = float((mean - pg).abs().mean())
    err = float((px - pg).abs().mean())
    if base < MIN_BASELINE:
        return JudgeResult.undecided(
            "t2i: the ground truth is flat; no layout to check", layout_ratio=math.nan
        )
    ratio = err / base
    ok_boxes, n_boxes = 0, 0
    for x0, y0, x1, y1 in _boxes(sample):
        c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        c1, r1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
        if c1 <= c0 or r1 <= r0:
            continue
        mg = gt[:, r0:r1, c0:c1].mean(dim=(1, 2))
        ref = float((mean[:, 0, 0] - mg).norm())
        if ref < TAU:  # the box looks like the global mean: undecidable
            continue
        n_boxes += 1
        ok_boxes += float((x[:, r0:r1, c0:c1].mean(dim=(1, 2)) - mg).norm()) < 0.5 * ref
    frac = ok_boxes / n_boxes if n_boxes else math.nan
    passed = ratio <= max_ratio and (n_boxes == 0 or frac >= min_objects)
    score = max(0.0, 1.0 - ratio) if n_boxes == 0 else min(max(0.0, 1.0 - ratio), frac)
    return JudgeResult(
        bool(passed),
        float(min(score, 1.0)),
        f"t2i: layout L1 ratio {ratio:.3f} (≤{max_ratio}), objects matched {ok_boxes}/{n_boxes} (≥{min_objects})",
        True,
        {"layout_ratio": ratio, "objects_matched": frac},
    )


# ------------------------------------------------------------------------------------------ preservation
def preservation_check(
    pred: torch.Tensor, sample: Mapping[str, Any], min_psnr: float = PRESERVE_PSNR
) -> JudgeResult:
    """PSNR (dB, [0, 1] range) between ``pred`` and the ground truth outside the edit mask ≥ ``min_psnr``.

    Undecided for global edits (a mask covering the whole image leaves nothing outside) and for samples
    without a mask. ``score = min(1, psnr / min_psnr)``.
    """
    x, gt, _src, mask = _prepare(pred, sample, need_source=False)
    if mask is None or bool(mask.all()):
        return JudgeResult.undecided("preservation: nothing outside the edit mask", psnr_outside=math.nan)
    outside = (~mask).double()[None, None]
    # masked_psnr takes the [-1, 1] convention; x and gt are on [0, 1].
    value = float(masked_psnr(x[None] * 2 - 1, gt[None] * 2 - 1, outside)[0])
    return JudgeResult(
        value >= min_psnr,
        float(min(1.0, value / min_psnr)) if min_psnr > 0 else 1.0,
        f"preservation: PSNR outside the mask {value:.1f} dB (≥{min_psnr}; cap {PSNR_CAP:.0f})",
        True,
        {"psnr_outside": value},
    )


# ------------------------------------------------------------------------------------------ registry
JUDGES: dict[str, Callable[..., JudgeResult]] = {
    "t2i": judge_t2i,
    "add": judge_add,
    "remove": judge_remove,
    "replace": judge_replace,
    "color": judge_color,
    "background": judge_background,
    "stylize": judge_stylize,
    "restore": judge_restore,
    "text": judge_text,
    "viewpoint": judge_viewpoint,
    "compose": judge_compose,
    "invert": judge_invert,
}


def judge(
    pred: torch.Tensor,
    sample: Mapping[str, Any],
    ocr: Any = None,
    *,
    preserve_psnr: float | None = None,
    **thresholds: Any,
) -> JudgeResult:
    """Judge ``pred`` with the judge of ``sample['task']``.

    Args:
        pred: the edit, ``[3, H, W]`` in [-1, 1] at the sample's evaluated resolution.
        sample: the bench row's tensors (see :func:`bench_sample`).
        ocr: OCR backend for ``text`` (ignored by the other judges).
        preserve_psnr: also require :func:`preservation_check` with this threshold (dB) where the task has
            pixels outside its mask; None (the default) judges instruction compliance only, preservation
            being reported separately by :mod:`rededit.scoring.edit_metrics`.
        **thresholds: keyword thresholds of the task's judge (e.g. ``min_closeness=0.8``).

    Raises:
        KeyError: no judge for the sample's task.
    """
    task = sample.get("task")
    if task not in JUDGES:
        raise KeyError(f"no programmatic judge for task {task!r}; judges exist for {sorted(JUDGES)}")
    fn = JUDGES[task]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(thresholds) - set(params))
    if unknown:
        takes = [p for p in params if p not in ("pred", "sample", "ocr")]
        raise TypeError(f"the {task!r} judge takes no thresholds {unknown}; it takes {takes}")
    res = fn(pred, sample, ocr=ocr, **thresholds) if "ocr" in params else fn(pred, sample, **thresholds)
    if preserve_psnr is None or not res.defined:
        return res
    keep = preservation_check(pred, sample, preserve_psnr)
    if not keep.defined:
        return res
    return JudgeResult(
        res.passed and keep.passed,
        min(res.score, keep.score),
        f"{res.detail}; {keep.detail}",
        True,
        {**res.values, **keep.values},
    )


def success_rate_by_category(results: Iterable[Any], category_map: Any = None) -> dict[str, dict[str, Any]]:
    """Success rate per REDEdit-Bench category (report §4.1), undecided results left out.

    Args:
        results: ``(task, JudgeResult)`` pairs, or mappings with ``task`` and ``passed`` (optionally
            ``defined``, default True) such as ``{"task": ..., **result.to_dict()}``.
        category_map: a :class:`~rededit.scoring.categories.CategoryMap` or anything
            :func:`~rededit.scoring.categories.load_category_map` takes (None = the default map).

    Returns:
        ``{row: {"name", "n", "passed", "undecided", "success_rate", "tasks"}}``: rows are category keys in
        the map's order, then tasks without a category (``t2i``) and ``other``; ``n`` counts decided
        results, ``success_rate = passed / n`` (None when ``n = 0``).
    """
    cmap = load_category_map(category_map)
    rows: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"n": 0, "passed": 0, "undecided": 0, "tasks": set()}
    )
    for item in results:
        if isinstance(item, Mapping):
            task, passed, defined = item["task"], bool(item["passed"]), bool(item.get("defined", True))
        else:
            task, res = item
            passed, defined = bool(res.passed), bool(res.defined)
        r = rows[cmap.row_of(str(task))]
        r["tasks"].add(str(task))
        if not defined:
            r["undecided"] += 1
            continue
        r["n"] += 1
        r["passed"] += int(passed)
    order = [k for k in cmap.keys if k in rows] + sorted(k for k in rows if k not in cmap.keys)
    out = {}
    for k in order:
        r = rows[k]
        out[k] = {
            "name": cmap.name_of(k),
            "n": r["n"],
            "passed": r["passed"],
            "undecided": r["undecided"],
            "success_rate": r["passed"] / r["n"] if r["n"] else None,
            "tasks": sorted(r["tasks"]),
        }
    return out


# ------------------------------------------------------------------------------------------ samples
def bench_sample(
    row: Mapping[str, Any], root: str | Path, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A synthetic bench row (a :meth:`rededit.data.manifest.Manifest.row` dict) as the judges' sample.

    Args:
        row: the manifest row.
        root: the manifest's folder (relative URIs resolve against it).
        size: evaluated ``(height, width)``; the target is cover-resized to it (:func:`resize_to_bucket`),
            the mask with nearest neighbours and the boxes through :func:`transform_boxes`. None keeps the
            native size.

    Returns:
        ``{"id", "task", "instruction", "ocr_target", "target" [3, H, W], "source" [3, H, W] or None,
        "references" (all Pictures at their own size), "edit_mask" [1, H, W] or None, "object_boxes"
        [O, 4]}``. A source of the target's native size goes through the target's resize (pixels stay
        aligned); one of another size (low-resolution restores, quarter turns) is resized to the
        evaluated size, a baseline only.
    """
    tw, th = int(row["target_width"]), int(row["target_height"])
    h, w = (th, tw) if size is None else (int(size[0]), int(size[1]))

    def fit(img: Image.Image, resample: str = "lanczos") -> Image.Image:
        return img if img.size == (w, h) else resize_to_bucket(img, h, w, resample)

    refs = [load_image(u, root) for u in (row.get("references") or [])]
    source = None
    if refs:
        s = refs[0]
        source = to_tensor(fit(s) if s.size == (tw, th) else s.resize((w, h), Image.Resampling.BICUBIC))
    mask = None
    if row.get("edit_mask"):
        mask = (
            to_tensor(fit(load_image(row["edit_mask"], root, mode="L"), "nearest"), mask=True) > 0.5
        ).float()
    raw_boxes = row.get("object_boxes")
    boxes = np.asarray([] if raw_boxes is None else raw_boxes, dtype=np.float64).reshape(-1, 4)
    if size is not None and boxes.size:
        boxes = transform_boxes(boxes, (th, tw), (h, w))
    return {
        "id": row.get("id"),
        "task": row["task"],
        "instruction": row.get("instruction") or row.get("caption") or "",
        "ocr_target": row.get("ocr_target"),
        "target": to_tensor(fit(load_image(row["target"], root))),
        "source": source,
        "references": [to_tensor(r) for r in refs],
        "edit_mask": mask,
        "object_boxes": torch.as_tensor(boxes, dtype=torch.float32),
    }


def judge_many(
    preds: Sequence[torch.Tensor], samples: Sequence[Mapping[str, Any]], ocr: Any = None, **kwargs: Any
) -> list[JudgeResult]:
    """:func:`judge` over aligned lists of predictions and samples."""
    if len(preds) != len(samples):
        raise ValueError(f"{len(preds)} predictions for {len(samples)} samples")
    return [judge(p, s, ocr, **kwargs) for p, s in zip(preds, samples)]
