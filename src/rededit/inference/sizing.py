"""Image sizes for an editor: sides that are multiples of its token size, capped by its training buckets.

The backbone needs sides that are multiples of ``m = vae.downsample × backbone.patch_size`` (one token per
``m × m`` pixels). Inputs are mapped either to the bucket of the editor's training bucket set that their size
falls in (``data.buckets`` of the saved config; eq. (1) of the report via
:meth:`rededit.data.buckets.ResolutionSet.assign`), or, without buckets, to their own size rounded to ``m``
under an area cap (the training buckets' largest area, else 1024² px, report Table 1 SFT).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from rededit.data.buckets import ResolutionSet

DEFAULT_T2I_SIZE = 64
DEFAULT_MAX_AREA = 1024 * 1024


def size_multiple(editor: Any) -> int:
    """``m = vae.downsample × backbone.patch_size``: image sides must be multiples of it."""
    return int(editor.vae.downsample) * int(editor.backbone.patch_size)


def bucket_max_area(cfg: DictConfig | None) -> int | None:
    """Largest pixel area of the config's training bucket set (``data.buckets``), or None."""
    node = OmegaConf.select(cfg, "data.buckets") if cfg is not None else None
    if node is None:
        return None
    res = ResolutionSet.from_config(OmegaConf.to_container(node, resolve=True)).resolutions
    return int((res[:, 0] * res[:, 1]).max())


def fit_size(height: int, width: int, multiple: int, max_area: int | None) -> tuple[int, int]:
    """``(h, w)``: scaled down (aspect kept) to at most ``max_area`` pixels, then rounded to ``multiple``.

    Rounding is to the nearest multiple (at least one), except that a capped size is floored so the area
    stays within the cap.
    """
    h, w = float(height), float(width)
    capped = max_area is not None and h * w > max_area
    if capped:
        s = math.sqrt(max_area / (h * w))
        h, w = h * s, w * s
    rnd = math.floor if capped else round
    return max(1, rnd(h / multiple)) * multiple, max(1, rnd(w / multiple)) * multiple


def editor_buckets(editor: Any) -> dict[str, Any] | None:
    """The ``data.buckets`` node of the editor's saved config (plain dict), or None."""
    cfg = getattr(editor, "inference_config", None)
    node = OmegaConf.select(cfg, "data.buckets") if cfg is not None else None
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def sizes_fn(
    editor: Any, buckets: Mapping[str, Any] | None, max_area: int | None = None
) -> Callable[[Sequence[tuple[int, int]]], list[tuple[int, int]]]:
    """``[(h, w)] → [(h, w)]``: the bucket each size maps to (eq. (1)), else sides rounded to ``m`` under an
    area cap (``max_area``, default 1024² px)."""
    m = size_multiple(editor)
    if buckets is None:
        cap = max_area or DEFAULT_MAX_AREA
        return lambda hw: [fit_size(int(h), int(w), m, cap) for h, w in hw]
    rs = ResolutionSet.from_config(dict(buckets))
    if rs.patch % m:
        raise ValueError(
            f"bucket patch {rs.patch} is not a multiple of vae.downsample × backbone.patch_size = {m}"
        )

    def fn(hw: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        res = rs.resolutions[rs.assign(np.asarray(hw, dtype=np.int64).reshape(-1, 2))]
        return [(int(h), int(w)) for h, w in res]

    return fn
