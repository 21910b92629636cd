"""Face parts of the §3.7 consistency loss: alignment, weight hashes, SFace conversion, detectors, facexlib
loaders (random state dicts under facexlib's file names) and ``rededit-data faces``.

Real photos come with installed packages: scikit-image's ``astronaut`` (Eileen Collins) and ``camera``
(the cameraman), matplotlib's ``grace_hopper.jpg``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rededit.models.faces import (
    ARCFACE_TEMPLATE_112,
    SFaceIdentity,
    YuNetDetector,
    align_faces,
    estimate_similarity,
    warp_affine,
)
from rededit.models.faces.weights import (
    SFACE_SHA256,
    YUNET_SHA256,
    check_sha256,
    default_sface_path,
)
from rededit.utils.io import sha256_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def photos() -> dict[str, np.ndarray]:
    """Three different people, RGB uint8."""
    import matplotlib.cbook as cbook
    import skimage.data
    from PIL import Image

    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    return {
        "astronaut": skimage.data.astronaut(),
        "hopper": np.ascontiguousarray(hopper),
        "cameraman": np.repeat(skimage.data.camera()[..., None], 3, axis=2),
    }


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


@pytest.fixture(scope="module")
def sface() -> SFaceIdentity:
    return SFaceIdentity()


# ---------------------------------------------------------------------------------------------- alignment
def _similarity(angle: float, scale: float, tx: float, ty: float) -> torch.Tensor:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return torch.tensor([[c, -s, tx], [s, c, ty]], dtype=torch.float32)


def test_known_similarity_is_recovered() -> None:
    truth = _similarity(0.3, 2.5, 140.0, 60.0)  # template → image
    pts = ARCFACE_TEMPLATE_112 @ truth[:, :2].T + truth[:, 2]
    m = estimate_similarity(pts, ARCFACE_TEMPLATE_112)  # image → template: the inverse
    back = pts @ m[:, :2].T + m[:, 2]
    assert torch.allclose(back, ARCFACE_TEMPLATE_112, atol=1e-3)
    inv = torch.linalg.inv(torch.cat([truth, torch.tensor([[0.0, 0, 1]])]))[:2]
    assert torch.allclose(m, inv, atol=1e-4)
    # Batched, with noise: still the least-squares answer of OpenCV's estimator (no reflection).
    cv2 = pytest.importorskip("cv2")
    noisy = pts + torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    ref, _ = cv2.estimateAffinePartial2D(noisy.numpy(), ARCFACE_TEMPLATE_112.numpy(), method=cv2.LMEDS)
    got = estimate_similarity(torch.stack([noisy, pts]), ARCFACE_TEMPLATE_112)
    assert got.shape == (2, 2, 3)
    assert np.abs(got[0].numpy() - ref).max() < 0.05 * np.abs(ref).max()


def test_warp_matches_opencv_and_is_differentiable() -> None:
    cv2 = pytest.importorskip("cv2")
    img = photos()["astronaut"][:300, 100:400]
    m = _similarity(-0.2, 0.45, -20.0, 10.0)
    ref = cv2.warpAffine(img.astype(np.float32), m.numpy(), (112, 112), flags=cv2.INTER_LINEAR)
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None].requires_grad_(True)
    out = warp_affine(x, m[None], (112, 112))
    got = out[0].permute(1, 2, 0).detach().numpy()
    inner = (slice(4, -4), slice(4, -4))  # borders differ only in how the outside is blended
    assert np.abs(got[inner] - ref[inner]).mean() < 0.5 and np.abs(got[inner] - ref[inner]).max() < 3
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_multi_face_alignment_uses_each_faces_image(detector) -> None:
    p = photos()
    a, h = p["astronaut"], p["hopper"][:512, :512]
    imgs = torch.cat([to_tensor(a), to_tensor(h)])
    lm = torch.from_numpy(np.concatenate([detector.detect(a).landmarks, detector.detect(h).landmarks]))
    crops = align_faces(imgs, lm, torch.tensor([0, 1]))
    assert crops.shape == (2, 3, 112, 112)
    single = align_faces(imgs[1:], lm[1:], torch.tensor([0]))
    assert torch.allclose(crops[1], single[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"\[F, 5, 2\]"):
        align_faces(imgs, lm[:, :4], torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------- weights
def test_shipped_weight_hashes() -> None:
    assert sha256_file(default_sface_path()) == SFACE_SHA256
    from rededit.models.faces.weights import default_yunet_path

    assert sha256_file(default_yunet_path()) == YUNET_SHA256


def test_hash_mismatch_is_a_clear_error(tmp_path) -> None:
    fake = tmp_path / "sface.onnx"
    fake.write_bytes(b"not the model")
    with pytest.raises(ValueError, match=r"sha256.*expected"):
        SFaceIdentity(fake)
    with pytest.raises(ValueError, match="sha256"):
        YuNetDetector(model_path=fake)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_sha256(tmp_path / "missing.onnx", None, "x")


def test_sface_torch_matches_onnxruntime(sface) -> None:
    ort = pytest.importorskip("onnxruntime")
    crops = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = sface(crops).numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(default_sface_path()), opts, providers=["CPUExecutionProvider"])
    # The exporter left unused weight names as graph inputs; ORT wants them fed.
    feed = {
        i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        for i in sess.get_inputs()
    }
    for k in range(2):
        feed["data"] = (crops[k : k + 1].numpy() * 127.5 + 127.5).astype(np.float32)
        ref = sess.run(None, feed)[0][0]
        assert np.abs(ours[k] - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert not any(p.requires_grad for p in sface.parameters())
    sface.train()
    assert not sface.training  # frozen: stays in eval mode


def test_sface_identities_on_real_photos(detector, sface) -> None:
    p = photos()
    a = p["astronaut"]
    views = {
        "astronaut": a,
        "mirrored": np.ascontiguousarray(a[:, ::-1]),
        "shifted": np.ascontiguousarray(np.roll(a, (9, -7), axis=(0, 1))),
        "hopper": p["hopper"],
        "cameraman": p["cameraman"],
    }
    emb = {}
    for name, img in views.items():
        det = detector.detect(img)
        assert len(det) == 1, name
        with torch.no_grad():
            crop = align_faces(to_tensor(img), torch.from_numpy(det.landmarks), torch.tensor([0]))
            emb[name] = torch.nn.functional.normalize(sface(crop), dim=1)[0]
    dist = {k: float(1 - emb["astronaut"] @ v) for k, v in emb.items()}
    assert dist["astronaut"] < 1e-6
    assert dist["mirrored"] < 0.2 and dist["shifted"] < 0.2
    assert min(dist["hopper"], dist["cameraman"]) > 0.5
    assert min(dist["hopper"], dist["cameraman"]) > 4 * max(dist["mirrored"], dist["shifted"])


# ---------------------------------------------------------------------------------------------- detectors
def test_yunet_finds_one_face_per_portrait_and_none_in_coffee(detector) -> None:
    import skimage.data

    a = photos()["astronaut"]
    det = detector.detect(a)
    assert len(det) == 1 and det.landmarks.shape == (1, 5, 2) and det.landmarks.dtype == np.float32
    lm = det.landmarks[0]
    x0, y0, x1, y1 = det.boxes[0]
    assert (lm[:, 0] > x0).all() and (lm[:, 0] < x1).all() and (lm[:, 1] > y0).all() and (lm[:, 1] < y1).all()
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # ArcFace order: image-left eye / mouth corner first
    assert lm[2, 1] > lm[:2, 1].max() and lm[3:, 1].min() > lm[2, 1]  # eyes above nose above mouth
    assert len(detector.detect(skimage.data.coffee())) == 0
    pair = np.concatenate([a[:, :, :], photos()["hopper"][:512, :512]], axis=1)
    assert len(detector.detect(np.ascontiguousarray(pair))) == 2
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(a.astype(np.float32))


# ---------------------------------------------------------------------------------------------- facexlib
def _random_state(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if not v.dtype.is_floating_point:
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif k.endswith("running_var"):
            out[k] = torch.ones(v.shape)
        elif k.endswith("running_mean"):
            out[k] = torch.zeros(v.shape)
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.02
    return out


@pytest.fixture()
def no_download(monkeypatch):
    import facexlib.utils.misc as misc

    def fail(*args, **kwargs):
        raise AssertionError("facexlib tried to download")

    monkeypatch.setattr(misc, "download_url_to_file", fail)


def test_facexlib_arcface_loads_random_state_on_cpu(tmp_path, no_download) -> None:
    from facexlib.recognition.arcface_arch import Backbone

    from rededit.models.faces import ArcFaceIRSE50Identity
    from rededit.models.faces.identity import ARCFACE_IR_SE50_FILE

    with pytest.raises(FileNotFoundError, match=ARCFACE_IR_SE50_FILE):
        ArcFaceIRSE50Identity(tmp_path)
    with torch.device("meta"):
        shapes = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
    state = _random_state(shapes)
    torch.save(state, tmp_path / ARCFACE_IR_SE50_FILE)
    model = ArcFaceIRSE50Identity(tmp_path)
    loaded = model.net.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert next(model.parameters()).device.type == "cpu" and not model.training
    crops = (torch.rand(2, 3, 112, 112) * 2 - 1).requires_grad_(True)
    emb = model(crops)
    assert emb.shape == (2, 512) and torch.isfinite(emb).all()
    emb.sum().backward()
    assert crops.grad is not None and not any(p.grad is not None for p in model.parameters())


def test_facexlib_retinaface_loads_random_state(tmp_path, no_download) -> None:
    from facexlib.detection.retinaface import RetinaFace

    from rededit.models.faces import RetinaFaceDetector
    from rededit.models.faces.detectors import RETINAFACE_FILES

    name = "retinaface_mobile0.25"
    with pytest.raises(FileNotFoundError, match=r"detection_mobilenet0\.25_Final\.pth"):
        RetinaFaceDetector(tmp_path, model_name=name)
    state = _random_state(RetinaFace(network_name="mobile0.25", device="cpu"), seed=1)
    # facexlib's released checkpoints carry DataParallel's "module." prefix; its loader strips it.
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / RETINAFACE_FILES[name])
    det = RetinaFaceDetector(tmp_path, model_name=name, score_threshold=0.0)
    loaded = det.net.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    out = det.detect(photos()["astronaut"][:128, :128].copy())
    assert out.landmarks.shape == (len(out), 5, 2) and out.boxes.shape == (len(out), 4)
    assert (np.diff(out.scores) <= 0).all()


# ---------------------------------------------------------------------------------------------- CLI
def _portrait_manifest(root) -> tuple:
    """Manifest of 5 rows: astronaut, hopper, two people, no face (coffee), a missing file."""
    import skimage.data
    from PIL import Image

    from rededit.data.schema import manifest_schema

    p = photos()
    pair = np.ascontiguousarray(np.concatenate([p["astronaut"], p["hopper"][:512, :512]], axis=1))
    images = {"a": p["astronaut"], "h": p["hopper"], "pair": pair, "coffee": skimage.data.coffee()}
    rows = []
    for name, img in [*images.items(), ("gone", None)]:
        if img is not None:
            Image.fromarray(img).save(root / f"{name}.png")
        h, w = (img.shape[:2]) if img is not None else (64, 64)
        rows.append(
            {
                "id": f"row-{name}",
                "task": "portrait",
                "instruction": "keep the face",
                "target": f"{name}.png",
                "target_width": w,
                "target_height": h,
                "references": [],
                "reference_widths": [],
                "reference_heights": [],
            }
        )
    path = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema([])), path)
    return path


def test_faces_command_writes_landmarks(tmp_path, capsys) -> None:
    from rededit.cli.data import main
    from rededit.data.manifest import Manifest

    path = _portrait_manifest(tmp_path)
    assert main(["faces", "--manifest", str(path)]) == 1  # one unreadable row
    out, err = capsys.readouterr()
    assert "1 with 0 faces, 2 with 1, 1 with 2+, 1 unreadable; 4 faces" in out
    assert "row row-gone" in err
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed into place
    m = Manifest.open(path)
    assert m.table.schema.field("face_landmarks").type == pa.list_(pa.float32())
    lm = dict(zip(m.table.column("id").to_pylist(), m.table.column("face_landmarks").to_pylist()))
    assert lm["row-gone"] is None and lm["row-coffee"] == []
    assert len(lm["row-a"]) == 10 and len(lm["row-pair"]) == 20
    # The pair's faces lie one in each half (hopper's face starts at x >= 512).
    xs = np.asarray(lm["row-pair"]).reshape(2, 5, 2)[:, :, 0]
    assert sorted((xs < 512).all(1).tolist()) == [False, True]
    # Re-running replaces the column (no duplicate) and --out leaves the input alone.
    before = path.read_bytes()
    assert (
        main(["faces", "--manifest", str(path), "--out", str(tmp_path / "m2.parquet"), "--max-faces", "1"])
        == 1
    )
    assert path.read_bytes() == before
    m2 = pq.read_table(tmp_path / "m2.parquet")
    assert m2.column_names.count("face_landmarks") == 1
    assert len(m2.column("face_landmarks").to_pylist()[2]) == 10


def test_faces_command_bad_input(tmp_path, capsys) -> None:
    from rededit.cli.data import main

    assert main(["faces", "--manifest", str(tmp_path / "nope.parquet")]) == 2
    path = _portrait_manifest(tmp_path)
    assert main(["faces", "--manifest", str(path), "--detector", "retinaface"]) == 2
    assert "--model-rootpath" in capsys.readouterr().err
