"""Frozen latent autoencoders (§3.1: "latent tokens from a high-fidelity VAE").

Every autoencoder maps images ``[B, 3, H, W]`` in ``[-1, 1]`` to *normalised* latents ``[B, C, h, w]``
(roughly zero-mean / unit-std, the scale the flow path ``x_t = (1-σ)x0 + σε`` assumes) and back.

* :class:`PixelSpaceToDepthVAE`: weight-free space-to-depth for the CPU demo (exact inverse).
* :class:`QwenImageVAE`: diffusers' ``AutoencoderKLQwenImage`` with the Qwen-Image-Edit pipelines'
  latent normalisation.

Both are frozen (no trainable parameters, always in eval mode). ``encode`` runs without autograd (its
outputs are training targets / conditions); ``decode`` keeps autograd so a loss on decoded pixels (the
§3.7 consistency loss) can back-propagate into the predicted latents.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rededit.utils.logging import get_logger
from rededit.utils.offline import require_local_folder

log = get_logger(__name__)


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` → ``torch.bfloat16`` (Hydra passes strings)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
    }
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
    return value


class LatentVAE(nn.Module, abc.ABC):
    """Frozen image autoencoder interface.

    Attributes:
        downsample: spatial factor ``H / h``.
        latent_channels: ``C``.
    """

    downsample: int
    latent_channels: int

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LatentVAE:
        # Frozen: Lightning calls .train() on the whole module tree each epoch; stay in eval mode.
        return super().train(False)

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` → normalised latents ``[B, C, H/d, W/d]``."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, h, w]`` → images ``[B, 3, h·d, w·d]`` in ``[-1, 1]``."""

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % self.downsample or x.shape[-1] % self.downsample:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the VAE downsample factor {self.downsample}"
            )


class PixelSpaceToDepthVAE(LatentVAE):
    """Weight-free "autoencoder": ``z = scale · pixel_unshuffle(x, factor)``, exact inverse.

    ``scale = 2.0`` because natural images mapped to ``[-1, 1]`` have a per-pixel standard deviation of
    about 0.45–0.5 (ImageNet RGB std ≈ 0.226 in ``[0, 1]``, i.e. ≈ 0.45 in ``[-1, 1]``); doubling puts the
    latents near unit std, matching the ``ε ~ N(0, I)`` end of the flow path. Their mean is already near 0.

    Args:
        factor: space-to-depth factor ``d``; ``latent_channels = 3·d²``. The tiny demo uses 4 (48 channels,
            192 features per packed 2×2 token), see ``conf/vae/pixel.yaml``.
        scale: multiplier applied after unshuffling.
    """

    def __init__(self, factor: int = 8, scale: float = 2.0) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.factor = int(factor)
        self.scale = float(scale)
        self.downsample = self.factor
        self.latent_channels = 3 * self.factor**2
        self._freeze()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_image(x)
        return F.pixel_unshuffle(x, self.factor) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z / self.scale, self.factor)


class QwenImageVAE(LatentVAE):
    """diffusers ``AutoencoderKLQwenImage`` with the Qwen-Image-Edit latent normalisation.

    The diffusers model is a causal video VAE with layout ``[B, C, T, H, W]``; images are single frames
    (``T = 1``). Normalisation follows ``QwenImageEditPlusPipeline._encode_vae_image`` and its decode path,
    operation by operation and in the VAE's dtype as the pipeline computes them (issue 19: bit-identical
    latents and images in any dtype)::

        z = (mode(q(z|x)) - latents_mean) / latents_std          # encode
        x = vae.decode(z / (1 / latents_std) + latents_mean)     # decode

    Encoding uses the posterior *mode* (``sample_mode="argmax"``) by default, as the Edit pipelines do for
    reference images: the targets and references are then deterministic functions of the pixels, so a
    cached latent equals an online one, and the flow path already supplies the noise. ``sample_mode="sample"``
    draws from the posterior with an explicit generator instead.

    Args:
        path: local folder for ``AutoencoderKLQwenImage.from_pretrained`` (no hub access here).
        subfolder: subfolder inside ``path`` (``"vae"`` for a full pipeline folder, ``None`` for a bare VAE).
        config: constructor kwargs for a randomly initialised VAE (tests); exclusive with ``path``.
        dtype: parameter dtype (``"bfloat16"`` for production). Inputs are cast to it; outputs are returned
            in the input's dtype.
        sample_mode: ``"argmax"`` (posterior mode) or ``"sample"``.
    """

    def __init__(
        self,
        path: str | None = None,
        config: Mapping[str, Any] | None = None,
        subfolder: str | None = None,
        dtype: str | torch.dtype | None = "float32",
        sample_mode: str = "argmax",
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKLQwenImage

        if (path is None) == (config is None):
            raise ValueError("QwenImageVAE needs exactly one of `path` (local weights folder) or `config`")
        if sample_mode not in ("argmax", "sample"):
            raise ValueError(f"sample_mode must be 'argmax' or 'sample', got {sample_mode!r}")
        torch_dtype = as_dtype(dtype)
        if path is not None:
            require_local_folder(path, "vae.path")
            kwargs: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
            if subfolder:
                kwargs["subfolder"] = subfolder
            self.vae = AutoencoderKLQwenImage.from_pretrained(path, **kwargs)
            log.info("loaded AutoencoderKLQwenImage from %s (subfolder=%s)", path, subfolder)
        else:
            cfg = {
                k: (list(v) if isinstance(v, list | tuple) or type(v).__name__ == "ListConfig" else v)
                for k, v in dict(config).items()
            }
            self.vae = AutoencoderKLQwenImage(**cfg)
            if torch_dtype is not None:
                self.vae.to(torch_dtype)
        self.sample_mode = sample_mode
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        self.downsample = int(self.vae.spatial_compression_ratio)
        if len(cfg.latents_mean) != self.latent_channels or len(cfg.latents_std) != self.latent_channels:
            raise ValueError("latents_mean/latents_std must have z_dim entries")
        # Buffers (not parameters): move with .to(device), saved in state_dict, never trained.
        self.register_buffer(
            "latents_mean",
            torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "latents_std",
            torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1),
            persistent=False,
        )
        self._freeze()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check_image(x)
        posterior = self.vae.encode(x.to(self.dtype)[:, :, None]).latent_dist  # [B, 2C, 1, h, w]
        if self.sample_mode == "argmax":
            z = posterior.mode()
        else:
            z = posterior.sample(generator)
        z = z[:, :, 0]
        z = (z - self.latents_mean.to(z.dtype)) / self.latents_std.to(z.dtype)
        return z.to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        # The pipeline: latents.to(vae.dtype) / (1.0 / latents_std).to(vae.dtype) + latents_mean.to(vae.dtype)
        lat = z.to(self.dtype)
        raw = lat / (1.0 / self.latents_std).to(lat.dtype) + self.latents_mean.to(lat.dtype)
        x = self.vae.decode(raw[:, :, None], return_dict=False)[0]  # [B, 3, 1, H, W]
        return x[:, :, 0].to(z.dtype)
