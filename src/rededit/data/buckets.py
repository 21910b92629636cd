"""Resolution buckets for the Multi-Condition Aware Bucket Sampler (report §3.2, eq. 1; §3.4).

A *resolution set* ``S`` is a list of patch-aligned (height, width) pairs. Every image of a sample
(the target and each ordered reference) is mapped to one member of ``S``; the sample's *bucket key*
is ``(task group, target resolution, reference resolutions in order)`` — the report's
``{task}-{img1}-...-{imgn}`` key — so every batch drawn from one bucket has identical tensor shapes
per image position, which is what diffusers' Qwen transformer requires (it reads ``img_shapes`` of
the first sample only).

Eq. (1) of the report chooses the bucket dimensions of a set of images as::

    argmin_{(h, w) in S}  sum_{i=1..n} |H_i * W_i - h * w|                                   (1)

Here each image position carries its own resolution in the key, so the sum over the sample's
images decomposes: the argmin over ``S^n`` of a sum of per-image terms is the per-image argmin. Pure
eq. (1) ignores shape (a 2:1 image would be sent to a square of equal area and lose half of itself
to the crop), so the per-image argmin is taken over the members of ``S`` whose aspect ratio is
nearest to the image's in log space (§3.2 "preserve the structural integrity of diverse spatial
layouts"): first the nearest ratio class, then eq. (1)'s minimal ``|H·W − h·w|`` within it. An
exact tie between two ratio classes is broken by eq. (1) across both classes, then by the lower index.

The image is later cover-resized to the bucket resolution and centre-cropped; the fraction of its
pixels that the crop removes is reported as the *crop loss*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rededit.data.manifest import ManifestSizes
from rededit.utils.paths import CONF_DIR

# Aspect ratios of §3.4 (height:width written as the report does, width:height → "2:1" is landscape).
DEFAULT_RATIOS: tuple[str, ...] = ("2:1", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16", "1:2")
# Two explicit resolutions whose log aspect ratios differ by less than this share one ratio class.
RATIO_TOL = 0.02
# Largest number of bits a packed bucket key may use before falling back to np.unique(axis=0).
_PACK_BITS = 62
# Offset between ratio classes in the flat eq.-(1) lookup (larger than any pixel area).
_AREA_SPAN = float(2**40)
# Images per chunk in the vectorised passes (bounds temporaries to a few tens of MiB).
_CHUNK = 1 << 20


def parse_ratio(ratio: str | float | int) -> float:
    """Width / height of a ratio written ``"W:H"`` (``"16:9"`` is landscape) or a number (w/h)."""
    if isinstance(ratio, (int, float)):
        value = float(ratio)
    else:
        text = str(ratio).strip()
        if ":" in text:
            w, h = text.split(":", 1)
            value = float(w) / float(h)
        else:
            value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"aspect ratio must be a positive 'W:H' or number, got {ratio!r}")
    return value


def parse_area(area: str | int | float) -> int:
    """Pixel area from an int, ``"512x512"``, ``"512*512"`` or ``"512^2"``."""
    if isinstance(area, (int, float)):
        value = int(area)
    else:
        text = str(area).strip().lower().replace(" ", "")
        if "^" in text:
            side, power = text.split("^", 1)
            value = round(float(side) ** float(power))
        elif "x" in text or "*" in text:
            a, b = text.replace("*", "x").split("x", 1)
            value = int(a) * int(b)
        else:
            value = int(float(text))
    if value <= 0:
        raise ValueError(f"bucket area must be positive, got {area!r}")
    return value


class ResolutionSet:
    """The predefined resolution buckets ``S`` of eq. (1).

    Args:
        resolutions: (height, width) pairs; every side must be a positive multiple of ``patch``.
        patch: VAE downsample × transformer patch size (Qwen-Image: 8 × 2 = 16); one token covers
            ``patch × patch`` pixels.
        ratio_classes: optional ``[R]`` ratio-class id per resolution (the generator passes the
            nominal ratio each resolution was made for). Without it, resolutions whose log aspect
            ratios lie within ``RATIO_TOL`` of each other share a class.
        class_log_ratios: optional ``[Q]`` log(w/h) of each class (defaults to the members' mean).

    Attributes:
        resolutions: ``[R, 2]`` int64 (h, w), duplicates removed, first occurrence kept.
        ratio_class: ``[R]`` int64 class of each resolution; classes are numbered by ascending log(w/h).
        class_log_ratio: ``[Q]`` float64 ascending log(w/h) of each class.
    """

    def __init__(
        self,
        resolutions: Sequence[Sequence[int]] | np.ndarray,
        patch: int = 16,
        *,
        ratio_classes: Sequence[int] | None = None,
        class_log_ratios: Sequence[float] | None = None,
    ):
        if int(patch) <= 0:
            raise ValueError(f"patch must be a positive int, got {patch!r}")
        self.patch = int(patch)
        res = np.asarray(resolutions, dtype=np.int64).reshape(-1, 2)
        if res.shape[0] == 0:
            raise ValueError("a resolution set needs at least one (height, width)")
        bad = np.nonzero((res <= 0).any(1) | (res % self.patch != 0).any(1))[0]
        if bad.size:
            shown = ", ".join(f"{h}x{w}" for h, w in res[bad[:8]].tolist())
            fix = ", ".join(
                f"{max(1, round(h / self.patch)) * self.patch}x{max(1, round(w / self.patch)) * self.patch}"
                for h, w in res[bad[:8]].tolist()
            )
            raise ValueError(
                f"{bad.size} bucket resolution(s) are not multiples of patch={self.patch} "
                f"(VAE downsample × transformer patch): {shown}; nearest aligned: {fix}"
            )
        _, first = np.unique(res, axis=0, return_index=True)
        keep = np.sort(first)
        self.resolutions = res[keep]
        log_ratio = np.log(self.resolutions[:, 1] / self.resolutions[:, 0])
        if ratio_classes is None:
            classes, class_lr = _cluster_ratios(log_ratio, RATIO_TOL)
        else:
            raw = np.asarray(ratio_classes, dtype=np.int64).reshape(-1)[keep]
            uniq, raw_inv = np.unique(raw, return_inverse=True)
            if class_log_ratios is None:
                lr = np.bincount(raw_inv, weights=log_ratio) / np.bincount(raw_inv)
            else:
                lr = np.asarray(class_log_ratios, dtype=np.float64)[uniq]
            order = np.argsort(lr, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            classes, class_lr = rank[raw_inv], lr[order]
        self.ratio_class = classes.astype(np.int64)
        self.class_log_ratio = class_lr.astype(np.float64)
        self.area = self.resolutions[:, 0] * self.resolutions[:, 1]
        # Eq. (1) inside a ratio class is a nearest-area lookup: the decision boundaries are the
        # midpoints between consecutive member areas. All classes' boundaries go into one sorted
        # array keyed ``class * _AREA_SPAN + area`` so one searchsorted serves every image.
        members, mids, mid_off = [], [], [0]
        for q in range(self.class_log_ratio.size):
            m = np.nonzero(self.ratio_class == q)[0]
            m = m[np.argsort(self.area[m], kind="stable")]
            members.append(m)
            a = self.area[m].astype(np.float64)
            mids.append(q * _AREA_SPAN + (a[:-1] + a[1:]) / 2.0)
            mid_off.append(mid_off[-1] + a.size - 1)
        self._members_flat = np.concatenate(members)
        self._member_off = np.concatenate([[0], np.cumsum([m.size for m in members])[:-1]]).astype(np.int64)
        self._mid_flat = np.concatenate(mids)
        self._mid_off = np.asarray(mid_off[:-1], dtype=np.int64)
        # Nearest ratio class in log space = searchsorted on the geometric midpoints of class ratios.
        self._ratio_mid = np.exp((self.class_log_ratio[:-1] + self.class_log_ratio[1:]) / 2.0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ResolutionSet:
        """Build from a mapping (a ``conf/data/buckets/*.yaml`` node).

        Either ``resolutions: [[h, w], ...]`` (explicit list) or the generator spec
        ``areas: [384x384, 512^2, 262144]`` + ``ratios: ["2:1", ..., "1:2"]`` (W:H), which makes the
        patch-aligned (h, w) closest to each area × ratio. ``patch`` defaults to 16. Other keys
        (``task_groups``, ``_target_``, ``name``) are ignored here.
        """
        cfg = dict(cfg)
        patch = int(cfg.get("patch", 16))
        if cfg.get("resolutions") is not None:
            if cfg.get("areas") is not None:
                raise ValueError("bucket config: give either 'resolutions' or 'areas'+'ratios', not both")
            return cls([tuple(int(v) for v in r) for r in cfg["resolutions"]], patch=patch)
        if cfg.get("areas") is None:
            raise ValueError(
                "bucket config needs 'resolutions: [[h, w], ...]' or 'areas: [...]' (+ 'ratios')"
            )
        areas = [parse_area(a) for a in cfg["areas"]]
        ratios = [parse_ratio(r) for r in (cfg.get("ratios") or DEFAULT_RATIOS)]
        res, classes = [], []
        for area in areas:
            for q, r in enumerate(ratios):
                # h·w ≈ area and w/h ≈ r, each side rounded to the patch grid (≥ one patch).
                h = max(1, round(math.sqrt(area / r) / patch)) * patch
                w = max(1, round(math.sqrt(area * r) / patch)) * patch
                res.append((h, w))
                classes.append(q)
        # When rounding maps two nominal ratios onto one (h, w), keep the nominal ratio it fits best.
        res_arr = np.asarray(res, dtype=np.int64)
        cls_arr = np.asarray(classes, dtype=np.int64)
        nominal = np.log(np.asarray(ratios))
        err = np.abs(np.log(res_arr[:, 1] / res_arr[:, 0]) - nominal[cls_arr])
        order = np.lexsort((np.arange(len(res)), err))
        _, first = np.unique(res_arr[order], axis=0, return_index=True)
        keep = order[first]
        # Listed by area, then by aspect ratio (tall to wide), for readable tables.
        keep = keep[np.lexsort((res_arr[keep, 1] / res_arr[keep, 0], res_arr[keep, 0] * res_arr[keep, 1]))]
        return cls(res_arr[keep], patch=patch, ratio_classes=cls_arr[keep], class_log_ratios=nominal)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ResolutionSet:
        return cls.from_config(load_bucket_config(path))

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return int(self.resolutions.shape[0])

    def __repr__(self) -> str:
        return (
            f"ResolutionSet({len(self)} resolutions, {self.class_log_ratio.size} ratios, patch={self.patch})"
        )

    def tokens(self, h: int | np.ndarray, w: int | np.ndarray) -> int | np.ndarray:
        """Visual tokens of an image: ``ceil(h * w / patch²)`` (§3.2, the summand of L_vis)."""
        p2 = self.patch * self.patch
        if isinstance(h, np.ndarray) or isinstance(w, np.ndarray):
            return (np.asarray(h, np.int64) * np.asarray(w, np.int64) + p2 - 1) // p2
        return (int(h) * int(w) + p2 - 1) // p2

    @property
    def res_tokens(self) -> np.ndarray:
        """``[R]`` tokens of each resolution in the set."""
        return self.tokens(self.resolutions[:, 0], self.resolutions[:, 1])

    def _best_in_class(self, q: np.ndarray, area: np.ndarray) -> np.ndarray:
        """Eq. (1) within ratio class ``q``: the member minimising |H·W − h·w| (smaller area on ties)."""
        pos = np.searchsorted(self._mid_flat, q * _AREA_SPAN + area, side="left")
        return self._members_flat[self._member_off[q] + (pos - self._mid_off[q])]

    def assign(self, hw: np.ndarray) -> np.ndarray:
        """Bucket resolution of each image (nearest ratio, then eq. (1)), vectorised.

        Args:
            hw: ``[K, 2]`` source (height, width).

        Returns:
            ``[K]`` int64 indices into :attr:`resolutions`.
        """
        hw = np.asarray(hw).reshape(-1, 2)
        if hw.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        if (hw <= 0).any():
            raise ValueError("image sizes must be positive; found a zero or negative height/width")
        if hw.shape[0] > _CHUNK:  # bounded float64 temporaries for 10M-image columns
            out = np.empty(hw.shape[0], dtype=np.int64)
            for lo in range(0, hw.shape[0], _CHUNK):
                out[lo : lo + _CHUNK] = self.assign(hw[lo : lo + _CHUNK])
            return out
        h = hw[:, 0].astype(np.float64)
        w = hw[:, 1].astype(np.float64)
        ratio = w / h
        area = h * w
        del h, w
        q = np.searchsorted(self._ratio_mid, ratio, side="left")
        best = self._best_in_class(q, area)
        # An image exactly between two ratio classes: eq. (1) across both, then the lower index.
        tie = np.nonzero(q < self._ratio_mid.size)[0]
        tie = tie[np.isclose(ratio[tie], self._ratio_mid[q[tie]], rtol=1e-12, atol=0.0)]
        if tie.size:
            other = self._best_in_class(q[tie] + 1, area[tie])
            mine = best[tie]
            d_mine = np.abs(self.area[mine] - area[tie])
            d_other = np.abs(self.area[other] - area[tie])
            best[tie] = np.where((d_other < d_mine) | ((d_other == d_mine) & (other < mine)), other, mine)
        return best

    @staticmethod
    def crop_loss(src_hw: np.ndarray, dst_hw: np.ndarray) -> np.ndarray:
        """Fraction of source pixels lost by cover-resizing ``src`` to ``dst`` and centre-cropping.

        Cover-resize scales by ``s = max(h/H, w/W)`` so both sides reach the target; the crop keeps
        ``h·w`` of the ``H·W·s²`` resized pixels.

        Args:
            src_hw: ``[K, 2]`` source (H, W).
            dst_hw: ``[K, 2]`` bucket (h, w).

        Returns:
            ``[K]`` float64 in [0, 1).
        """
        src = np.asarray(src_hw, dtype=np.float64).reshape(-1, 2)
        dst = np.asarray(dst_hw, dtype=np.float64).reshape(-1, 2)
        s = np.maximum(dst[:, 0] / src[:, 0], dst[:, 1] / src[:, 1])
        return 1.0 - (dst[:, 0] * dst[:, 1]) / (src[:, 0] * src[:, 1] * s * s)


def _cluster_ratios(log_ratio: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Group sorted log ratios whose consecutive gaps are < tol; classes ascend in log ratio."""
    order = np.argsort(log_ratio, kind="stable")
    srt = log_ratio[order]
    new = np.concatenate([[True], np.diff(srt) >= tol])
    cls_sorted = np.cumsum(new) - 1
    classes = np.empty_like(cls_sorted)
    classes[order] = cls_sorted
    centres = np.bincount(cls_sorted, weights=srt) / np.bincount(cls_sorted)
    return classes, centres


def load_bucket_config(name_or_path: str | Path) -> dict[str, Any]:
    """Load a bucket YAML: a name in ``conf/data/buckets/`` (``ct``) or a path to a YAML file."""
    import yaml

    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        candidate = CONF_DIR / "data" / "buckets" / f"{name_or_path}.yaml"
        if not candidate.exists():
            available = sorted(p.stem for p in (CONF_DIR / "data" / "buckets").glob("*.yaml"))
            raise FileNotFoundError(
                f"bucket set {str(name_or_path)!r} is neither a YAML file nor one of {available}"
            )
        path = candidate
    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a bucket config must be a mapping, got {type(cfg).__name__}")
    return cfg


def resolve_task_groups(task_names: Sequence[str], task_groups: Mapping[str, str] | None) -> list[str]:
    """Group name of every task.

    ``None`` keeps the report's key ``{task}-{img1}-...``: each task is its own group, so batches are
    task-pure (per-task loss logging and task weights stay exact). A mapping sends tasks to named
    groups; ``"*"`` gives the group of unlisted tasks (``{"*": "all"}`` pools every task, which only
    splits batches by shape and gives the fewest leftovers). Unlisted tasks without ``"*"`` keep
    their own name.
    """
    if task_groups is None:
        return [str(t) for t in task_names]
    default = task_groups.get("*")
    return [str(task_groups.get(t, default if default is not None else t)) for t in task_names]


@dataclass
class BucketAssignment:
    """Every manifest row's bucket, as flat numpy arrays (no Python object per row).

    Attributes:
        resset: the resolution set ``S``.
        bucket_of_row: ``[N]`` int64 bucket id of each row.
        keys: ``[B]`` bucket keys ``(group, target_res_idx, (ref_res_idx, ...))`` (a lazy property),
            bucket ids ordered by (group, number of references, target, references).
        bucket_group: ``[B]`` int64 index into ``group_names``.
        bucket_num_refs: ``[B]`` int64.
        bucket_res_idx: ``[B, 1 + K]`` int64 resolution index per image position (target first),
            ``-1`` past a bucket's references.
        bucket_tokens: ``[B]`` int64 tokens of one sample, ``sum_i ceil(h_i w_i / p²)`` (§3.2).
        tokens_per_sample: ``[N]`` int64 (``bucket_tokens[bucket_of_row]``).
        crop_loss: ``[N]`` float32 fraction of the row's source pixels (all its images) lost to crops.
        target_res_idx / target_res: ``[N]`` / ``[N, 2]`` the target's bucket resolution.
        ref_offsets: ``[N + 1]``; row ``i``'s references are ``ref_res[ref_offsets[i]:ref_offsets[i+1]]``.
        ref_res_idx / ref_res: ``[M]`` / ``[M, 2]`` each reference's bucket resolution.
        task_codes, task_names, group_names, cluster: copied from the manifest sizes.
        source_target_hw / source_ref_hw: ``[N, 2]`` / ``[M, 2]`` the original sizes.
    """

    resset: ResolutionSet
    bucket_of_row: np.ndarray
    bucket_group: np.ndarray
    bucket_num_refs: np.ndarray
    bucket_res_idx: np.ndarray
    bucket_tokens: np.ndarray
    tokens_per_sample: np.ndarray
    crop_loss: np.ndarray
    target_res_idx: np.ndarray
    target_res: np.ndarray
    ref_offsets: np.ndarray
    ref_res_idx: np.ndarray
    ref_res: np.ndarray
    task_codes: np.ndarray
    task_names: tuple[str, ...]
    group_names: tuple[str, ...]
    cluster: np.ndarray | None
    source_target_hw: np.ndarray
    source_ref_hw: np.ndarray
    _counts: np.ndarray | None = field(default=None, repr=False)
    _keys: list[tuple[str, int, tuple[int, ...]]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.bucket_of_row.shape[0])

    @property
    def num_buckets(self) -> int:
        return int(self.bucket_group.shape[0])

    def key(self, bucket: int) -> tuple[str, int, tuple[int, ...]]:
        """Bucket key ``(group, target_res_idx, (ref_res_idx, ...))``."""
        idx = self.bucket_res_idx[bucket]
        n = int(self.bucket_num_refs[bucket])
        return (
            self.group_names[int(self.bucket_group[bucket])],
            int(idx[0]),
            tuple(int(v) for v in idx[1 : 1 + n]),
        )

    @property
    def keys(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """All bucket keys (built on first access: a Python tuple per bucket)."""
        if self._keys is None:
            self._keys = [self.key(b) for b in range(self.num_buckets)]
        return self._keys

    @property
    def bucket_counts(self) -> np.ndarray:
        """``[B]`` rows per bucket."""
        if self._counts is None:
            self._counts = np.bincount(self.bucket_of_row, minlength=self.num_buckets)
        return self._counts

    def bucket_shapes(self, bucket: int) -> dict[str, Any]:
        """``{"target": (h, w), "references": [(h, w), ...]}`` every sample of ``bucket`` is served at."""
        idx = self.bucket_res_idx[bucket]
        res = self.resset.resolutions
        t = tuple(int(v) for v in res[idx[0]])
        refs = [tuple(int(v) for v in res[i]) for i in idx[1 : 1 + int(self.bucket_num_refs[bucket])]]
        return {"target": t, "references": refs}

    def key_str(self, bucket: int) -> str:
        """Readable key ``group-HxW-HxW...`` (the report's ``{task}-{img1}-...-{imgn}``)."""
        shapes = self.bucket_shapes(bucket)
        parts = [f"{h}x{w}" for h, w in [shapes["target"], *shapes["references"]]]
        return "-".join([self.group_names[int(self.bucket_group[bucket])], *parts])

    def crop_loss_at(self, rows: np.ndarray, buckets: np.ndarray) -> np.ndarray:
        """``[K]`` crop loss of ``rows`` when served at ``buckets`` (used for merged leftovers)."""
        rows = np.asarray(rows, dtype=np.int64)
        buckets = np.asarray(buckets, dtype=np.int64)
        res = self.resset.resolutions
        t_src = self.source_target_hw[rows].astype(np.float64)
        t_dst = res[self.bucket_res_idx[buckets, 0]]
        lost = ResolutionSet.crop_loss(t_src, t_dst) * t_src[:, 0] * t_src[:, 1]
        total = t_src[:, 0] * t_src[:, 1]
        n = self.ref_offsets[rows + 1] - self.ref_offsets[rows]
        if n.sum() > 0:
            owner = np.repeat(np.arange(rows.size), n)
            pos = np.arange(owner.size) - np.repeat(np.cumsum(n) - n, n)
            src = self.source_ref_hw[self.ref_offsets[rows][owner] + pos].astype(np.float64)
            dst = res[self.bucket_res_idx[buckets[owner], 1 + pos]]
            a = src[:, 0] * src[:, 1]
            lost += np.bincount(owner, weights=ResolutionSet.crop_loss(src, dst) * a, minlength=rows.size)
            total += np.bincount(owner, weights=a, minlength=rows.size)
        return lost / total


def _bits(n: int) -> int:
    return max(1, int(n).bit_length())


def assign_buckets(
    sizes: ManifestSizes,
    resset: ResolutionSet,
    task_groups: Mapping[str, str] | None = None,
) -> BucketAssignment:
    """Bucket every manifest row (vectorised; ~10M rows in a few seconds).

    Each image gets its resolution from :meth:`ResolutionSet.assign` (nearest ratio, eq. (1)); the
    row's key ``(group, target idx, ref idxs...)`` is packed into one int64 (group | #refs | target |
    refs, ``ceil(log2 R)`` bits per image) and ``np.unique`` numbers the keys; keys that do not fit in
    62 bits fall back to ``np.unique(axis=0)`` on the ``[N, 3 + K]`` key matrix.

    Args:
        sizes: columnar manifest sizes (``Manifest.sizes()``).
        resset: the resolution set ``S``.
        task_groups: task → group mapping (see :func:`resolve_task_groups`); ``None`` = task itself.
    """
    n = len(sizes)
    offsets = np.asarray(sizes.ref_offsets, dtype=np.int64)
    n_refs = np.diff(offsets)
    m = int(offsets[-1]) if offsets.size else 0
    k_max = int(n_refs.max()) if n > 0 else 0
    t_idx = resset.assign(sizes.target_hw)
    r_idx = resset.assign(sizes.ref_hw[:m])
    groups_per_task = resolve_task_groups(sizes.task_names, task_groups)
    group_names = tuple(sorted(set(groups_per_task)))
    code_of_task = np.asarray([group_names.index(g) for g in groups_per_task] or [0], dtype=np.int64)
    g_code = code_of_task[np.asarray(sizes.task_codes, dtype=np.int64)] if n else np.zeros(0, np.int64)

    # [N, K] reference resolution index per position (0 past the row's count; the count is in the key).
    owner = np.repeat(np.arange(n, dtype=np.int64), n_refs)
    pos = np.arange(m, dtype=np.int64) - offsets[owner]
    ref_mat = np.zeros((n, k_max), dtype=np.int16 if len(resset) < 2**15 else np.int64)
    ref_mat[owner, pos] = r_idx
    del owner, pos

    rbits, cbits, gbits = _bits(len(resset) - 1), _bits(k_max), _bits(len(group_names) - 1)
    if gbits + cbits + (1 + k_max) * rbits <= _PACK_BITS:
        key = g_code.copy()
        key <<= cbits
        key |= n_refs
        key <<= rbits
        key |= t_idx
        for j in range(k_max):
            key <<= rbits
            key |= ref_mat[:, j].astype(np.int64)
        if gbits + cbits + (1 + k_max) * rbits <= 31:
            key = key.astype(np.int32)  # a 32-bit sort is faster and halves the memory
        _, bucket_of_row = np.unique(key, return_inverse=True)
        del key
    else:
        mat = np.concatenate([g_code[:, None], n_refs[:, None], t_idx[:, None], ref_mat.astype(np.int64)], 1)
        _, bucket_of_row = np.unique(mat, axis=0, return_inverse=True)
        del mat
    bucket_of_row = bucket_of_row.reshape(-1).astype(np.int64)
    n_buckets = int(bucket_of_row.max()) + 1 if n else 0
    rep = np.empty(n_buckets, dtype=np.int64)
    rep[bucket_of_row] = np.arange(n, dtype=np.int64)  # any row of each bucket represents it

    b_nrefs = n_refs[rep]
    b_res = np.full((n_buckets, 1 + k_max), -1, dtype=np.int64)
    b_res[:, 0] = t_idx[rep]
    if k_max:
        refs_rep = ref_mat[rep].astype(np.int64)
        live = np.arange(k_max)[None, :] < b_nrefs[:, None]
        b_res[:, 1:] = np.where(live, refs_rep, -1)
    res_tok = resset.res_tokens
    b_tokens = np.where(b_res >= 0, res_tok[np.maximum(b_res, 0)], 0).sum(1).astype(np.int64)
    b_group = g_code[rep]

    # Crop loss per row, weighted by pixels over all of the row's images (chunked over images).
    res = resset.resolutions
    lost = np.zeros(n, dtype=np.float64)
    total = np.zeros(n, dtype=np.float64)
    for lo in range(0, n, _CHUNK):
        src = np.asarray(sizes.target_hw[lo : lo + _CHUNK], dtype=np.float64)
        a = src[:, 0] * src[:, 1]
        lost[lo : lo + _CHUNK] = ResolutionSet.crop_loss(src, res[t_idx[lo : lo + _CHUNK]]) * a
        total[lo : lo + _CHUNK] = a
    if m:
        for lo in range(0, m, _CHUNK):
            hi = min(m, lo + _CHUNK)
            # owner row of each reference in [lo, hi): offsets are sorted, so searchsorted finds it.
            owner = np.searchsorted(offsets, np.arange(lo, hi, dtype=np.int64), side="right") - 1
            src = np.asarray(sizes.ref_hw[lo:hi], dtype=np.float64)
            a = src[:, 0] * src[:, 1]
            first, span = int(owner[0]), int(owner[-1] - owner[0] + 1)
            local = owner - first  # owners are sorted: bincount over the chunk's own row span
            lost[first : first + span] += np.bincount(
                local, weights=ResolutionSet.crop_loss(src, res[r_idx[lo:hi]]) * a, minlength=span
            )
            total[first : first + span] += np.bincount(local, weights=a, minlength=span)
    crop = (lost / np.maximum(total, 1.0)).astype(np.float32)
    del lost, total

    return BucketAssignment(
        resset=resset,
        bucket_of_row=bucket_of_row,
        bucket_group=b_group,
        bucket_num_refs=b_nrefs,
        bucket_res_idx=b_res,
        bucket_tokens=b_tokens,
        tokens_per_sample=b_tokens[bucket_of_row],
        crop_loss=crop,
        target_res_idx=t_idx,
        target_res=res[t_idx].astype(np.int32),
        ref_offsets=offsets,
        ref_res_idx=r_idx,
        ref_res=res[r_idx].astype(np.int32),
        task_codes=np.asarray(sizes.task_codes),
        task_names=tuple(sizes.task_names),
        group_names=group_names,
        cluster=sizes.cluster,
        source_target_hw=np.asarray(sizes.target_hw),
        source_ref_hw=np.asarray(sizes.ref_hw[:m]),
    )
