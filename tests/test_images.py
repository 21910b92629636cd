"""Image decoding errors and the cover-crop geometry shared by images, landmarks and boxes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rededit.data.images import (
    ImageDecodeError,
    cover_crop_params,
    load_image,
    mask_to_tensor,
    resize_to_bucket,
    to_tensor,
    transform_boxes,
    transform_points,
)
from rededit.data.uri import (
    ALLOW_ENV,
    PathOutsideRootError,
    allow_outside_root,
    outside_root_allowed,
    outside_root_allowed_here,
)


def _noise_png(w: int, h: int, seed: int = 0) -> bytes:
    # Noise does not compress, so a truncated copy is missing real pixel data, not just the trailer.
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_decodes_and_converts(tmp_path):
    Image.new("L", (12, 7), 200).save(tmp_path / "a.png")
    img = load_image("a.png", tmp_path)
    assert img.mode == "RGB" and img.size == (12, 7)
    assert load_image("a.png", tmp_path, mode=None).mode == "L"
    with pytest.raises(PathOutsideRootError, match="outside"):  # absolute URI: refused by default
        load_image(str(tmp_path / "a.png"), "/nonexistent-root")
    with outside_root_allowed_here():
        assert load_image(str(tmp_path / "a.png"), "/nonexistent-root").size == (12, 7)


def test_uris_may_not_leave_their_root_unless_allowed(tmp_path, monkeypatch):
    """The attack: ``../../etc/passwd``, absolute paths and ``file://`` in a manifest were read silently."""
    (tmp_path / "secret.png").write_bytes(b"not for you")
    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "img" / "ok.png")
    assert load_image("img/ok.png", root).size == (4, 4)
    assert load_image("img/../img/ok.png", root).size == (4, 4)  # climbs, but stays inside
    for uri in (
        "../secret.png",
        "img/../../secret.png",
        str(tmp_path / "secret.png"),
        f"file://{tmp_path}/secret.png",
    ):
        with pytest.raises(PathOutsideRootError, match=r"data\.allow_outside_root=true"):
            load_image(uri, root)
    monkeypatch.setenv(ALLOW_ENV, "1")  # data.allow_outside_root=true / --allow-outside-root
    with pytest.raises(ImageDecodeError):  # read now (and not an image)
        load_image("../secret.png", root)


def test_leaving_one_root_is_allowed_for_that_root_only(tmp_path):
    """``data.allow_outside_root=true`` had set a process-wide flag: every folder read afterwards (a benchmark in
    the sample callback, an evaluation in the same process) could climb out too. The datamodule now allows only
    its manifest's folder; the command-line escape hatch restores what was there before."""
    Image.new("RGB", (3, 3)).save(tmp_path / "outside.png")
    corpus, bench = tmp_path / "corpus", tmp_path / "bench"
    corpus.mkdir(), bench.mkdir()
    allow_outside_root(True, root=corpus)
    allow_outside_root(True, root=corpus)  # idempotent
    assert os.environ[ALLOW_ENV] == str(corpus)
    assert load_image("../outside.png", corpus).size == (3, 3)
    with pytest.raises(PathOutsideRootError):
        load_image("../outside.png", bench)
    with outside_root_allowed_here():
        assert load_image("../outside.png", bench).size == (3, 3)
    assert os.environ[ALLOW_ENV] == str(corpus)  # restored, not widened
    allow_outside_root(True, root=bench)
    assert load_image("../outside.png", bench).size == (3, 3)
    allow_outside_root(True)  # every root ...
    allow_outside_root(True, root=corpus)  # ... is not narrowed by one root
    assert outside_root_allowed() and outside_root_allowed(tmp_path / "any")
    allow_outside_root(False)
    assert not outside_root_allowed(corpus)


def test_load_image_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image not found: 'nope\.png'"):
        load_image("nope.png", tmp_path)


def test_load_image_garbage_and_truncated_raise_decode_error(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageDecodeError) as info:
        load_image("garbage.png", tmp_path)
    assert info.value.uri == "garbage.png" and info.value.reason
    assert "garbage.png" in str(info.value)

    data = _noise_png(64, 64)
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    Image.open(tmp_path / "trunc.png")  # the header alone still parses: only a full decode finds the damage
    with pytest.raises(ImageDecodeError, match=r"trunc\.png"):
        load_image("trunc.png", tmp_path)


def test_cover_crop_params_4x3_to_square():
    scale, top, left = cover_crop_params(300, 400, 256, 256)
    assert scale == pytest.approx(256 / 300)
    assert top == 0.0
    assert left == pytest.approx((400 * 256 / 300 - 256) / 2)
    # Portrait source: the crop is vertical.
    scale, top, left = cover_crop_params(400, 200, 100, 100)
    assert (scale, top, left) == (0.5, 50.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        cover_crop_params(0, 10, 10, 10)


def test_transform_points_centre_and_corners_4x3_to_square():
    src, dst = (300, 400), (256, 256)  # (H, W): 4:3 landscape into a square bucket
    pts = np.array(
        [
            [200, 150],  # centre
            [50, 0],  # top-left corner of the kept window (50 px cropped on each side)
            [350, 300],  # bottom-right corner of the kept window
            [0, 0],  # cropped away: lands left of the bucket
            [400, 300],  # cropped away: lands right of the bucket
        ],
        dtype=np.float32,
    )
    out = transform_points(pts, src, dst)
    assert out.dtype == np.float32 and out.shape == pts.shape
    crop = (400 * 256 / 300 - 256) / 2
    np.testing.assert_allclose(
        out, [[128, 128], [0, 0], [256, 256], [-crop, 0], [256 + crop, 256]], rtol=0, atol=1e-3
    )
    # Any leading shape works, e.g. landmarks [F, 5, 2].
    assert transform_points(np.zeros((3, 5, 2)), src, dst).shape == (3, 5, 2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        transform_points(np.zeros((4, 3)), src, dst)


def test_transform_boxes_clips_to_bucket():
    boxes = np.array([[0, 0, 400, 300], [0, 0, 40, 30]], dtype=np.float32)
    out = transform_boxes(boxes, (300, 400), (256, 256))
    np.testing.assert_allclose(out[0], [0, 0, 256, 256], atol=1e-3)
    assert out[1, 2] <= out[1, 0]  # box entirely in the cropped margin: zero width after clipping
    raw = transform_boxes(boxes, (300, 400), (256, 256), clip=False)
    assert raw[0, 0] < 0 and raw[0, 2] > 256


def test_resize_to_bucket_follows_transform_points():
    src_h, src_w, dst = 300, 400, (96, 96)
    arr = np.zeros((src_h, src_w), dtype=np.uint8)
    arr[100:140, 240:280] = 255  # a bright square centred at (x=260, y=120)
    out = resize_to_bucket(Image.fromarray(arr), *dst)
    assert out.size == (96, 96)
    res = np.asarray(out, dtype=np.float64)
    ys, xs = np.mgrid[0:96, 0:96]
    centroid = np.array([(res * (xs + 0.5)).sum(), (res * (ys + 0.5)).sum()]) / res.sum()
    expected = transform_points(np.array([260.0, 120.0]), (src_h, src_w), dst)
    np.testing.assert_allclose(centroid, expected, atol=0.25)


def test_resize_to_bucket_exact_sizes_and_identity():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (33, 47, 3), dtype=np.uint8))
    for h, w in [(16, 16), (64, 32), (33, 47), (20, 100)]:
        assert resize_to_bucket(img, h, w).size == (w, h)
    np.testing.assert_array_equal(np.asarray(resize_to_bucket(img, 33, 47)), np.asarray(img))
    # A binary mask stays binary with nearest resampling (by name or enum).
    mask = Image.fromarray((np.random.default_rng(2).random((30, 40)) > 0.5).astype(np.uint8) * 255)
    assert set(np.unique(np.asarray(resize_to_bucket(mask, 17, 17, resample="nearest")))) <= {0, 255}
    with pytest.raises(ValueError, match="unknown resample"):
        resize_to_bucket(img, 8, 8, resample="cubic-ish")


def test_to_tensor_range_shape_and_modes():
    arr = np.zeros((4, 5, 3), dtype=np.uint8)
    arr[0, 0] = 255
    t = to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert torch.all(t[:, 0, 0] == 1.0) and torch.all(t[:, 1:, :] == -1.0)
    assert to_tensor(Image.new("L", (5, 4), 128)).shape == (1, 4, 5)
    with pytest.raises(ValueError, match="mode 'P'"):
        to_tensor(Image.new("P", (2, 2)))


def test_mask_to_tensor_range():
    m = np.zeros((4, 6), dtype=np.uint8)
    m[:, 3:] = 255
    t = mask_to_tensor(Image.fromarray(m))
    assert t.shape == (1, 4, 6) and t.dtype == torch.float32
    assert t.min().item() == 0.0 and t.max().item() == 1.0 and t.sum().item() == 12.0
    assert mask_to_tensor(Image.fromarray(m).convert("1")).sum().item() == 12.0
    assert torch.equal(to_tensor(Image.fromarray(m), mask=True), t)
    with pytest.raises(ValueError, match="mode 'RGB'"):
        mask_to_tensor(Image.new("RGB", (2, 2)))
