"""Acceptance tests of the data-engine filters (report §2.2): constructed images that must be kept or dropped."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine_data import (
    blurred,
    flat,
    normal_corpus,
    over_exposed,
    photo,
    reasons_by_id,
    under_exposed,
    write_manifest,
)
from rededit.datagen.engine.filters import (
    CodeFilter,
    EmbeddingDedup,
    ExactDedup,
    LayoutArtifactFilter,
    PairDedup,
    PerceptualDedup,
    PhotometricFilter,
    PixelEmbedder,
    photometric_descriptors,
)
from rededit.datagen.engine.runner import PipelineRunner


def run(stages, manifest, out, **kw):
    res = PipelineRunner(stages, out, partition_rows=kw.pop("partition_rows", 4), **kw).run(manifest)
    return res, pq.read_table(res.result_path)


def jpeg(a: np.ndarray, quality: int = 70) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


# ------------------------------------------------------------------------------------------ photometric
def test_photometric_fitted_ranges_drop_exposure_flat_and_blur(tmp_path) -> None:
    normal = normal_corpus(16)
    base = photo("astronaut")
    targets = {f"n{i:02d}": a for i, a in enumerate(normal)}
    targets |= {
        "over": over_exposed(base),
        "under": under_exposed(base),
        "flat": flat(),
        "blur": blurred(base),
    }
    manifest = write_manifest(tmp_path / "d", targets)
    res, table = run([PhotometricFilter()], manifest, tmp_path / "out")
    why = reasons_by_id(table)
    assert why["over"] == "photometric:brightness_high"
    assert why["under"] == "photometric:brightness_low"
    assert why["flat"] == "photometric:entropy_low"
    assert why["blur"] == "photometric:sharpness_low"
    assert all(why[k] is None for k in targets if k.startswith("n")), why
    # descriptors are columns, the fitted ranges are the stage state
    assert "photometric_sharpness" in table.column_names
    state = json.loads((res.out_dir / "stages" / "00_photometric" / "state.json").read_text())["state"]
    lo, hi = state["ranges"]["brightness"]
    assert lo < photometric_descriptors(base)["brightness"] < hi
    assert state["ranges"]["entropy"][1] is None  # only the low tail of entropy is filtered


def test_photometric_quantile_and_fixed_ranges(tmp_path) -> None:
    targets = {f"n{i:02d}": a for i, a in enumerate(normal_corpus(10))}
    manifest = write_manifest(tmp_path / "d", targets)
    _, table = run([PhotometricFilter(fixed={"brightness": [0.0, 0.0]})], manifest, tmp_path / "o1")
    assert set(reasons_by_id(table).values()) == {"photometric:brightness_high"}
    _, table = run([PhotometricFilter(method="quantile", q_low=0.2, q_high=0.8)], manifest, tmp_path / "o2")
    assert 1 <= sum(r is not None for r in reasons_by_id(table).values()) <= 8


def test_photometric_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="sides"):
        PhotometricFilter(sides={"loudness": "low"})
    with pytest.raises(ValueError, match="method"):
        PhotometricFilter(method="zscore")


# ------------------------------------------------------------------------------------------------ dedup
def test_exact_dedup_keeps_first_copy_and_respects_references(tmp_path) -> None:
    a, b = photo("astronaut"), photo("coffee")
    manifest = write_manifest(tmp_path / "d", {"a": a, "a_copy": a.copy(), "b": b})
    _, table = run([ExactDedup()], manifest, tmp_path / "out")
    assert reasons_by_id(table) == {"a": None, "a_copy": "exact_dedup:duplicate", "b": None}
    assert dict(zip(table["id"].to_pylist(), table["exact_dedup_of"].to_pylist()))["a_copy"] == "a"
    # same target, different source image: two different edits, not duplicates
    c = photo("chelsea")
    manifest = write_manifest(tmp_path / "p", {"e1": a, "e2": a.copy()}, references={"e1": [b], "e2": [c]})
    _, table = run([ExactDedup()], manifest, tmp_path / "out2")
    assert set(reasons_by_id(table).values()) == {None}
    _, table = run([ExactDedup(include_references=False)], manifest, tmp_path / "out3")
    assert reasons_by_id(table)["e2"] == "exact_dedup:duplicate"


def test_perceptual_dedup_finds_resized_recompressed_copies(tmp_path) -> None:
    a = photo("astronaut", 160)
    near = jpeg(np.asarray(Image.fromarray(a).resize((128, 128))), 60)
    manifest = write_manifest(
        tmp_path / "d",
        {"a": a, "b": photo("coffee"), "a_near": near, "c": photo("chelsea"), "r": photo("rocket")},
    )
    _, table = run([PerceptualDedup(max_distance=6)], manifest, tmp_path / "out", partition_rows=2)
    why = reasons_by_id(table)
    assert why == {"a": None, "b": None, "a_near": "phash_dedup:duplicate", "c": None, "r": None}
    assert all(len(h) == 16 for h in table["phash_dedup_phash"].to_pylist())  # 64-bit hashes, hex


def test_perceptual_dedup_banding_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, (30, 64)).astype(bool)
    keys = [base[i % 10] ^ (rng.random(64) < 0.04) for i in range(30)]
    stage = PerceptualDedup(max_distance=5)
    fast = sorted(stage.group(keys))
    brute = sorted(
        (i, j) for i in range(30) for j in range(i + 1, 30) if np.count_nonzero(keys[i] != keys[j]) <= 5
    )
    assert fast == brute and brute


def test_embedding_dedup_faiss_clusters_near_copies(tmp_path) -> None:
    a, b = photo("astronaut"), photo("coffee")
    brighter = np.clip(a.astype(int) + 12, 0, 255).astype(np.uint8)
    shifted = np.roll(b, 2, axis=1)
    targets = {"a": a, "b": b, "a_bright": brighter, "b_shift": shifted, "c": photo("chelsea")}
    manifest = write_manifest(tmp_path / "d", targets)
    _, table = run([EmbeddingDedup(PixelEmbedder(16), threshold=0.95)], manifest, tmp_path / "out")
    why = reasons_by_id(table)
    assert why == {
        "a": None,
        "b": None,
        "a_bright": "embed_dedup:duplicate",
        "b_shift": "embed_dedup:duplicate",
        "c": None,
    }
    of = dict(zip(table["id"].to_pylist(), table["embed_dedup_of"].to_pylist()))
    assert of["a_bright"] == "a" and of["b_shift"] == "b"


def test_embedding_dedup_with_a_torch_checkpoint(tmp_path) -> None:
    import functools

    import torch
    from safetensors.torch import save_file

    from rededit.datagen.engine.filters import TorchEmbedder

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, x):
            return self.conv(x).flatten(1)

    torch.manual_seed(0)
    ckpt = tmp_path / "emb.safetensors"
    save_file(Tiny().state_dict(), str(ckpt))
    emb = TorchEmbedder(functools.partial(Tiny), ckpt, input_size=32)
    a = photo("astronaut")
    manifest = write_manifest(tmp_path / "d", {"a": a, "a2": jpeg(a, 90), "c": photo("coffee")})
    _, table = run([EmbeddingDedup(emb, threshold=0.99)], manifest, tmp_path / "out")
    assert reasons_by_id(table) == {"a": None, "a2": "embed_dedup:duplicate", "c": None}


def _pair_case(tmp_path):
    src = photo("astronaut")
    edited = src.copy()
    edited[30:90, 30:90] = [255, 0, 0]  # a real local edit
    targets = {"identity": jpeg(src, 95), "edit": edited, "t2i": photo("coffee")}
    refs = {"identity": [src], "edit": [src]}
    return write_manifest(tmp_path / "d", targets, references=refs)


def test_pair_dedup_drops_identity_edits_only(tmp_path) -> None:
    # SSIM off here: importing torchmetrics takes ~30 s on a loaded 2-core box (the slow test covers it)
    _, table = run([PairDedup(ssim_max=None)], _pair_case(tmp_path), tmp_path / "out")
    why = reasons_by_id(table)
    assert why["identity"] is not None and why["identity"].startswith("pair_dedup:identity_")
    assert why["edit"] is None and why["t2i"] is None
    psnr = dict(zip(table["id"].to_pylist(), table["pair_dedup_psnr"].to_pylist()))
    assert psnr["t2i"] is None and psnr["identity"] > 35 > psnr["edit"]


@pytest.mark.slow
def test_pair_dedup_ssim_and_psnr_match_torchmetrics(tmp_path) -> None:
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _, table = run(
        [PairDedup(psnr_max=None, cosine_max=None, ssim_max=0.97)], _pair_case(tmp_path), tmp_path / "o"
    )
    assert reasons_by_id(table) == {"identity": "pair_dedup:identity_ssim", "edit": None, "t2i": None}
    a, b = photo("astronaut"), jpeg(photo("astronaut"), 50)
    ours = PairDedup().metrics(a, b)["psnr"]
    ta, tb = (torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].float() / 255 for x in (a, b))
    assert ours == pytest.approx(float(peak_signal_noise_ratio(ta, tb, data_range=1.0)), abs=1e-3)


def test_unreadable_image_is_dropped_not_fatal(tmp_path) -> None:
    manifest = write_manifest(tmp_path / "d", {"a": photo("astronaut"), "b": photo("coffee")})
    (tmp_path / "d" / "images" / "b_t.png").write_bytes(b"not a png")
    _, table = run([ExactDedup(), PerceptualDedup()], manifest, tmp_path / "out")
    assert reasons_by_id(table) == {"a": None, "b": "phash_dedup:unreadable"}


# ---------------------------------------------------------------------------------------------- artifacts
def _qr_photo() -> np.ndarray:
    import cv2

    a = photo("astronaut", 256)
    q = cv2.QRCodeEncoder.create().encode("https://example.com/rededit")
    q = cv2.resize(q, (116, 116), interpolation=cv2.INTER_NEAREST)  # 29 modules x 4 px
    a[20:136, 120:236] = q[..., None]
    return a


def test_code_filter_drops_qr_codes_and_barcodes(tmp_path) -> None:
    pytest.importorskip("cv2")
    from engine_data import ean13_barcode

    bar = photo("astronaut", 256)
    code = ean13_barcode()
    bar[150 : 150 + code.shape[0], 20 : 20 + code.shape[1]] = code[..., None]
    targets = {"qr": _qr_photo(), "bar": bar, "clean": photo("astronaut", 256), "cat": photo("chelsea")}
    manifest = write_manifest(tmp_path / "d", targets | {n: photo(n, 256) for n in ("coffee", "rocket")})
    _, table = run([CodeFilter()], manifest, tmp_path / "out")
    why = reasons_by_id(table)
    assert why == {
        "qr": "codes:qr_code",
        "bar": "codes:barcode",
        "clean": None,
        "cat": None,
        "coffee": None,
        "rocket": None,
    }


def _collages() -> dict[str, np.ndarray]:
    a, b = photo("astronaut", 256), photo("coffee", 256)
    side = np.concatenate([a[:, :128], b[:, 128:]], 1)
    grid = np.concatenate(
        [np.concatenate([a[:128, :128], b[:128, :128]], 1), np.concatenate([b[128:, 128:], a[128:, 128:]], 1)]
    )
    letterbox = a.copy()
    letterbox[:30] = 0
    letterbox[-30:] = 0
    mosaic = a.copy()
    face = mosaic[60:180, 80:200]
    small = Image.fromarray(face).resize((12, 12), Image.BOX)
    mosaic[60:180, 80:200] = np.asarray(small.resize((120, 120), Image.NEAREST))
    return {"collage2": side, "collage4": grid, "letterbox": letterbox, "mosaic": mosaic}


def test_layout_filter_drops_collages_borders_and_mosaics(tmp_path) -> None:
    bad = _collages()
    good = {n: photo(n, 256) for n in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")}
    manifest = write_manifest(tmp_path / "d", {**bad, **good})
    _, table = run([LayoutArtifactFilter()], manifest, tmp_path / "out")
    why = reasons_by_id(table)
    assert why["collage2"] == why["collage4"] == "layout:collage"
    assert why["letterbox"] in ("layout:border", "layout:collage")  # its bars also make straight seams
    assert why["mosaic"] == "layout:mosaic"
    assert all(why[n] is None for n in good), why
    # without seam detection the letterbox is caught by its uniform border
    _, table = run([LayoutArtifactFilter(seam_min=None)], manifest, tmp_path / "out2")
    assert reasons_by_id(table)["letterbox"] == "layout:border"


def _text_photo() -> np.ndarray:
    from PIL import ImageDraw, ImageFont

    img = Image.fromarray(photo("astronaut", 256))
    font = ImageFont.truetype("DejaVuSans-Bold.ttf", 28) if _has_font() else ImageFont.load_default(28)
    d = ImageDraw.Draw(img)
    d.text((12, 180), "SALE 50% OFF", fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(img)


def _has_font() -> bool:
    from PIL import ImageFont

    try:
        ImageFont.truetype("DejaVuSans-Bold.ttf", 10)
        return True
    except OSError:
        return False


def test_text_overlay_filter_with_offline_ocr(tmp_path) -> None:
    pytest.importorskip("rapidocr")
    pytest.importorskip("onnxruntime")
    from rededit.datagen.engine.filters import TextOverlayFilter

    targets = {"text": _text_photo(), "clean": photo("astronaut", 256), "cat": photo("chelsea", 256)}
    manifest = write_manifest(tmp_path / "d", targets, tasks={"cat": "text"})
    stage = TextOverlayFilter(backend="rapidocr", skip_tasks=["text"])
    _, table = run([stage], manifest, tmp_path / "out")
    why = reasons_by_id(table)
    assert why["text"] in ("text_overlay:text_area", "text_overlay:text_chars")
    assert why["clean"] is None and why["cat"] is None
    area = dict(zip(table["id"].to_pylist(), table["text_overlay_area"].to_pylist()))
    assert area["cat"] is None and area["text"] > 0.01


# ----------------------------------------------------------------------------------------- learned slot
def _brightness_scorer():
    import torch

    class MeanBrightness(torch.nn.Module):
        """A 1x1 conv + global mean: with the saved weights (1/3 each, bias 0) it scores mean brightness."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)

        def forward(self, x):  # [B, 3, S, S] -> [B, 1]
            return self.conv(x).mean(dim=(2, 3))

    return MeanBrightness()


def test_learned_score_filter_loads_a_safetensors_checkpoint(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from rededit.datagen.engine.filters import LearnedScoreFilter

    model = _brightness_scorer()
    with torch.no_grad():
        model.conv.weight.fill_(1 / 3)
        model.conv.bias.zero_()
    ckpt = tmp_path / "scorer.safetensors"
    save_file(model.state_dict(), str(ckpt))
    base = photo("astronaut")
    manifest = write_manifest(tmp_path / "d", {"ok": base, "bright": over_exposed(base)})
    # a freshly built (random) module: only the checkpoint makes it a brightness scorer
    stage = LearnedScoreFilter(
        _brightness_scorer, ckpt, threshold=0.7, drop_if="above", input_size=64, name="glare"
    )
    _, table = run([stage], manifest, tmp_path / "out")
    assert reasons_by_id(table) == {"ok": None, "bright": "glare:score_above"}
    scores = dict(zip(table["id"].to_pylist(), table["glare_score"].to_pylist()))
    assert scores["ok"] == pytest.approx(base.mean() / 255, abs=0.03)
    # the config hash is stable across runs (no memory addresses in it): a rerun recomputes nothing
    again = LearnedScoreFilter(
        _brightness_scorer, ckpt, threshold=0.7, drop_if="above", input_size=64, name="glare"
    )
    assert PipelineRunner([again], tmp_path / "out", partition_rows=4).run(manifest).computed("glare") == []
    # the same scorer as an aesthetics-style "drop if below" filter
    low = LearnedScoreFilter(
        _brightness_scorer, ckpt, threshold=0.7, drop_if="below", input_size=64, name="aes"
    )
    _, table = run([low], manifest, tmp_path / "out2")
    assert reasons_by_id(table) == {"ok": "aes:score_below", "bright": None}


def test_learned_score_filter_rejects_a_mismatched_checkpoint(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    from rededit.datagen.engine.filters import LearnedScoreFilter

    ckpt = tmp_path / "wrong.safetensors"
    save_file({"other.weight": torch.zeros(2)}, str(ckpt))
    with pytest.raises(RuntimeError, match=r"conv\.weight"):
        LearnedScoreFilter(_brightness_scorer, ckpt, threshold=0.5).setup()
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        LearnedScoreFilter(_brightness_scorer, tmp_path / "missing.safetensors", threshold=0.5).setup()


@pytest.mark.slow  # importing transformers' CLIP costs ~10 s here
def test_clip_embedder_loads_a_local_folder(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    from rededit.datagen.engine.filters import CLIPEmbedder

    cfg = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    emb = CLIPEmbedder(tmp_path / "clip", input_size=32)
    a = photo("astronaut")
    x = emb.embed([a, a, photo("coffee")])
    assert x.shape == (3, 16) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert x[0] @ x[1] == pytest.approx(1, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="no hub access"):
        CLIPEmbedder(tmp_path / "missing").setup()
