"""Identity consistency loss (report §3.7, eq. 6–8): schedule, real-photo behaviour, gradients, the
``(batch, parts, stage)`` adapter of the SFT stage, the region variant, and the data path of landmarks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rededit.losses.consistency import (
    ConsistencyLoss,
    FaceIdentityLoss,
    FixedFilterBankEncoder,
    RegionFeatureLoss,
    id_loss_weight,
)
from rededit.models.faces import SFaceIdentity, YuNetDetector, estimate_similarity, warp_affine

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook
    import skimage.data
    from PIL import Image

    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "hopper": np.ascontiguousarray(hopper)}


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def faces():
    """Astronaut crop (256², face centred), its landmarks, and Grace Hopper warped onto the same landmarks."""
    det = YuNetDetector()
    p = photos()
    a_full = p["astronaut"]
    lm_full = det.detect(a_full).landmarks[0]
    cx, cy = lm_full[:2].mean(0).round().astype(int)
    x0, y0 = cx - 128, max(cy - 100, 0)
    a = np.ascontiguousarray(a_full[y0 : y0 + 256, x0 : x0 + 256])
    lm = torch.from_numpy(det.detect(a).landmarks[:1])
    h = p["hopper"]
    lm_h = torch.from_numpy(det.detect(h).landmarks[0])
    m = estimate_similarity(lm_h, lm[0])  # hopper's face → where the astronaut's face is
    hopper_here = warp_affine(to_tensor(h), m[None], (256, 256))
    return {"astronaut": to_tensor(a), "landmarks": lm, "hopper": hopper_here, "raw": a}


@pytest.fixture(scope="module")
def face_loss() -> FaceIdentityLoss:
    return FaceIdentityLoss(SFaceIdentity())


# ---------------------------------------------------------------------------------------------- eq. 6
def test_lambda_schedule() -> None:
    sigma = torch.tensor([0.0, 0.5, 0.89, 0.9, 0.95, 1.0])
    lam = id_loss_weight(sigma, eta=2.0, sigma_cutoff=0.9)
    assert torch.allclose(lam, torch.tensor([0.0, 0.5, 2 * 0.89**2, 0.0, 0.0, 0.0]))
    assert torch.equal(
        id_loss_weight(torch.tensor([0.95]), eta=1.0, sigma_cutoff=1.0), torch.tensor([0.95**2])
    )


# ---------------------------------------------------------------------------------------------- eq. 8
def test_identity_loss_on_real_photos(faces, face_loss) -> None:
    a, lm = faces["astronaut"], faces["landmarks"]
    raw = faces["raw"]
    same, n = face_loss(a, a, [lm])
    assert n.tolist() == [1.0] and same.item() < 1e-5
    mirrored = to_tensor(raw[:, ::-1])  # crop is centred on the eyes: the face stays in place
    shifted = to_tensor(np.roll(raw, (4, -3), axis=(0, 1)))
    d_mirror = face_loss(mirrored, a, [lm])[0].item()
    d_shift = face_loss(shifted, a, [lm])[0].item()
    d_other = face_loss(faces["hopper"], a, [lm])[0].item()
    assert d_mirror < 0.25 and d_shift < 0.25
    assert d_other > 0.5 and d_other > 3 * max(d_mirror, d_shift)
    # A blurry x̂_0 (what high σ gives) still carries the identity better than another person.
    blurry = torch.nn.functional.avg_pool2d(a, 5, stride=1, padding=2)
    assert face_loss(blurry, a, [lm])[0].item() < d_other / 2


def test_gradients_reach_prediction_only(faces, face_loss) -> None:
    a, lm = faces["astronaut"], faces["landmarks"]
    pred = faces["hopper"].clone().requires_grad_(True)
    target = a.clone().requires_grad_(True)  # must receive nothing: the target branch runs without autograd
    loss, _ = face_loss(pred, target, [lm])
    loss.sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    assert not any(p.requires_grad for p in face_loss.encoder.parameters())
    # φ is not part of the loss module's state (kept out of checkpoints / FSDP / EMA).
    assert list(face_loss.parameters()) == [] and face_loss.state_dict() == {}
    # Gradient is local to the face: far corners of the image get none.
    assert pred.grad[..., :20, :20].abs().sum() == 0


def test_samples_without_faces_add_exactly_zero_and_faces_average(faces, face_loss) -> None:
    a, h, lm = faces["astronaut"], faces["hopper"], faces["landmarks"]
    pred, target = torch.cat([h, h, h]), torch.cat([a, a, a])
    two = torch.cat([lm, lm + 0.0])  # the same face twice: the mean equals the single-face value
    loss, n = face_loss(pred, target, [lm, None, torch.zeros(0, 5, 2)])
    assert loss[1].item() == 0.0 and loss[2].item() == 0.0 and n.tolist() == [1, 0, 0]
    loss2, n2 = face_loss(pred[:1], target[:1], [two])
    assert n2.tolist() == [2] and torch.allclose(loss2, loss[:1], atol=1e-6)
    # Eq. 8 is a mean over faces, not a sum: one matching + one foreign face.
    pair_pred = torch.cat([a, h], dim=3)
    pair_gt = torch.cat([a, a], dim=3)
    both = torch.cat([lm, lm + torch.tensor([256.0, 0.0])])
    mean, _ = face_loss(pair_pred, pair_gt, [both])
    other, _ = face_loss(h, a, [lm])
    assert torch.allclose(mean, other / 2, atol=0.02)


# ---------------------------------------------------------------------------------------------- adapter
class _Backbone:
    """x0-prediction-free stand-in for EditBackbone's conversion (v mode): x̂0 = x_t − σ·v̂."""

    @staticmethod
    def predicted_x0(x_t, v_hat, sigma):
        return x_t - sigma.reshape(-1, 1, 1, 1) * v_hat


@pytest.fixture(scope="module")
def stage():
    from types import SimpleNamespace

    from rededit.models.vae import PixelSpaceToDepthVAE

    return SimpleNamespace(backbone=_Backbone(), vae=PixelSpaceToDepthVAE(factor=4))


def _parts(stage, target: torch.Tensor, sigma: torch.Tensor, seed: int = 0):
    x0 = stage.vae.encode(target)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    s = sigma.reshape(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    v_hat = eps - x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    return {
        "sigma": sigma,
        "x_t": x_t,
        "v_hat": v_hat.requires_grad_(True),
        "x0": x0,
        "refs": [],
        "mse": None,
    }


def test_adapter_weights_selects_and_backpropagates(faces, face_loss, stage) -> None:
    a, lm = faces["astronaut"], faces["landmarks"]
    target = torch.cat([a, a, a, a])
    sigma = torch.tensor([0.5, 0.95, 0.5, 0.3])
    batch = {"target": target, "face_landmarks": [lm[0], lm[0], None, lm[0]]}
    parts = _parts(stage, target, sigma)
    loss_fn = ConsistencyLoss(face_loss, eta=2.0, sigma_cutoff=0.9)
    out = loss_fn(batch, parts, stage)
    assert out.shape == (4,)
    assert out[1].item() == 0.0 and out[2].item() == 0.0  # σ ≥ cut-off; no face
    pred = stage.vae.decode(stage.backbone.predicted_x0(parts["x_t"], parts["v_hat"], sigma)).detach()
    for i in (0, 3):
        l_id, _ = face_loss(pred[i : i + 1], a, [lm])
        assert torch.allclose(out[i], 2.0 * sigma[i] ** 2 * l_id[0], rtol=1e-4, atol=1e-6)
        assert out[i] > 0
    assert torch.allclose(loss_fn.last_stats["id_face_fraction"], torch.tensor(0.75))
    assert torch.allclose(loss_fn.last_stats["id_active_fraction"], torch.tensor(0.5))
    out.sum().backward()
    g = parts["v_hat"].grad.flatten(1).abs().sum(1)
    assert g[0] > 0 and g[3] > 0 and g[1] == 0 and g[2] == 0


def test_adapter_exact_prediction_gives_zero_and_no_faces_skip_work(faces, face_loss, stage) -> None:
    a, lm = faces["astronaut"], faces["landmarks"]
    sigma = torch.tensor([0.4])
    parts = _parts(stage, a, sigma)
    parts["v_hat"] = ((parts["x_t"] - parts["x0"]) / 0.4).requires_grad_(True)  # x̂0 = x0 exactly
    loss_fn = ConsistencyLoss(face_loss)
    assert loss_fn({"target": a, "face_landmarks": [lm[0]]}, parts, stage).item() < 1e-5

    class Boom:
        backbone = vae = property(lambda self: (_ for _ in ()).throw(AssertionError("decoded without faces")))

    out = loss_fn({"target": a, "face_landmarks": [None]}, parts, Boom())
    assert out.tolist() == [0.0] and loss_fn.last_stats["id_face_fraction"].item() == 0.0
    with pytest.raises(ValueError, match="face_landmarks"):
        loss_fn({"target": a, "face_landmarks": [None, None]}, parts, stage)


# ---------------------------------------------------------------------------------------------- region variant
def test_region_loss_detects_a_changed_object() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 64, 64, generator=g) * 0.2 - 0.5
    target = base.clone()
    target[..., 16:40, 20:44] = torch.tensor([0.8, -0.6, 0.2]).reshape(1, 3, 1, 1)  # a red-ish square
    target[..., 24:32, 28:36] = -0.9  # with a hole: texture inside the box
    recoloured = target.clone()
    recoloured[..., 16:40, 20:44] = recoloured[..., 16:40, 20:44][:, [2, 0, 1]]
    moved = torch.roll(target, shifts=(0, 12), dims=(2, 3))
    boxes = torch.tensor([[20.0, 16.0, 44.0, 40.0]])
    loss = RegionFeatureLoss(FixedFilterBankEncoder(), crop_size=32)
    same = loss(target, target, [boxes])[0].item()
    d_col = loss(recoloured, target, [boxes])[0].item()
    d_mov = loss(moved, target, [boxes])[0].item()
    noisy = target + 0.02 * torch.randn(target.shape, generator=g)
    d_noise = loss(noisy, target, [boxes])[0].item()
    assert same < 1e-6 and d_noise < 0.05
    assert d_col > 5 * d_noise and d_mov > 5 * d_noise
    # Tiny boxes are ignored; no boxes add 0; gradients reach the prediction.
    tiny = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    out, n = loss(torch.cat([moved, moved]), torch.cat([target, target]), [tiny, None])
    assert out.tolist() == [0.0, 0.0] and n.tolist() == [0.0, 0.0]
    pred = moved.clone().requires_grad_(True)
    loss(pred, target, [boxes])[0].sum().backward()
    assert pred.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- data path
def test_dataset_carries_landmarks_through_the_bucket_crop(tmp_path) -> None:
    """Landmarks from the source image, mapped by the dataset's cover-crop/resize, land on the face that
    a detector finds in the bucket image the dataset produced; collation keeps one entry per sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from rededit.data.collate import EditCollator
    from rededit.data.dataset import EditDataset, SampleKey
    from rededit.data.manifest import Manifest
    from rededit.data.schema import manifest_schema

    det = YuNetDetector()
    src = np.ascontiguousarray(photos()["astronaut"][:300, 63:383])  # 300 × 320, face near the centre
    Image.fromarray(src).save(tmp_path / "a.png")
    Image.fromarray(src).save(tmp_path / "b.png")
    lm_src = det.detect(src).landmarks
    rows = []
    for name, lm in (("a", lm_src.reshape(-1).tolist()), ("b", None)):
        rows.append(
            {
                "id": name,
                "task": "portrait",
                "instruction": "keep",
                "target": f"{name}.png",
                "target_width": 320,
                "target_height": 300,
                "references": [],
                "reference_widths": [],
                "reference_heights": [],
                "face_landmarks": lm,
            }
        )
    pq.write_table(
        pa.Table.from_pylist(rows, schema=manifest_schema(["face_landmarks"])), tmp_path / "m.parquet"
    )
    ds = EditDataset(Manifest.open(tmp_path / "m.parquet"))
    for hw in ((256, 224), (192, 320)):  # crop the sides (and shrink) / crop top and bottom
        sample = ds[SampleKey(row=0, epoch=0, step=0, target_hw=hw, ref_hws=())]
        img = ((sample["target"].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        found = det.detect(np.ascontiguousarray(img)).landmarks
        assert sample["face_landmarks"].shape == (1, 5, 2) and len(found) == 1
        assert np.abs(sample["face_landmarks"].numpy() - found).max() < 4.0, hw
    batch = EditCollator()(
        [ds[SampleKey(row=i, epoch=0, step=0, target_hw=(256, 256), ref_hws=())] for i in (0, 1)]
    )
    assert batch["face_landmarks"][0].shape == (1, 5, 2) and batch["face_landmarks"][1] is None


def test_max_samples_draws_k_and_rescales(faces, face_loss, stage) -> None:
    a, lm = faces["astronaut"], faces["landmarks"]
    b = 4
    target = a.expand(b, -1, -1, -1).contiguous()
    sigma = torch.full((b,), 0.5)
    parts = _parts(stage, target, sigma)
    batch = {"target": target, "face_landmarks": [lm[0]] * b, "epoch": 0, "step": 3}
    full = ConsistencyLoss(face_loss)(batch, parts, stage).detach()
    capped = ConsistencyLoss(face_loss, max_samples=1, seed=7)
    out = capped(batch, parts, stage).detach()
    (hit,) = out.nonzero().flatten().tolist()
    assert torch.allclose(out[hit], b * full[hit], rtol=1e-4)  # scaled by n_eligible / K
    assert torch.equal(capped(batch, parts, stage).detach(), out)  # same (seed, epoch, step): same draw
    hits = {capped({**batch, "step": s}, parts, stage).nonzero().item() for s in range(6)}
    assert len(hits) > 1  # the draw moves with the step


def test_max_samples_draw_is_unbiased_and_favours_weighty_samples(face_loss) -> None:
    """The λ-proportional draw: E[Σ_i w_i·L_i] = Σ_i λ_i·L_i for any per-sample L, and a sample with
    λ ≈ 0 is (almost) never given φ's budget."""
    capped = ConsistencyLoss(face_loss, max_samples=2, seed=3)
    sel = torch.arange(5)
    lam = torch.tensor([0.01, 0.2, 0.5, 0.81, 0.3])
    l_id = torch.tensor([0.9, 0.1, 0.4, 0.2, 0.7])  # arbitrary per-sample identity losses
    est, hits = [], torch.zeros(5)
    for step in range(4000):
        picked, w = capped._draw(sel, lam, {"epoch": 0, "step": step}, None)
        assert picked.unique().numel() == picked.numel() <= 2
        est.append(float((w * l_id[picked]).sum()))
        hits[picked] += 1
    exact = float((lam * l_id).sum())
    assert abs(np.mean(est) - exact) < 4 * np.std(est) / np.sqrt(len(est))
    assert abs(np.mean(est) - exact) < 0.02 * exact
    assert hits[0] < 0.05 * hits[3]


# With a LoRA adapter and a FireEdit option on (issue 20): the live output layer lets gradients reach the blocks.
ADAPTER_ON = ["adapter=lora", "adapter.rank=4", "backbone.tati=true", "backbone.zero_init_output=false"]


@pytest.mark.parametrize("extra_overrides", [[], ADAPTER_ON], ids=["full", "lora+tati"])
def test_sft_stage_adds_and_logs_the_loss(faces, tmp_path, monkeypatch, extra_overrides) -> None:
    """SFTModule with ``experiment=demo_sft loss/consistency=face``: eq. 7 per sample, and the logged keys; with an
    adapter and TATI on, the loss trains the adapter and TATI and nothing else.
    (The SFace model is the process-wide converted copy: instantiating it again costs a deepcopy.)"""
    from hydra.utils import instantiate

    from conftest import compose

    cfg = compose(
        [
            "experiment=demo_sft",
            "loss/consistency=face",
            "backbone.transformer_config.num_layers=1",
            *extra_overrides,
        ],
        tmp_path,
    )
    torch.manual_seed(0)
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()
    a64 = torch.nn.functional.interpolate(faces["astronaut"], size=(64, 64), mode="bilinear", antialias=True)
    lm64 = faces["landmarks"][0] / 4
    batch = {
        "ids": ["x", "y"],
        "epoch": 0,
        "step": 0,
        "target": torch.cat([a64, a64]),
        "references": [torch.cat([a64, a64]).flip(1)],
        "text_emb": torch.randn(2, 5, 384),
        "text_mask": torch.ones(2, 5, dtype=torch.bool),
        "face_landmarks": [lm64, None],
    }
    logged: dict[str, float] = {}
    monkeypatch.setattr(stage, "log", lambda k, v, **kw: logged.__setitem__(k, float(v)))
    stage.train()
    flow, parts = stage.flow_loss(batch)
    loss, _ = stage.compute_loss(batch)
    extra = stage.auxiliary_losses["loss_id"](batch, parts, stage)
    assert extra[1].item() == 0.0
    assert torch.allclose(loss, (flow + extra).mean(), rtol=1e-5)
    assert {"train/loss_id", "train/id_face_fraction", "train/id_active_fraction"} <= set(logged)
    assert logged["train/id_face_fraction"] == 0.5
    # φ stays out of the checkpoint.
    assert not any(k.startswith("auxiliary_losses") for k in stage.state_dict())
    loss.backward()
    grads = {n for n, p in stage.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads
    if extra_overrides:
        assert {n for n, p in stage.backbone.named_parameters() if p.requires_grad} >= grads
        assert all(".lora_" in n or n.startswith("tati.") for n in grads), sorted(grads)[:3]
        assert any(".lora_B." in n for n in grads) and any(n.startswith("tati.") for n in grads)


def test_phi_cap_lives_in_the_loss_group(tmp_path) -> None:
    """The cap K is the loss group's own option (null by default: every face, eq. 8 exactly); the tiny CPU
    recipe bounds φ by overriding it there, and there is no root-level knob feeding the loss."""
    from conftest import compose

    prod = compose(["experiment=sft", "loss/consistency=face"], tmp_path / "b")
    assert prod.stage.auxiliary_losses.loss_id.max_samples is None
    assert "consistency_max_samples" not in prod
    tiny = compose(
        ["experiment=demo_sft", "loss/consistency=object", "stage.auxiliary_losses.loss_obj.max_samples=1"],
        tmp_path / "a",
    )
    assert tiny.stage.auxiliary_losses.loss_obj.max_samples == 1
