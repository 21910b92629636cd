"""Edit gate: *where* to edit, as a learned per-latent-pixel gate on the predicted change (issue 15).

With ``source_residual`` the backbone predicts x0 as Picture 1's latent plus a change ``Δ`` (the transformer's
unpacked output). On the tiny CPU editor the edit-region loss weight teaches object-level edits but the change
then bleeds over whole 8×8-pixel tokens (PSNR outside the edit ~16 dB, experiments/benchmarks/learnability):
nothing in the output says "leave this pixel alone". The gate adds that as a separate, cheap output::

    x̂0 = z_ref1 + sigmoid(g) ⊙ Δ                                                        (G1)

``g`` ``[B, 1, h, w]`` are gate logits from a linear head ``W_g ∈ R^{p²×D}`` on the transformer's final image
hidden states (the output of ``norm_out``, i.e. the input of ``proj_out``) of the target tokens, unpacked like
``proj_out``'s output (one logit per latent pixel, shared by its ``C`` channels). T2I rows (no Picture 1) keep
``x̂0 = Δ``. A localisation loss supervises ``g`` with the sample's edit mask ``M`` area-averaged onto the
latent grid (``m ∈ [0, 1]``, soft targets)::

    L_mask = mean_{h,w} BCE(g, m) = −mean[m·log σ(g) + (1 − m)·log(1 − σ(g))]           (G2)

Split loss (``stage.weighting.gate_split``, off by default). Trained through (G1) with an edit-region weight
α, the composite regresses onto an α-weighted target: wherever the editor is unsure whether a pixel is edited
(probability ``p``), the minimiser leans toward the edit by ``p(1+α) / (1 + pα)`` instead of ``p``, a bias that
costs preservation (learnability round 12). The conditional mean of a pixel that is kept with probability
``1 − p`` and edited otherwise is ``z_ref1 + p·(E[x0 | edited] − z_ref1)``, which is (G1) when ``sigmoid(g)``
is ``p`` and ``Δ = E[x0 | edited] − z_ref1``. So the split trains the two factors apart, each unbiased: ``g``
by (G2) (a calibrated ``p``), and the ungated prediction ``z_ref1 + Δ`` only on the edited pixels::

    L_split = Σ_{h,w} m · ‖z_ref1 + Δ − x0‖² / Σ_{h,w} m                                        (G3)

(per channel mean, in the stage's loss space), which gives the edit's pixels the whole sample's weight however
small the edit is. Samples without a usable mask keep the usual loss on the composite.

``gate=False`` builds the head for (G2) only (an auxiliary localisation task, the output stays
``z_ref1 + Δ``). Init: the head's weight is zero and its bias ``init_bias`` (default 0: σ(g) = ½, the
uncommitted "don't know where", where (G2) and the gate's share of the flow loss have their largest
gradients); with the tiny preset's zero-initialised ``proj_out`` (``Δ = 0``) a gated backbone therefore starts
at exactly "return Picture 1", as the ungated one does. The head's gradient does not depend on its own
weight, so a zero start trains.

Written here rather than taken from a library because it is one ``nn.Linear`` and a forward hook on diffusers'
unmodified ``QwenImageTransformer2DModel``; the hook is registered only for the duration of one transformer
call (:func:`capture_output`), so nothing is stored on diffusers' modules and a ``deepcopy`` of the backbone
(DPO/NFT reference copies) needs no re-wiring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rededit.models.packing import unpack_latents


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``module``'s forward outputs inside the block (the hook is removed on exit)."""
    store: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


class EditGate(nn.Module):
    """Gate head and compositing (G1) of the module doc.

    Args:
        dim: the transformer's inner width ``D``.
        patch_size: ``p`` (one logit per latent pixel of a ``p × p`` token).
        gate: apply (G1); False: the head only feeds the localisation loss (G2).
        init_bias: initial logit everywhere (0: gate ½).
    """

    def __init__(self, dim: int, patch_size: int, gate: bool = True, init_bias: float = 0.0) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.gate = bool(gate)
        self.head = nn.Linear(dim, self.patch_size**2)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, float(init_bias))

    def logits(self, hidden: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Gate logits ``[B, 1, h, w]`` from the target tokens' final hidden states ``[B, (h/p)(w/p), D]``."""
        tokens = self.head(hidden.to(self.head.weight.dtype))  # [B, N, p²]
        return unpack_latents(tokens, h, w, self.patch_size)

    def composite(self, delta: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``sigmoid(g) ⊙ Δ`` ``[B, C, h, w]`` (G1's gated change); ``Δ`` unchanged when ``gate`` is off.

        ``logits`` ``[B, P, h, w]``: one logit per latent site (``P = 1``) or per pixel of it (``P`` pixels,
        channel ``c·P + q`` of ``Δ`` belongs to pixel ``q``, as in :mod:`rededit.models.pixel_head`)."""
        if not self.gate:
            return delta
        gate = torch.sigmoid(logits).to(delta.dtype)
        return gate.repeat(1, delta.shape[1] // gate.shape[1], 1, 1) * delta

    def extra_repr(self) -> str:
        return f"gate={self.gate}"


def mask_targets(edit_mask: torch.Tensor, latent_hw: tuple[int, int], pixels: int = 1) -> torch.Tensor:
    """``m`` of (G2): the edit mask ``[B, 1, H, W]`` area-averaged onto the latent grid ``[B, 1, h, w]``, or with
    ``pixels = f²`` > 1 onto the ``f·h × f·w`` pixel grid and unshuffled to ``[B, pixels, h, w]`` (pixel ``q`` of a
    latent site = channel ``q``, ``pixel_unshuffle``'s layout)."""
    h, w = (int(v) for v in latent_hw)
    f = round(pixels**0.5)
    if f * f != pixels:
        raise ValueError(f"per-pixel gate targets need a square number of pixels per site, got {pixels}")
    m = nn.functional.adaptive_avg_pool2d(edit_mask.float(), (h * f, w * f))
    return m if f == 1 else nn.functional.pixel_unshuffle(m, f)


def mask_loss(logits: torch.Tensor, edit_mask: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """Per-sample localisation loss (G2) ``[B]`` in float32; 0 where ``use`` ``[B]`` (bool) is False.

    Args:
        logits: gate logits ``[B, P, h, w]`` (``P`` = 1, or pixels per latent site).
        edit_mask: ``[B, 1, H, W]`` in {0, 1} (any ``H, W``; area-averaged to ``h, w``).
        use: which samples have a real mask (``has_edit_mask``, text not dropped, Picture 1 present).
    """
    m = mask_targets(edit_mask.to(logits.device), tuple(logits.shape[-2:]), pixels=logits.shape[1])
    bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), m, reduction="none")
    return bce.flatten(1).mean(1) * use.to(device=logits.device, dtype=torch.float32)
