"""Pixel head: a per-pixel decoder of the predicted change that sees Picture 1's pixels (issue 15).

On the tiny CPU editor one token is 8×8 pixels (192 values) but the transformer is 128 wide, and
``proj_out`` is linear: a token's change is a low-rank guess that cannot follow an object's outline inside
the token, so every local edit bleeds over the token's other pixels (PSNR outside the edit ~17–21 dB,
experiments/benchmarks/learnability). What a pixel should do often depends on that pixel itself ("this pixel
is the red of the object, recolour it"; "this one is background, keep it"), which the token's hidden state
only holds in compressed form. The head decodes the change pixel by pixel from the token's hidden state
*and* the pixel's own values, in the spirit of pixel neural-field decoders for pixel-space DiTs (PixNerd,
Wang et al. 2025), with Picture 1's pixel as an extra input for editing::

    f_q = (W_f h)_q ∈ R^F                     per pixel q of the token (a linear map of the hidden state)  (P1)
    Δ_q = MLP([f_q, r_q]) ∈ R^k               r_q: Picture 1's value at the pixel                          (P2)
    Δ_q = MLP([f_q, r_q, x_q, σ])             with ``noisy=True``: also the noisy target's value and σ     (P2')

``h`` is the transformer's final image hidden state of a target token (``norm_out``'s output, ``[B, N, D]``),
With ``gate=True`` (needs ``backbone.edit_gate``) the MLP has one more output per pixel, ``γ_q``, added to the
edit gate's token-level logit ``g`` of that pixel's latent site, so the gate of (G1) in
:mod:`rededit.models.edit_gate` becomes per pixel, ``sigmoid(g + γ_q)``: *where* can follow a pixel's own value
(e.g. "the red object's pixels"), which a token-level gate cannot inside an 8×8-pixel token.

``Δ`` is added to ``proj_out``'s change (both start at zero, so a fresh backbone still returns Picture 1
exactly). ``noisy`` is off by default: measured at equal steps (learnability round 12) a head that reads
``x_q`` learns to copy it, which wins the low-σ loss but lets the sampler's noise through from σ = 1 (washed-out,
tinted edits). A *pixel* is a group of ``k = C / pixels`` latent channels at one latent site in the channel-major
layout of ``pixel_unshuffle`` (channel ``c·pixels + q``): with the demo's space-to-depth autoencoder
(``factor 4``: ``C = 48``) ``pixels = 16`` makes ``q`` a real RGB pixel; ``pixels = 1`` treats each latent site
as one "pixel" of ``C`` channels (any learned VAE). T2I rows (no Picture 1) pass ``r = 0``.

Written here because it is two small layers on top of diffusers' unmodified ``QwenImageTransformer2DModel``
(the hidden states come through the same one-call forward hook as the edit gate); cost: one
``D → p²·pixels·F`` linear per target token and an ``(F + k) → hidden → k`` MLP per pixel (``F + 2k + 1`` inputs
with ``noisy``, ``k + 1`` outputs with ``gate``): the demo backbone's forward + backward takes 1.15× as long with
it (batch 8, 1 thread, idle 2-core machine; experiments/benchmarks/learnability/pixel_head_cost.py). Off by
default; its effect on edits is in the learnability lever table.
"""

from __future__ import annotations

import torch
from torch import nn

from rededit.models.packing import unpack_latents


class PixelHead(nn.Module):
    """(P1)–(P2) of the module doc.

    Args:
        dim: the transformer's inner width ``D``.
        patch_size: ``p`` (latent sites per token edge).
        latent_channels: ``C``.
        pixels: pixels per latent site (``C`` must be divisible by it; 16 for the ×4 space-to-depth VAE).
        features: ``F``, the per-pixel feature width taken from the hidden state.
        hidden: the per-pixel MLP's hidden width.
        noisy: also feed the pixel's noisy-target value and σ (P2').
        gate: also output a per-pixel gate logit ``γ_q`` (module doc).
    """

    def __init__(
        self,
        dim: int,
        patch_size: int,
        latent_channels: int,
        pixels: int = 1,
        features: int = 16,
        hidden: int = 32,
        noisy: bool = False,
        gate: bool = False,
    ) -> None:
        super().__init__()
        if pixels < 1 or latent_channels % pixels:
            raise ValueError(f"pixel_head.pixels={pixels} must divide the {latent_channels} latent channels")
        self.patch_size = int(patch_size)
        self.pixels = int(pixels)
        self.channels = int(latent_channels) // self.pixels  # k, values per pixel
        self.features = int(features)
        self.noisy = bool(noisy)
        self.gate = bool(gate)
        inputs = self.features + self.channels + (self.channels + 1 if self.noisy else 0)
        self.to_features = nn.Linear(dim, self.patch_size**2 * self.pixels * self.features)
        self.mlp = nn.Sequential(
            nn.Linear(inputs, int(hidden)),
            nn.GELU(approximate="tanh"),
            nn.Linear(int(hidden), self.channels + int(self.gate)),
        )
        # Zero output layer: Δ = 0 at the start (the backbone's "return Picture 1" init); its gradient does
        # not depend on its own weight, so it trains from zero.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def _pixels_last(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` → ``[B, pixels, h, w, k]`` (channel ``c·pixels + q`` → pixel ``q``, value ``c``)."""
        b, _, h, w = z.shape
        return z.reshape(b, self.channels, self.pixels, h, w).permute(0, 2, 3, 4, 1)

    def forward(
        self, hidden: torch.Tensor, reference: torch.Tensor | None, noisy: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-pixel change ``Δ`` ``[B, C, h, w]`` (P2) and, with ``gate``, the per-pixel gate logits ``γ``
        ``[B, pixels, h, w]`` (else None).

        Args:
            hidden: the target tokens' final hidden states ``[B, (h/p)(w/p), D]``.
            reference: Picture 1's latent on the target grid ``[B, C, h, w]`` (``None``: T2I, read as zeros).
            noisy: the noisy target latent ``x_t`` ``[B, C, h, w]`` (its shape is always used; its values with
                ``noisy=True``).
            sigma: ``[B]``.
        """
        b, c, h, w = noisy.shape
        dtype = self.to_features.weight.dtype
        feats = unpack_latents(
            self.to_features(hidden.to(dtype)), h, w, self.patch_size
        )  # [B, pixels·F, h, w]
        feats = feats.reshape(b, self.pixels, self.features, h, w).permute(0, 1, 3, 4, 2)
        ref = torch.zeros_like(noisy) if reference is None else reference
        parts = [feats, self._pixels_last(ref.to(dtype))]
        if self.noisy:
            sig = sigma.to(dtype).reshape(b, 1, 1, 1, 1).expand(b, self.pixels, h, w, 1)
            parts += [self._pixels_last(noisy.to(dtype)), sig]
        x = torch.cat(parts, dim=-1)
        out = self.mlp(x)  # [B, pixels, h, w, k (+1)]
        delta = out[..., : self.channels].permute(0, 4, 1, 2, 3).reshape(b, c, h, w)
        return delta, (out[..., self.channels] if self.gate else None)

    def extra_repr(self) -> str:
        return f"pixels={self.pixels}, channels_per_pixel={self.channels}, features={self.features}, noisy={self.noisy}, gate={self.gate}"
