"""Content validity & artifact removal (report §2.2.3) and the learned-filter slot (§2.2.4–2.2.5).

Offline detectors:

* :class:`TextOverlayFilter` — visible text via the OCR backends of :mod:`rededit.scoring.ocr` (rapidocr /
  easyocr / tesseract, loaded lazily once per worker); drops a row when recognised text boxes cover more
  than ``max_area`` of the image or hold more than ``max_chars`` characters.
* :class:`CodeFilter` — QR codes (``cv2.QRCodeDetector``) and 1-D barcodes (``cv2.barcode.BarcodeDetector``).
* :class:`LayoutArtifactFilter` — image statistics, no weights: collages (long straight discontinuity lines
  across the image interior), uniform borders / letterboxes, mosaics (pixelation blocks).
* :class:`LearnedScoreFilter` — the pluggable slot for learned detectors (watermark, AIGC, aesthetics, IQA):
  any torch module (a Hydra ``_target_``) with weights from a local safetensors checkpoint, one score per
  image, a threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from rededit.datagen.engine.filters.common import load_rgb, map_kept, to_gray
from rededit.datagen.engine.filters.embedders import (
    describe_callable,
    images_to_tensor,
    load_safetensors_module,
)
from rededit.datagen.engine.stage import BaseEngineStage, StageContext, apply_drops, set_column
from rededit.scoring.ocr import build_ocr_backend


def _reasons(
    stage: BaseEngineStage, results: list[Any], errors: list[str | None], why: Callable[[Any], str | None]
):
    out = []
    for res, err in zip(results, errors):
        if err is not None:
            out.append(stage.drop(err))
        elif res is None:
            out.append(None)
        else:
            w = why(res)
            out.append(stage.drop(w) if w else None)
    return out


# ------------------------------------------------------------------------------------------ text overlay
class TextOverlayFilter(BaseEngineStage):
    """Drop images with visible text overlays (report §2.2.3), read by an OCR backend.

    Args:
        backend: :func:`rededit.scoring.ocr.build_ocr_backend` name (``rapidocr``, ``easyocr``, ``tesseract``).
        backend_kwargs: the backend's constructor arguments.
        min_confidence: ignore OCR items below this confidence.
        max_area: drop when text boxes cover more than this fraction of the image.
        max_chars: drop when more characters than this are recognised (None: area only).
        skip_tasks: tasks whose targets legitimately contain text (text editing) are not filtered.
        max_side: analysis size.
    Columns: ``<name>_area`` (fraction), ``<name>_chars``.
    """

    name = "text_overlay"
    needs_model = True

    def __init__(
        self,
        backend: str = "rapidocr",
        backend_kwargs: dict[str, Any] | None = None,
        min_confidence: float = 0.5,
        max_area: float = 0.01,
        max_chars: int | None = 12,
        skip_tasks: Sequence[str] = (),
        max_side: int = 512,
        name: str = "text_overlay",
    ):
        self.name = name
        self.backend = backend
        self.backend_kwargs = dict(backend_kwargs or {})
        self.min_confidence = float(min_confidence)
        self.max_area = float(max_area)
        self.max_chars = None if max_chars is None else int(max_chars)
        self.skip_tasks = list(skip_tasks)
        self.max_side = int(max_side)
        self._ocr = None

    def setup(self) -> None:
        if self._ocr is None:
            self._ocr = build_ocr_backend(self.backend, **self.backend_kwargs)

    def __getstate__(self):
        return {**self.__dict__, "_ocr": None}

    def measure(self, rgb: np.ndarray) -> dict[str, float]:
        """Text-box area fraction (union on a pixel grid) and character count of one image."""
        self.setup()
        h, w = rgb.shape[:2]
        cover = np.zeros((h, w), bool)
        chars = 0
        for r in self._ocr.read(rgb):
            if r.confidence < self.min_confidence:
                continue
            xs = [p[0] for p in r.box]
            ys = [p[1] for p in r.box]
            x0, x1 = max(0, int(min(xs))), min(w, int(np.ceil(max(xs))))
            y0, y1 = max(0, int(min(ys))), min(h, int(np.ceil(max(ys))))
            cover[y0:y1, x0:x1] = True
            chars += len(r.text.strip().replace(" ", ""))
        return {"area": float(cover.mean()), "chars": chars}

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        tasks = table.column("task").to_pylist()
        skip = set(self.skip_tasks)
        res, err = map_kept(
            table.append_column("_row", pa.array(range(table.num_rows))),
            lambda row: (
                None
                if tasks[row["_row"]] in skip
                else self.measure(load_rgb(row["target"], ctx.root, self.max_side))
            ),
            columns=("id", "target", "_row"),
        )

        def why(m):
            if m["area"] > self.max_area:
                return "text_area"
            if self.max_chars is not None and m["chars"] > self.max_chars:
                return "text_chars"
            return None

        reasons = _reasons(self, res, err, why)
        table = set_column(table, f"{self.name}_area", pa.array([r and r["area"] for r in res], pa.float32()))
        table = set_column(table, f"{self.name}_chars", pa.array([r and r["chars"] for r in res], pa.int32()))
        return apply_drops(table, reasons)


# ----------------------------------------------------------------------------------- QR codes, barcodes
class CodeFilter(BaseEngineStage):
    """Drop images containing QR codes or 1-D barcodes (OpenCV detectors, no weights; report §2.2.3).

    A QR code counts when ``QRCodeDetector.detect`` finds its finder pattern, decoded or not (a cropped or
    low-resolution code is still an artifact). Columns ``<name>_qr``, ``<name>_barcode`` (bool).
    """

    name = "codes"

    def __init__(self, qr: bool = True, barcode: bool = True, max_side: int = 1024, name: str = "codes"):
        self.name = name
        self.qr = bool(qr)
        self.barcode = bool(barcode)
        self.max_side = int(max_side)

    def detect(self, rgb: np.ndarray) -> dict[str, bool]:
        import cv2

        gray = np.ascontiguousarray(to_gray(rgb).clip(0, 255).astype(np.uint8))
        found = {"qr": False, "barcode": False}
        if self.qr:
            ok, pts = cv2.QRCodeDetector().detect(gray)
            found["qr"] = bool(ok and pts is not None)
        if self.barcode and hasattr(cv2, "barcode"):
            ok = cv2.barcode.BarcodeDetector().detectMulti(gray)[0]  # (ok, points) in OpenCV 4.8+ and 5.x
            found["barcode"] = bool(ok)
        return found

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        res, err = map_kept(table, lambda row: self.detect(load_rgb(row["target"], ctx.root, self.max_side)))
        reasons = _reasons(
            self, res, err, lambda d: "qr_code" if d["qr"] else ("barcode" if d["barcode"] else None)
        )
        for k in ("qr", "barcode"):
            table = set_column(table, f"{self.name}_{k}", pa.array([r and r[k] for r in res], pa.bool_()))
        return apply_drops(table, reasons)


# ------------------------------------------------------------------------- collage, borders, mosaic
def seam_score(gray: np.ndarray, margin: float = 0.1) -> tuple[float, float]:
    """Strength of the strongest straight vertical / horizontal discontinuity line in the interior.

    For each column boundary x, ``d[x]`` = median over rows of ``|Y[:, x] - Y[:, x-1]|``: a natural edge
    crosses a column in few rows (median ≈ 0), a collage seam in nearly all of them. Returns
    ``(max d over interior boundaries, same for rows)`` in luma units 0..255.
    """

    def axis_score(g: np.ndarray) -> float:
        w = g.shape[1]
        if w < 8:
            return 0.0
        d = np.median(np.abs(np.diff(g, axis=1)), axis=0)  # [W-1]
        lo, hi = int(w * margin), int(np.ceil(w * (1 - margin)))
        return float(d[lo:hi].max()) if hi > lo else 0.0

    return axis_score(gray), axis_score(gray.T)


def border_fraction(gray: np.ndarray, std_max: float = 2.0) -> float:
    """Largest fraction of the image (per side) taken by a uniform border band (std of a line ≤ ``std_max``)."""
    h, w = gray.shape
    best = 0.0
    for lines, n in ((gray, h), (gray[::-1], h), (gray.T, w), (gray.T[::-1], w)):
        std = lines.std(axis=1)
        ref = lines[0].mean()
        k = 0
        while k < n and std[k] <= std_max and abs(lines[k].mean() - ref) <= 2 * std_max:
            k += 1
        best = max(best, k / n)
    return best


def mosaic_fraction(gray: np.ndarray, tile: int = 32) -> float:
    """Fraction of (textured) tiles that look pixelated: piecewise constant along both axes.

    In a mosaic tile most column boundaries show no change in any row and a few (the block edges, ≥ 1/16 of
    them) change in most rows; natural texture changes a little everywhere. Flat tiles count as neither.
    """
    h, w = gray.shape
    hits = textured = 0
    for y in range(0, h - tile + 1, tile):
        for x in range(0, w - tile + 1, tile):
            t = gray[y : y + tile, x : x + tile]
            ok = True
            for g in (t, t.T):
                act = (np.abs(np.diff(g, axis=1)) > 1.0).mean(axis=0)  # [tile-1] activity per boundary
                if (act > 0.3).mean() < 1 / 16:
                    ok = False  # no block edges: flat or non-blocky along this axis
                    break
                if (act < 0.05).mean() < 0.6:
                    ok = False  # changes everywhere: natural texture
            if np.abs(np.diff(t, axis=1)).mean() > 0.5 or np.abs(np.diff(t, axis=0)).mean() > 0.5:
                textured += 1
                hits += ok
    return hits / textured if textured else 0.0


class LayoutArtifactFilter(BaseEngineStage):
    """Collage, uniform-border and mosaic detection from image statistics (report §2.2.3).

    Args:
        seam_min: drop as ``collage`` when the strongest interior straight line has median luma jump ≥ this.
        border_max: drop as ``border`` when a uniform band takes more than this fraction of a side.
        mosaic_max: drop as ``mosaic`` when more than this fraction of textured tiles is pixelated.
        max_side: analysis size (bilinear downscale for seams and borders, nearest-neighbour for mosaics
            so pixelation blocks stay blocks). ``seam_min=30`` keeps photos with long man-made edges (the
            skimage ``rocket`` tower scores 23; collages of two photos score 55–70).
    Columns ``<name>_seam``, ``<name>_border``, ``<name>_mosaic``.
    """

    name = "layout"

    def __init__(
        self,
        seam_min: float | None = 30.0,
        border_max: float | None = 0.05,
        mosaic_max: float | None = 0.05,
        max_side: int = 384,
        name: str = "layout",
    ):
        self.name = name
        self.seam_min = seam_min
        self.border_max = border_max
        self.mosaic_max = mosaic_max
        self.max_side = int(max_side)

    def measure(self, rgb: np.ndarray) -> dict[str, float]:
        """Seam strength (luma jump), border fraction and mosaic tile fraction of one ``[H, W, 3]`` image."""
        img = Image.fromarray(rgb)
        smooth = nearest = img
        if max(img.size) > self.max_side:
            s = self.max_side / max(img.size)
            size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
            # seams/borders on a smooth downscale (no aliasing spikes); mosaic on a nearest one (blocks stay flat)
            smooth, nearest = img.resize(size, Image.BILINEAR), img.resize(size, Image.NEAREST)
        gray = to_gray(np.asarray(smooth))
        return {
            "seam": max(seam_score(gray)),
            "border": border_fraction(gray),
            "mosaic": mosaic_fraction(to_gray(np.asarray(nearest))),
        }

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        res, err = map_kept(table, lambda row: self.measure(load_rgb(row["target"], ctx.root)))

        def why(m):
            if self.seam_min is not None and m["seam"] >= self.seam_min:
                return "collage"
            if self.border_max is not None and m["border"] > self.border_max:
                return "border"
            if self.mosaic_max is not None and m["mosaic"] > self.mosaic_max:
                return "mosaic"
            return None

        reasons = _reasons(self, res, err, why)
        for k in ("seam", "border", "mosaic"):
            table = set_column(table, f"{self.name}_{k}", pa.array([r and r[k] for r in res], pa.float32()))
        return apply_drops(table, reasons)


# -------------------------------------------------------------------------------- learned detectors
class LearnedScoreFilter(BaseEngineStage):
    """Pluggable learned filter (watermark, AIGC, aesthetics, IQA; report §2.2.3–2.2.5).

    ``scorer`` builds a torch module mapping ``[B, 3, S, S]`` images (in [0, 1], then ``mean``/``std``
    normalised) to one score per image (``[B]`` or ``[B, 1]``; a ``[B, C]`` output is reduced by
    ``output_index``). Weights come from the local ``checkpoint_path`` (safetensors, strict keys). Rows
    scoring on the wrong side of ``threshold`` are dropped as ``"<name>:score_above"`` (``drop_if="above"``,
    e.g. a watermark or AIGC probability) or ``"<name>:score_below"`` (``drop_if="below"``, e.g. aesthetics).
    Column ``<name>_score``.
    """

    needs_model = True

    def __init__(
        self,
        scorer: Callable[[], Any] | Any,
        checkpoint_path: str | Path | None,
        threshold: float,
        drop_if: str = "above",
        input_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        output_index: int | None = None,
        apply_sigmoid: bool = False,
        batch_size: int = 16,
        device: str = "cpu",
        max_side: int = 512,
        name: str = "learned",
    ):
        if drop_if not in ("above", "below"):
            raise ValueError(f"{name}: drop_if must be 'above' or 'below', got {drop_if!r}")
        self.name = name
        self._scorer = scorer
        self.scorer = describe_callable(scorer)
        self.checkpoint_path = None if checkpoint_path is None else str(checkpoint_path)
        self.threshold = float(threshold)
        self.drop_if = drop_if
        self.input_size = int(input_size)
        self.mean = None if mean is None else list(mean)
        self.std = None if std is None else list(std)
        self.output_index = output_index
        self.apply_sigmoid = bool(apply_sigmoid)
        self.batch_size = int(batch_size)
        self.device = device
        self.max_side = int(max_side)
        self._module = None

    def setup(self) -> None:
        if self._module is None:
            self._module = load_safetensors_module(self._scorer, self.checkpoint_path, self.device)

    def __getstate__(self):
        return {**self.__dict__, "_module": None}

    def score(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``[B]`` float scores of ``[H, W, 3]`` uint8 images."""
        import torch

        self.setup()
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = images_to_tensor(images[i : i + self.batch_size], self.input_size, self.mean, self.std)
                y = self._module(x.to(self.device)).float()
                if y.ndim > 1 and y.shape[-1] > 1:
                    if self.output_index is None:
                        raise ValueError(f"{self.name}: scorer returns {tuple(y.shape)}; set output_index")
                    y = y[..., self.output_index]
                y = y.reshape(y.shape[0])
                out.append((torch.sigmoid(y) if self.apply_sigmoid else y).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        imgs, err = map_kept(table, lambda row: load_rgb(row["target"], ctx.root, self.max_side))
        idx = [i for i, im in enumerate(imgs) if im is not None]
        scores: list[float | None] = [None] * table.num_rows
        for i, s in zip(idx, self.score([imgs[i] for i in idx])):
            scores[i] = float(s)

        def why(s):
            bad = s > self.threshold if self.drop_if == "above" else s < self.threshold
            return f"score_{self.drop_if}" if bad else None

        reasons = _reasons(self, scores, err, why)
        table = set_column(table, f"{self.name}_score", pa.array(scores, pa.float32()))
        return apply_drops(table, reasons)
