"""Rewards of report §3.6.2: layout-aware OCR (eq. 5) on constructed OCR results, the plain OCR reward's
blindness to oversized text, preservation, the weighted mix's NaN policy, and the hack monitors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rededit.rewards import (
    CharBox,
    OCRReward,
    PreservationReward,
    Reward,
    RewardMix,
    hack_monitors,
    levenshtein_alignment,
    ocr_layout_reward,
    text_area_fraction,
)
from rededit.rewards.ocr_layout import char_elements
from rededit.scoring.ocr import OCRResult

H = 16.0  # reference character height in pixels


def _chars(text: str, x0: float = 10.0, y0: float = 20.0, h: float = H, w: float = 12.0) -> list[CharBox]:
    """A line of characters: each ``w`` wide and ``h`` tall, starting at ``(x0, y0)``."""
    return [CharBox(c, (x0 + k * w, y0, x0 + (k + 1) * w, y0 + h)) for k, c in enumerate(text)]


REF = _chars("HELLO")


# --- eq. (5) on constructed OCR results ------------------------------------------------------------------


def test_levenshtein_alignment_pairs_equal_characters():
    assert levenshtein_alignment("HELLO", "HELLO") == [(i, i) for i in range(5)]
    assert levenshtein_alignment("HELO", "HELLO") in (
        [(0, 0), (1, 1), (2, 2), (3, 4)],
        [(0, 0), (1, 1), (2, 3), (3, 4)],
    )
    assert levenshtein_alignment("XAB", "AB") == [(1, 0), (2, 1)]
    assert levenshtein_alignment("", "AB") == [] and levenshtein_alignment("abc", "xyz") == []


def test_correct_text_in_place_scores_highest():
    correct = ocr_layout_reward(_chars("HELLO"), REF, tgt_text="HELLO")
    assert correct.reward == pytest.approx(1.0) and correct.matched == 5 and correct.gate == 1.0
    # Displaced by two character heights: text is perfect, layout pays e^{-2} per character.
    displaced = ocr_layout_reward(_chars("HELLO", y0=20 + 2 * H), REF, tgt_text="HELLO")
    assert displaced.text == 1.0 and displaced.layout == pytest.approx(math.exp(-2.0))
    # The hack of §3.6.2: twice as tall (and wide), same top-left; OCR reads it perfectly.
    oversized = ocr_layout_reward(_chars("HELLO", h=2 * H, w=24.0), REF, tgt_text="HELLO")
    assert oversized.text == 1.0 and oversized.layout < 0.5 * math.exp(-0.5)
    shrunk = ocr_layout_reward(_chars("HELLO", h=H / 2, w=6.0, y0=24.0), REF, tgt_text="HELLO")
    for worse in (displaced, oversized):
        assert worse.reward < correct.reward
    # "over"-scaling only: shrunken text pays the displacement of its centres, not its scale...
    assert shrunk.layout > oversized.layout
    # ...unless the symmetric penalty is asked for.
    sym = ocr_layout_reward(
        _chars("HELLO", h=H / 2, w=6.0, y0=24.0), REF, tgt_text="HELLO", scale_penalty="symmetric"
    )
    assert sym.layout < shrunk.layout


def test_wrong_text_is_gated_and_partial_text_pays_missing_characters():
    wrong = ocr_layout_reward(_chars("WORLD"), REF, tgt_text="HELLO")  # only 'L' ... 'O'? d = 4
    assert wrong.text == pytest.approx(1 - 4 / 5) and wrong.gate == 0.0
    assert wrong.reward == pytest.approx(0.2 / 2)  # (w_text·0.2 + w_layout·0·layout) / 2
    missing = ocr_layout_reward(_chars("HELL"), REF, tgt_text="HELLO")
    assert missing.gate == 1.0 and missing.text == pytest.approx(0.8)
    assert missing.layout == pytest.approx(4 / 5)  # Σ over 4 in-place characters / |s_tgt| = 5
    assert ocr_layout_reward(_chars("WORLD"), REF, tgt_text="HELLO", gate_threshold=0.0).gate == 1.0


def test_plain_ocr_reward_cannot_see_oversized_text():
    kw = {"tgt_text": "HELLO", "w_layout": 0.0}
    correct = ocr_layout_reward(_chars("HELLO"), REF, **kw).reward
    oversized = ocr_layout_reward(_chars("HELLO", h=4 * H, w=48.0), REF, **kw).reward
    displaced = ocr_layout_reward(_chars("HELLO", x0=150.0), REF, **kw).reward
    assert correct == oversized == displaced == 1.0  # why the layout term is needed
    layout = ocr_layout_reward(_chars("HELLO", h=4 * H, w=48.0), REF, tgt_text="HELLO").reward
    assert layout < 0.6


def test_text_term_edge_cases():
    # Long predictions would make eq. (5)'s text term negative: clamped at 0.
    assert ocr_layout_reward(_chars("HELLO" * 4), REF, tgt_text="HELLO", w_layout=0).text == 0.0
    # Empty target ("remove the text"): reading nothing is perfect, reading anything is not.
    assert ocr_layout_reward([], [], tgt_text="").reward == 1.0
    assert ocr_layout_reward(_chars("AB"), [], tgt_text="").reward == 0.0
    # No reference layout: text-only fallback, layout undefined.
    fallback = ocr_layout_reward(_chars("HELLO"), None, tgt_text="HELLO")
    assert math.isnan(fallback.layout) and fallback.reward == 1.0
    # Case and punctuation follow the OCR metric's normalisation.
    assert ocr_layout_reward(_chars("hello!"), REF, tgt_text="HELLO").reward == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scale_penalty"):
        ocr_layout_reward([], [], scale_penalty="both")


def test_char_elements_from_ocr_results():
    # rapidocr-style: a line with per-character results; easyocr-style: a word box split into cells.
    line = OCRResult(
        "HI", (0, 0, 20, 10), chars=(OCRResult("H", (0, 0, 9, 10)), OCRResult("I", (11, 0, 20, 10)))
    )
    word = OCRResult("AB", (100, 0, 120, 10))
    chars = char_elements([word, line])  # reading order: left to right on one line
    assert [c.char for c in chars] == ["h", "i", "a", "b"]
    assert chars[3].box == pytest.approx((110, 0, 120, 10))
    assert [
        c.char for c in char_elements([("x", (0, 0, 4, 4)), ("y", [[5, 0], [9, 0], [9, 4], [5, 4]])])
    ] == ["x", "y"]


# --- the batch reward with a test double of the OCR backend ----------------------------------------------


class FakeOCR:
    """Test double of an OCR backend: the image's top-left pixel value picks a canned reading."""

    name = "fake"

    def __init__(self, readings: dict[int, list[OCRResult]]):
        self.readings, self.calls = readings, 0

    def read(self, image: np.ndarray) -> list[OCRResult]:
        self.calls += 1
        return self.readings[int(image[0, 0, 0])]


def _line(text, x0=10.0, y0=20.0, h=H, w=12.0) -> OCRResult:
    cs = _chars(text, x0, y0, h, w)
    return OCRResult(
        text, (cs[0].box[0], y0, cs[-1].box[2], y0 + h), chars=tuple(OCRResult(c.char, c.box) for c in cs)
    )


def _img(value: int, b_range01: bool = True) -> torch.Tensor:
    x = torch.full((3, 64, 96), value / 255.0)
    return x if b_range01 else x * 2 - 1


def test_ocr_reward_on_batch():
    fake = FakeOCR(
        {10: [_line("HELLO")], 20: [_line("HELLO", h=3 * H, w=36.0)], 30: [_line("HELLO")], 40: []}
    )
    reward = OCRReward(backend=fake)
    images = torch.stack([_img(10), _img(20), _img(40), _img(10)])
    batch = {
        "ids": ["a", "b", "c", "d"],
        "ocr_target": ["HELLO", "HELLO", "HELLO", None],
        "target": torch.stack([_img(30, False)] * 4),  # dataset range [-1, 1]
    }
    out = reward(images, batch)
    r = out["reward"]
    assert r.shape == (4,) and r.dtype == torch.float32
    assert r[0] == pytest.approx(1.0) and r[1] < 0.75 and math.isnan(r[3])
    assert r[2] == 0.0 and out["ocr_text"][2] == 0.0  # nothing read: text term 0, gate closed
    assert out["ocr_text_area"][1] > 2 * out["ocr_text_area"][0] > 0  # the hack's signature
    assert out["ocr_layout_missing"].sum() == 0
    assert fake.calls == 3 + 3  # three generated images, three references (sample d has no target text)
    reward(images, batch)
    assert fake.calls == 6 + 3  # the references are cached per (id, size)

    plain = OCRReward(backend=FakeOCR(fake.readings), w_layout=0.0)
    out = plain(images, batch)
    assert out["reward"][0] == out["reward"][1] == 1.0 and plain._backend.calls == 3  # no reference OCR


def test_ocr_reward_builds_backend_lazily_and_checks_input():
    r = OCRReward(backend="rapidocr")
    assert r._backend is None  # composing/instantiating loads no model
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        r(torch.zeros(3, 8, 8), {})
    with pytest.raises(ValueError, match="w_text"):
        OCRReward(backend=FakeOCR({}), w_text=0.0, w_layout=0.0)
    with pytest.raises(ValueError, match="ocr_target"):
        OCRReward(backend=FakeOCR({}))(torch.zeros(2, 3, 8, 8), {"ocr_target": ["a"]})


@pytest.mark.slow  # loads rapidocr's ONNX models and reads four images (~10-30 s on 2 shared cores)
def test_ocr_layout_rapidocr_end_to_end():
    pytest.importorskip("rapidocr")
    from PIL import Image, ImageDraw, ImageFont

    from rededit.scoring.ocr import build_ocr_backend

    def render(size, xy):
        im = Image.new("RGB", (256, 128), (255, 255, 255))
        ImageDraw.Draw(im).text(xy, "HELLO", fill=(0, 0, 0), font=ImageFont.load_default(size=size))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255

    gt = render(24, (20, 40))
    images = torch.stack([gt, render(56, (10, 20)), render(24, (120, 80))])  # correct, oversized, displaced
    batch = {"ids": ["s"] * 3, "ocr_target": ["HELLO"] * 3, "target": (gt * 2 - 1).expand(3, -1, -1, -1)}
    backend = build_ocr_backend("rapidocr")
    layout = OCRReward(backend=backend)(images, batch)
    plain = OCRReward(backend=backend, w_layout=0.0)(images, batch)
    assert torch.all(plain["reward"] == 1.0)  # OCR reads all three perfectly
    assert layout["reward"][0] > 0.95
    assert layout["reward"][1] < layout["reward"][0] - 0.2 and layout["reward"][2] < layout["reward"][0] - 0.2


# --- preservation ------------------------------------------------------------------------------------------


def _edit_batch(source01: torch.Tensor, mask: torch.Tensor, has=None) -> dict:
    b = source01.shape[0]
    return {
        "references": [source01 * 2 - 1],
        "edit_mask": mask,
        "has_edit_mask": torch.ones(b, dtype=torch.bool) if has is None else has,
    }


def test_preservation_reward():
    g = torch.Generator().manual_seed(0)
    src = torch.rand(4, 3, 16, 16, generator=g)
    mask = torch.zeros(4, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    img = src.clone()
    img[1, :, 4:12, 4:12] = 1 - img[1, :, 4:12, 4:12]  # changed inside the region only
    img[2, :, 0:2] = 1 - img[2, :, 0:2]  # changed outside
    img[3] = 0.5  # everything changed
    for metric in ("l1", "psnr"):
        r = PreservationReward(metric=metric)(img, _edit_batch(src, mask))["reward"]
        assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(1.0)
        assert r[2] < 1.0 and r[3] < r[2]
    no_mask = _edit_batch(src, torch.ones(4, 1, 16, 16), has=torch.tensor([True, False, True, True]))
    r = PreservationReward()(img, no_mask)["reward"]
    assert torch.isnan(r).all()  # row 1 has no mask; the others' masks cover everything (nothing outside)
    r = PreservationReward(require_mask=False)(img, no_mask)["reward"]
    assert math.isnan(r[0]) and r[1] < 1.0  # without a mask the whole image must be preserved
    t2i = PreservationReward()(img, {"references": [], "edit_mask": mask})["reward"]
    assert torch.isnan(t2i).all()


# --- the mix ----------------------------------------------------------------------------------------------


class Const(Reward):
    def __init__(self, values, extra=None):
        super().__init__()
        self.values, self.extra = values, extra or {}

    def forward(self, images, batch):
        return {"reward": torch.tensor(self.values, dtype=torch.float32), **self.extra}


def test_reward_mix_weights_and_nan_policy():
    nan = math.nan
    mix = RewardMix(
        {"ocr": Const([1.0, nan, nan], {"ocr_text": torch.ones(3)}), "vlm": Const([0.0, 0.4, nan])},
        weights={"ocr": 3.0},
    )
    out = mix(torch.zeros(3, 3, 4, 4), {})
    assert out["reward"][0] == pytest.approx(0.75)  # (3·1 + 1·0) / 4
    assert out["reward"][1] == pytest.approx(0.4)  # OCR does not apply: weight renormalised, not a 0
    assert math.isnan(out["reward"][2])  # nothing applies: NaN for the stage to drop
    assert set(out) == {"reward", "ocr", "vlm", "ocr_text"} and mix.parts["ocr"].name == "ocr"
    with pytest.raises(ValueError, match="produced by two parts"):
        RewardMix({"a": Const([1.0], {"x": torch.ones(1)}), "b": Const([1.0], {"x": torch.ones(1)})})(
            torch.zeros(1, 3, 2, 2), {}
        )
    with pytest.raises(ValueError, match="unknown rewards"):
        RewardMix({"a": Const([1.0])}, weights={"b": 1.0})


# --- hack monitors ----------------------------------------------------------------------------------------


def test_hack_monitors_on_constructed_images():
    b = torch.zeros(5, 3, 32, 32)
    b[0] = 0.95  # bright grey
    b[1] = 0.1  # dark grey
    b[2, 0] = 1.0  # saturated red
    b[3] = ((torch.arange(32).view(-1, 1) // 2 + torch.arange(32) // 2) % 2).float()  # 2-px checkerboard
    b[4] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))  # noise
    boxes = [
        [(0, 0, 16, 32)],
        [],
        None,
        [[[0, 0], [32, 0], [32, 32], [0, 32]]],
        [(0, 0, 8, 8), (4, 4, 12, 12)],
    ]
    src = b.clone()
    src[0, :, :16] = 0.0  # row 0 differs from its source in the top half
    mask = torch.zeros(5, 1, 32, 32)
    mask[0, :, :16] = 1  # ...which is the edit region: preserved outside
    m = hack_monitors(b, src, mask, boxes)
    assert set(m) == {
        "brightness",
        "saturation",
        "edge_density",
        "colour_entropy",
        "text_area_fraction",
        "preservation_outside",
    }
    assert m["brightness"][0] > 0.9 > 0.15 > m["brightness"][1]
    assert m["saturation"][2] == pytest.approx(1.0) and m["saturation"][0] == 0 and m["saturation"][1] == 0
    assert m["edge_density"][3] > 0.9 and m["edge_density"][0] == 0
    assert m["colour_entropy"][0] == 0 and m["colour_entropy"][4] > 0.8 > m["colour_entropy"][3] > 0
    assert m["text_area_fraction"][0] == pytest.approx(0.5, abs=0.05) and m["text_area_fraction"][1] == 0
    assert math.isnan(m["text_area_fraction"][2]) and m["text_area_fraction"][3] == pytest.approx(1.0)
    assert m["text_area_fraction"][4] == pytest.approx((64 + 64 - 16) / 1024, abs=0.03)  # union, not sum
    assert torch.allclose(m["preservation_outside"], torch.ones(5))
    mask[0] = 0  # the top half now counts as outside
    assert hack_monitors(b, src, mask)["preservation_outside"][0] < 0.6
    assert torch.isnan(hack_monitors(b, None)["preservation_outside"]).all()
    assert text_area_fraction(None, 4, 4) != text_area_fraction(None, 4, 4)  # NaN: not measured
