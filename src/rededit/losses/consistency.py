"""Identity consistency loss (report §3.7, eq. 6–8) and its region extension.

Eq. 6 — noise-dependent weight::

    λ_id(σ) = η·σ²   if σ < σ_cut (0.9 in the report)
              0      otherwise

Eq. 7 — per sample: ``L_total = L_mse + λ_id(σ)·L_id`` (only samples that carry faces add a term).

Eq. 8 — for the ``N`` faces of a ground-truth image, each aligned by its own transform ``T_i`` (derived
from the face's landmarks in ``x_gt``) and the *same* ``T_i`` applied to the one-step estimate
``x̂_0 = x_t − σ_t·v_t``::

    L_id = 1/N · Σ_i ( 1 − cos( φ(T_i(x̂_0)), φ(T_i(x_gt)) ) )

with ``φ`` a frozen face-recognition backbone. Gradients reach ``x̂_0`` (and so ``v_t`` and the
transformer) only through the prediction branch: ``φ`` is frozen and the target branch runs without
autograd.

The report's extension to "other universal objects" is :class:`RegionFeatureLoss`: each object's box
is resampled to a fixed size (differentiable ``roi_align``) and compared with a pluggable frozen
encoder; the default :class:`FixedFilterBankEncoder` needs no weights (see its docstring for why).

Pieces:

* :func:`id_loss_weight` — eq. 6.
* :class:`FaceIdentityLoss` / :class:`RegionFeatureLoss` — eq. 8 on pixel images ``[B, 3, H, W]`` in
  ``[-1, 1]`` plus per-sample landmarks / boxes; pure PyTorch.
* :class:`ConsistencyLoss` — the ``loss(batch, parts, stage) -> [B]`` adapter that
  :class:`~rededit.stages.sft.SFTModule` calls: it selects the samples that have regions and
  ``σ < σ_cut`` (only those are decoded and run through ``φ``), forms ``x̂_0`` with the backbone's own
  conversion, decodes it with the stage's VAE and returns ``λ_id(σ)·L_id`` per sample (0 elsewhere).
  It only duck-types the stage (``stage.backbone``, ``stage.vae``), so no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rededit.models.faces.alignment import crop_boxes, face_matrices, warp_affine
from rededit.utils.module_tree import hidden_from_tree
from rededit.utils.seeding import torch_generator


def id_loss_weight(sigma: torch.Tensor, eta: float = 1.0, sigma_cutoff: float = 0.9) -> torch.Tensor:
    """Eq. 6: ``λ_id(σ) = η·σ²`` for ``σ < σ_cut``, else 0. ``sigma`` ``[B]`` → ``[B]``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return torch.where(sigma < sigma_cutoff, eta * sigma.pow(2), torch.zeros_like(sigma))


def _on_device(module: nn.Module, like: torch.Tensor) -> nn.Module:
    p = next(module.parameters(), None)
    if p is None:
        p = next(module.buffers(), None)
    if p is not None and p.device != like.device:
        module.to(like.device)
    return module


def _gather(
    items: Sequence[torch.Tensor | None], width: tuple[int, ...], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-sample ``[K_b, *width]`` tensors (None/empty = none) → (``[K, *width]``, index ``[K]``)."""
    values, index = [], []
    for b, item in enumerate(items):
        if item is None:
            continue
        item = torch.as_tensor(item, dtype=torch.float32).reshape(-1, *width)
        if item.shape[0]:
            values.append(item)
            index.append(torch.full((item.shape[0],), b, dtype=torch.long))
    if not values:
        return torch.zeros((0, *width), device=device), torch.zeros((0,), dtype=torch.long, device=device)
    return torch.cat(values).to(device), torch.cat(index).to(device)


def _per_sample_mean(
    values: torch.Tensor, index: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values [K]`` per sample (eq. 8's ``1/N Σ_i``) → (``[B]`` means, 0 where none; ``[B]`` counts)."""
    sums = torch.zeros(batch, device=values.device, dtype=values.dtype).index_add(0, index, values)
    counts = torch.zeros(batch, device=values.device, dtype=values.dtype).index_add(
        0, index, torch.ones_like(values)
    )
    return sums / counts.clamp_min(1), counts


class _RegionCosineLoss(nn.Module):
    """Shared eq. 8 machinery: crop regions of predicted and target images, encode, mean cosine distance."""

    batch_key: str
    fraction_name: str
    width: tuple[int, ...]

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self._encoder = hidden_from_tree(
            encoder.requires_grad_(False).eval()
        )  # follows inputs lazily (_on_device)

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def crops(self, images: torch.Tensor, regions: torch.Tensor, index: torch.Tensor, matrices=None):
        raise NotImplementedError

    def prepare(self, regions: torch.Tensor) -> Any:
        """Per-region transform parameters shared by both branches (the same ``T_i``)."""
        return None

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        regions: Sequence[torch.Tensor | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 8 per sample.

        Args:
            pred: ``x̂_0`` decoded, ``[B, 3, H, W]`` in ``[-1, 1]`` (gradients flow through it).
            target: ``x_gt`` ``[B, 3, H, W]`` in ``[-1, 1]`` (no gradient).
            regions: per sample ``[K_b, *width]`` pixel coordinates in the target (``None`` = none).

        Returns:
            (``[B]`` mean cosine distance over the sample's regions, 0 where it has none;
            ``[B]`` number of regions).
        """
        if len(regions) != pred.shape[0] or pred.shape != target.shape:
            raise ValueError(
                f"{type(self).__name__}: pred {tuple(pred.shape)}, target {tuple(target.shape)} and "
                f"{len(regions)} region lists must agree"
            )
        coords, index = _gather(regions, self.width, pred.device)
        if coords.shape[0] == 0:
            zeros = pred.new_zeros(pred.shape[0], dtype=torch.float32)
            return zeros, zeros
        enc = _on_device(self.encoder, pred)
        params = self.prepare(coords)
        with torch.no_grad():
            f_gt = enc(self.crops(target.detach().float(), coords, index, params)).float()
        f_pred = enc(self.crops(pred.float(), coords, index, params)).float()
        dist = 1 - F.cosine_similarity(f_pred, f_gt, dim=1, eps=1e-8)
        return _per_sample_mean(dist, index, pred.shape[0])


class FaceIdentityLoss(_RegionCosineLoss):
    """Eq. 8 on faces: ``T_i`` = similarity transform of landmarks ``[5, 2]`` onto the ArcFace template.

    Args:
        identity: frozen φ, crops ``[N, 3, size, size]`` in ``[-1, 1]`` → ``[N, D]``
            (:class:`~rededit.models.faces.SFaceIdentity`, :class:`~rededit.models.faces.ArcFaceIRSE50Identity`).
        crop_size: aligned crop side (112 for both backbones).
    """

    batch_key = "face_landmarks"
    fraction_name = "id_face_fraction"
    width = (5, 2)

    def __init__(self, identity: nn.Module, crop_size: int = 112):
        super().__init__(identity)
        self.crop_size = int(crop_size)

    def prepare(self, regions: torch.Tensor) -> torch.Tensor:
        return face_matrices(regions, self.crop_size)

    def crops(self, images, regions, index, matrices=None):
        if matrices is None:
            matrices = self.prepare(regions)
        return warp_affine(images, matrices, (self.crop_size, self.crop_size), index)


class RegionFeatureLoss(_RegionCosineLoss):
    """Eq. 8 on object boxes ``[O, 4]`` (x0, y0, x1, y1, target pixels) with a pluggable frozen encoder.

    Args:
        encoder: frozen module, crops ``[N, 3, S, S]`` in ``[-1, 1]`` → features ``[N, D]``; default
            :class:`FixedFilterBankEncoder`.
        crop_size: ``S``.
        min_size: boxes with a side below this many pixels are ignored (too small to carry identity).
    """

    batch_key = "object_boxes"
    fraction_name = "id_object_fraction"
    width = (4,)

    def __init__(self, encoder: nn.Module | None = None, crop_size: int = 64, min_size: float = 4.0):
        super().__init__(encoder if encoder is not None else FixedFilterBankEncoder())
        self.crop_size = int(crop_size)
        self.min_size = float(min_size)

    def forward(self, pred, target, regions):
        kept = []
        for boxes in regions:
            if boxes is None:
                kept.append(None)
                continue
            boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            wh = boxes[:, 2:] - boxes[:, :2]
            kept.append(boxes[(wh >= self.min_size).all(1)])
        return super().forward(pred, target, kept)

    def crops(self, images, regions, index, params=None):
        return crop_boxes(images, regions, index, self.crop_size)


class FixedFilterBankEncoder(nn.Module):
    """Weight-free region descriptor: colour layout + oriented-texture layout, ``[N, 3, S, S]`` → ``[N, D]``.

    Why this default: no pretrained generic image encoder ships on PyPI (CLIP/DINO/torchvision weights
    all download), and a randomly initialised CNN measures nothing stable. A fixed bank of zero-mean Gabor
    filters (``orientations × scales``, on luminance) plus a coarse colour grid is deterministic,
    differentiable, cheap (one conv) and responds to what "the preserved object changed" means in the
    synthetic corpus: its colour, shape edges and texture moved or changed. Features are signed so that
    the cosine distance of eq. 8 is informative (all-positive features would make every cosine ≈ 1).
    For real data plug in a frozen semantic encoder loaded from a local checkpoint.

    Args:
        grid: pooling grid side (``grid × grid`` cells).
        orientations / scales: Gabor bank size; wavelengths ``4·2^s`` pixels.
    """

    def __init__(self, grid: int = 4, orientations: int = 4, scales: int = 2):
        super().__init__()
        self.grid = int(grid)
        kernels = []
        size = 4 * 2 ** (scales - 1) + 1
        half = size // 2
        ys, xs = torch.meshgrid(
            torch.arange(-half, half + 1, dtype=torch.float32),
            torch.arange(-half, half + 1, dtype=torch.float32),
            indexing="ij",
        )
        for s in range(scales):
            lam = 4.0 * 2**s
            sig = 0.5 * lam
            for o in range(orientations):
                th = math.pi * o / orientations
                xr = xs * math.cos(th) + ys * math.sin(th)
                env = torch.exp(-(xs**2 + ys**2) / (2 * sig**2))
                for phase in (0.0, math.pi / 2):
                    k = env * torch.cos(2 * math.pi * xr / lam + phase)
                    k = k - k.mean()  # zero DC: flat regions give 0
                    kernels.append(k / k.abs().sum())
        self.register_buffer("bank", torch.stack(kernels)[:, None], persistent=False)  # [2·O·S, 1, k, k]
        self.n_orient = orientations
        self.n_scale = scales
        self.requires_grad_(False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        crops = crops.float()
        n = crops.shape[0]
        lum = (0.299 * crops[:, 0] + 0.587 * crops[:, 1] + 0.114 * crops[:, 2])[:, None]
        resp = F.conv2d(lum, self.bank.to(crops.device), padding=self.bank.shape[-1] // 2)
        resp = resp.reshape(n, self.n_scale * self.n_orient, 2, *resp.shape[-2:])
        energy = (resp.pow(2).sum(2) + 1e-6).sqrt()  # [N, S·O, H, W], phase-invariant
        energy = energy - energy.mean(1, keepdim=True)  # orientation contrast: signed
        colour = F.adaptive_avg_pool2d(crops, self.grid).flatten(1)
        texture = F.adaptive_avg_pool2d(energy, self.grid).flatten(1)
        return torch.cat([F.normalize(colour, dim=1), F.normalize(texture, dim=1)], dim=1)


class ConsistencyLoss(nn.Module):
    """``loss(batch, parts, stage) -> [B]``: ``λ_id(σ)·L_id`` per sample (eq. 6–8) for the SFT stage.

    Args:
        criterion: :class:`FaceIdentityLoss` (batch key ``face_landmarks``) or :class:`RegionFeatureLoss`
            (``object_boxes``).
        eta: η of eq. 6 (the report gives no value; 1.0 puts ``λ_id·L_id`` ≤ 0.81·2 next to an MSE ≈ 1).
        sigma_cutoff: eq. 6's 0.9.
        max_samples: run φ on at most this many of the batch's eligible samples per step (``None`` = all,
            exactly eq. 8 on every face). K draws with probability ∝ ``λ_id(σ)`` (see :meth:`_draw`), so the
            batch mean of the loss stays an unbiased estimate of eq. 7's; it bounds φ's cost per step
            where φ dominates (the tiny CPU config, see ``experiments/benchmarks/consistency_loss``).
        seed: base of that draw.

    After each call :attr:`last_stats` holds ``{fraction_name: share of the batch with regions,
    "id_active_fraction": share eligible for φ (regions and σ < σ_cut)}`` for logging.
    """

    def __init__(
        self,
        criterion: _RegionCosineLoss,
        eta: float = 1.0,
        sigma_cutoff: float = 0.9,
        max_samples: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or null, got {max_samples}")
        self.criterion = criterion
        self.eta = float(eta)
        self.sigma_cutoff = float(sigma_cutoff)
        self.max_samples = max_samples
        self.seed = int(seed)
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(
        self, batch: Mapping[str, Any], parts: Mapping[str, torch.Tensor], stage: Any
    ) -> torch.Tensor:
        sigma = parts["sigma"]
        x_t, v_hat = parts["x_t"], parts["v_hat"]
        b = x_t.shape[0]
        device = x_t.device
        key = self.criterion.batch_key
        regions = list(batch.get(key) or [None] * b)
        if len(regions) != b:
            raise ValueError(f"batch[{key!r}] has {len(regions)} entries for a batch of {b}")
        has = torch.tensor([r is not None and torch.as_tensor(r).numel() > 0 for r in regions], device=device)
        lam = id_loss_weight(sigma.detach().float(), self.eta, self.sigma_cutoff).to(device)
        active = has & (lam > 0)
        out = torch.zeros(b, device=device, dtype=torch.float32)
        self.last_stats = {
            self.criterion.fraction_name: has.float().mean(),
            "id_active_fraction": active.float().mean(),
        }
        if not bool(active.any()):
            return out
        sel = active.nonzero().flatten()
        weight = lam[sel]
        if self.max_samples is not None and sel.numel() > self.max_samples:
            sel, weight = self._draw(sel, weight, batch, stage)
        # x̂_0 by the backbone's own conversion (x_t − σ_c·v̂; exact in both prediction modes).
        x0_hat = stage.backbone.predicted_x0(x_t[sel], v_hat[sel], sigma[sel])
        pred = stage.vae.decode(x0_hat.to(_vae_dtype(stage.vae, x0_hat))).float()
        with torch.no_grad():
            target = batch["target"].to(device)[sel].float()
        if pred.shape != target.shape:
            raise ValueError(
                f"decoded x̂_0 {tuple(pred.shape)} does not match batch['target'] {tuple(target.shape)}: the "
                "VAE and the data must agree on the target resolution"
            )
        l_id, _ = self.criterion(pred, target, [regions[i] for i in sel.tolist()])
        return out.index_put((sel,), weight * l_id)

    def _draw(self, sel: torch.Tensor, lam: torch.Tensor, batch: Mapping[str, Any], stage: Any):
        """``max_samples`` = K draws, with replacement, of eligible samples with probability ``p_i ∝ λ_i``.

        Importance sampling for ``S = Σ_i λ_i·L_i`` (the batch sum of eq. 7's extra term):
        ``Ŝ = (1/K)·Σ_k λ_{i_k}·L_{i_k} / p_{i_k} = (Λ/K)·Σ_k L_{i_k}`` with ``Λ = Σ_i λ_i`` is unbiased, and
        its variance comes only from how much ``L_id`` differs between samples, not from ``λ_id(σ)``
        (which spans 0…0.81 within a batch: uniform draws would spend φ on near-zero-weight samples).
        Drawn from (seed, epoch, step, rank). Returns the distinct samples and their weights
        ``Λ·count_i/K`` (used in place of ``λ_i``).
        """
        rank = int(getattr(stage, "global_rank", 0) or 0)
        gen = torch_generator(self.seed, "consistency", batch.get("epoch", 0), batch.get("step", 0), rank)
        lam = lam.detach().float().cpu()
        draws = torch.multinomial(lam / lam.sum(), self.max_samples, replacement=True, generator=gen)
        picked, counts = draws.unique(return_counts=True)  # sorted; φ runs once per distinct sample
        weight = lam.sum() * counts.float() / self.max_samples
        return sel[picked.to(sel.device)], weight.to(sel.device)


def _vae_dtype(vae: nn.Module, like: torch.Tensor) -> torch.dtype:
    dtype = getattr(vae, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else like.dtype
