"""Latent ↔ token packing for the Qwen-Image MM-DiT (§3.1).

The transformer consumes 2×2 latent patches flattened into tokens. The layout here is bit-identical to
diffusers' ``QwenImagePipeline._pack_latents`` / ``_unpack_latents`` (token index runs row-major over the
patch grid; the feature index is ``c·p² + dy·p + dx``), so weights trained here load into the diffusers
pipelines and vice versa.

``img_shapes`` is diffusers' per-sample list of ``(frames, h_tokens, w_tokens)`` triples that drives the
3-D unified RoPE: the noisy target is frame 0 and the clean references follow as frames 1..K. All frames
share the same (centred) spatial coordinates and differ only by the temporal index, which is the report's
"reference and target tokens share spatial coordinates but are differentiated by a temporal interval".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_divisible(h: int, w: int, patch: int) -> None:
    if h % patch or w % patch:
        raise ValueError(
            f"latent size {h}x{w} is not divisible by the patch size {patch}; resize images to a multiple of "
            f"vae.downsample * {patch} pixels (the bucket table should guarantee this)"
        )


def pack_latents(z: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Pack latents into patch tokens.

    Args:
        z: latents ``[B, C, h, w]`` (``h``, ``w`` divisible by ``patch``).
        patch: patch edge in latent pixels (Qwen-Image: 2).

    Returns:
        tokens ``[B, (h/p)·(w/p), C·p²]``.
    """
    if z.ndim != 4:
        raise ValueError(f"pack_latents expects [B, C, h, w], got shape {tuple(z.shape)}")
    b, c, h, w = z.shape
    _check_divisible(h, w, patch)
    z = z.reshape(b, c, h // patch, patch, w // patch, patch)
    z = z.permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_latents`.

    Args:
        tokens: ``[B, (h/p)·(w/p), C·p²]``.
        h: latent height (not token rows).
        w: latent width.
        patch: patch edge.

    Returns:
        latents ``[B, C, h, w]``.
    """
    if tokens.ndim != 3:
        raise ValueError(f"unpack_latents expects [B, N, D], got shape {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    _check_divisible(h, w, patch)
    if n != (h // patch) * (w // patch) or d % (patch * patch):
        raise ValueError(f"cannot unpack tokens {tuple(tokens.shape)} to a {h}x{w} latent with patch {patch}")
    c = d // (patch * patch)
    z = tokens.reshape(b, h // patch, w // patch, c, patch, patch)
    z = z.permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c, h, w)


def img_shapes_for(
    target_hw_latent: tuple[int, int],
    ref_hws_latent: Sequence[tuple[int, int]],
    batch_size: int,
    patch: int = 2,
) -> list[list[tuple[int, int, int]]]:
    """Build diffusers' ``img_shapes`` for one batch (mirrors ``QwenImageEditPlusPipeline``).

    Args:
        target_hw_latent: ``(h, w)`` of the target latent.
        ref_hws_latent: ``(h_k, w_k)`` of each reference latent, in sequence order (may be empty: T2I).
        batch_size: ``B``; every sample gets the same list because diffusers' RoPE only reads the first
            sample's shapes (all samples of a batch must share shapes per position, the bucket sampler's job).
        patch: patch edge.

    Returns:
        ``[[(1, h/p, w/p), (1, h_1/p, w_1/p), ...]] * B``: target frame first, then references.
    """
    shapes = [(1, target_hw_latent[0] // patch, target_hw_latent[1] // patch)]
    shapes += [(1, h // patch, w // patch) for h, w in ref_hws_latent]
    return [list(shapes) for _ in range(batch_size)]
