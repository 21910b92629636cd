"""Latent autoencoders and packing: exact round trips and parity with the diffusers Qwen-Image pipelines."""

from __future__ import annotations

import pytest
import torch

from rededit.models.packing import img_shapes_for, pack_latents, unpack_latents
from rededit.models.vae import PixelSpaceToDepthVAE, QwenImageVAE

TINY_QWEN_VAE = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.1, -0.2, 0.3, -0.4],
    "latents_std": [1.5, 0.5, 2.0, 1.25],
}


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("factor", [4, 8])
def test_pixel_vae_exact_round_trip(factor: int) -> None:
    vae = PixelSpaceToDepthVAE(factor=factor, scale=2.0)
    x = _images(2, 32, 48)
    z = vae.encode(x)
    assert z.shape == (2, 3 * factor**2, 32 // factor, 48 // factor)
    assert vae.latent_channels == 3 * factor**2 and vae.downsample == factor
    torch.testing.assert_close(z, torch.nn.functional.pixel_unshuffle(x, factor) * 2.0)
    assert torch.equal(vae.decode(z), x)
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(_images(1, 30, 32))


def test_pixel_vae_decode_passes_gradients() -> None:
    vae = PixelSpaceToDepthVAE(factor=4)
    z = torch.randn(1, 48, 2, 2, requires_grad=True)
    vae.decode(z).sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, 0.5))


def test_qwen_vae_normalisation_matches_pipeline() -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline

    torch.manual_seed(0)
    vae = QwenImageVAE(config=TINY_QWEN_VAE)
    vae.train()  # frozen wrapper must stay in eval mode
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.latent_channels == 4 and vae.downsample == 8
    x = _images(2, 32, 48)
    z = vae.encode(x)
    assert z.shape == (2, 4, 4, 6)

    # The Edit-Plus pipeline's own encode path on the same module.
    pipe = QwenImageEditPlusPipeline.__new__(QwenImageEditPlusPipeline)
    object.__setattr__(pipe, "vae", vae.vae)
    object.__setattr__(pipe, "latent_channels", 4)
    ref = QwenImageEditPlusPipeline._encode_vae_image(pipe, x[:, :, None], generator=None)
    torch.testing.assert_close(z, ref[:, :, 0], rtol=1e-5, atol=1e-5)

    # Decode path of the pipeline: latents / (1/std) + mean, then vae.decode(...)[:, :, 0].
    assert isinstance(vae.vae, AutoencoderKLQwenImage)
    mean = torch.tensor(TINY_QWEN_VAE["latents_mean"]).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(TINY_QWEN_VAE["latents_std"]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        ref_img = vae.vae.decode(z[:, :, None] / inv_std + mean, return_dict=False)[0][:, :, 0]
        img = vae.decode(z)
    assert img.shape == x.shape
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-5)


def test_qwen_vae_sample_mode_uses_generator() -> None:
    torch.manual_seed(0)
    vae = QwenImageVAE(config=TINY_QWEN_VAE, sample_mode="sample")
    x = _images(1, 16, 16)
    a = vae.encode(x, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, generator=torch.Generator().manual_seed(1))
    c = vae.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_qwen_vae_requires_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        QwenImageVAE()


def test_pack_matches_diffusers_and_round_trips() -> None:
    from diffusers import QwenImageEditPlusPipeline as P

    z = torch.randn(2, 4, 6, 8)
    tokens = pack_latents(z)
    assert tokens.shape == (2, 12, 16)
    assert torch.equal(tokens, P._pack_latents(z, 2, 4, 6, 8))
    # diffusers' unpack takes pixel sizes and returns the 5-D video layout [B, C, 1, h, w].
    assert torch.equal(unpack_latents(tokens, 6, 8), P._unpack_latents(tokens, 6 * 8, 8 * 8, 8)[:, :, 0])
    assert torch.equal(unpack_latents(tokens, 6, 8), z)
    with pytest.raises(ValueError, match="divisible"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_img_shapes_target_first_then_references() -> None:
    shapes = img_shapes_for((8, 12), [(8, 8), (4, 6)], batch_size=3)
    assert shapes == [[(1, 4, 6), (1, 4, 4), (1, 2, 3)]] * 3
    assert img_shapes_for((4, 4), [], batch_size=1) == [[(1, 2, 2)]]


def test_qwen_vae_loads_local_folder(tmp_path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    built = QwenImageVAE(config=TINY_QWEN_VAE)
    built.vae.save_pretrained(tmp_path / "vae")
    cfg = OmegaConf.load("conf/vae/qwen_image.yaml")
    assert OmegaConf.is_missing(cfg, "path")
    cfg.path = str(tmp_path)
    cfg.dtype = "float32"
    loaded = instantiate(cfg)
    x = _images(1, 16, 16)
    torch.testing.assert_close(loaded.encode(x), built.encode(x))
