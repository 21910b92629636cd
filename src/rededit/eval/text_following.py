"""Does the editor follow the text? A counterfactual colour check on the synthetic bench's ``color`` rows.

An editor that learned "recolour the named object to *some* colour seen in training" (or the bench's ground
truth by heart) scores well on edit-region error without reading the instruction. This check asks for a
colour other than the ground truth's and looks where the edited object's colour goes:

1. For a ``color`` row, the source colour ``c_src`` and the ground-truth colour ``c_gt`` are the named object
   colours (:data:`~rededit.datagen.synth.scene.OBJECT_COLOURS`) nearest the mean of Picture 1 and of the
   ground truth inside the edit mask (the object's pixels; synthetic shapes are flat, so this is exact).
2. The instruction must name ``c_gt`` exactly once (as a whole word); that name is replaced by an *asked*
   colour ``c_ask`` drawn (seeded by the row id) from the named colours at least ``min_distance`` (RGB) from
   both ``c_src`` and ``c_gt``. Rows where this is not possible are counted as ``skipped``.
3. The editor edits Picture 1 with the new instruction. The item passes when the mean colour of the edit
   inside the mask (eroded by one pixel, so soft object borders do not decide) is nearer ``c_ask`` than both
   ``c_gt`` and ``c_src``.

``success`` is the pass rate over the items checked. A text-blind editor scores ≈ 0 (it paints ``c_gt`` or
leaves ``c_src``); chance among the 12 named colours is far below the issue's 0.7.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rededit.datagen.synth.scene import OBJECT_COLOURS, Colour, colour_distance
from rededit.scoring.edit_metrics import to_unit

MIN_DISTANCE = 110.0  # RGB distance between the asked colour and both the source's and the ground truth's


def nearest_colour(rgb: Sequence[float]) -> Colour:
    """The named object colour nearest ``rgb`` (0–255)."""
    x = np.asarray(rgb, dtype=np.float64)
    return min(OBJECT_COLOURS, key=lambda c: float(np.linalg.norm(x - np.asarray(c.rgb, dtype=np.float64))))


def mean_rgb(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray | None:
    """Mean colour (0–255) of ``image`` ``[3, H, W]`` in [-1, 1] where ``mask`` ``[1, H, W]`` is 1; None if empty."""
    m = mask[0] > 0.5
    if not bool(m.any()):
        return None
    return (to_unit(image)[:, m].mean(dim=1) * 255).numpy()


def erode(mask: torch.Tensor, r: int = 1) -> torch.Tensor:
    """Binary erosion of ``mask`` ``[1, H, W]`` by ``r`` pixels (the mask itself if that empties it)."""
    k = 2 * r + 1
    inner = 1 - F.max_pool2d((1 - mask.float())[None], k, stride=1, padding=r)[0]
    return inner if bool((inner > 0.5).any()) else mask


def counterfactual(
    instruction: str, c_src: Colour, c_gt: Colour, key: str, min_distance: float = MIN_DISTANCE
) -> tuple[str, Colour] | None:
    """``(instruction asking for another colour, that colour)``, or None when the row cannot be rewritten.

    The ground truth's colour name must occur exactly once as a whole word (case-insensitive), and the source's
    name must differ from it. The asked colour is drawn deterministically from ``key`` (the row id).
    """
    if c_src.name == c_gt.name:
        return None
    pattern = re.compile(rf"(?<![\w-]){re.escape(c_gt.name)}(?![\w-])", re.IGNORECASE)
    if len(pattern.findall(instruction)) != 1:
        return None
    named = {
        c.name
        for c in OBJECT_COLOURS
        if re.search(rf"(?<![\w-]){re.escape(c.name)}(?![\w-])", instruction, re.I)
    }
    choices = [
        c
        for c in OBJECT_COLOURS
        if c.name not in named
        and colour_distance(c, c_src) >= min_distance
        and colour_distance(c, c_gt) >= min_distance
    ]
    if not choices:
        return None
    asked = choices[zlib.crc32(key.encode()) % len(choices)]
    return pattern.sub(asked.name, instruction, count=1), asked


def follows(
    pred: torch.Tensor, mask: torch.Tensor, asked: Colour, c_gt: Colour, c_src: Colour
) -> bool | None:
    """Whether the edit's mean colour inside the (eroded) mask is nearer ``asked`` than ``c_gt`` and ``c_src``."""
    rgb = mean_rgb(pred, erode(mask))
    if rgb is None:
        return None
    d = {
        c.name: float(np.linalg.norm(rgb - np.asarray(c.rgb, dtype=np.float64))) for c in (asked, c_gt, c_src)
    }
    return d[asked.name] < min(d[c_gt.name], d[c_src.name])


def colour_text_following(
    samples: Sequence[Mapping[str, Any]], edit: Callable[[list[dict[str, Any]]], None]
) -> dict[str, Any]:
    """Run the check on the ``color`` samples of the demo report.

    Args:
        samples: demo-report samples (``task``, ``id``, ``text``, ``references``, ``target``, ``mask``, ``key``).
        edit: fills ``sample["pred"]`` for a list of sample dicts (the report's batched edit loop).

    Returns:
        ``{"n": checked, "passed", "success" (None if n = 0), "skipped", "items": [...]}``.
    """
    items: list[dict[str, Any]] = []
    skipped = 0
    for s in samples:
        if s["task"] != "color" or s.get("mask") is None or not s["references"]:
            continue
        src, gt = s["references"][0], s["target"]
        if src.shape != gt.shape:
            skipped += 1
            continue
        rgb_src, rgb_gt = mean_rgb(src, s["mask"]), mean_rgb(gt, s["mask"])
        if rgb_src is None or rgb_gt is None:
            skipped += 1
            continue
        c_src, c_gt = nearest_colour(rgb_src), nearest_colour(rgb_gt)
        cf = counterfactual(s["text"], c_src, c_gt, str(s["id"]))
        if cf is None:
            skipped += 1
            continue
        text, asked = cf
        items.append({**s, "text": text, "asked": asked, "c_gt": c_gt, "c_src": c_src})
    if items:
        edit(items)
    results = []
    for it in items:
        ok = follows(it["pred"], it["mask"], it["asked"], it["c_gt"], it["c_src"])
        if ok is None:
            skipped += 1
            continue
        results.append(
            {
                "id": it["id"],
                "text": it["text"],
                "asked": it["asked"].name,
                "ground_truth": it["c_gt"].name,
                "source": it["c_src"].name,
                "passed": bool(ok),
            }
        )
    passed = sum(r["passed"] for r in results)
    return {
        "n": len(results),
        "passed": passed,
        "success": passed / len(results) if results else None,
        "skipped": skipped,
        "items": results,
    }
