"""Source input: Picture 1 added to the target tokens' input embedding (issue 15, an option of the tiny editor).

In the Qwen-Image-Edit layout a target token enters the transformer with ``x_t`` alone; what lies under it in
Picture 1 reaches it only through attention to the reference tokens, which a model trained from scratch has to
learn first (a positional lookup from each target token to the reference token at the same place). At σ ≈ 1,
where the edit is decided, ``x_t`` carries nothing, so until that lookup exists no target token can tell whether
it sits on the object an instruction names. This option gives every target token Picture 1's token at the same
place from the first block on — InstructPix2Pix's channel concatenation of the source latent, written as a sum
after ``img_in`` so that the diffusers transformer, its RoPE and the reference tokens stay exactly as they are
(multi-reference editing still goes through the reference tokens)::

    h_target = img_in(x_t tokens) + W · (Picture 1 tokens),   h_refs = img_in(ref tokens)   (unchanged)

``W`` starts at zero (a fresh editor equals the plain backbone). It is an input of *this* editor: a published
Qwen-Image-Edit checkpoint has no such weight, and a diffusers pipeline serving an export that has one would
ignore it, so the option is for editors trained from scratch (the CPU demo); weights under ``source_in.*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class SourceIn(nn.Module):
    """Linear embedding of Picture 1's packed tokens, added to the target tokens after ``img_in``.

    Args:
        in_features: features of one packed token, ``C · p²`` (the transformer's ``in_channels``).
        dim: the transformer's inner width ``D``.
    """

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, dim)
        nn.init.zeros_(self.proj.weight)  # zero start: the editor at init is the plain backbone
        nn.init.zeros_(self.proj.bias)

    @contextlib.contextmanager
    def added_to(self, img_in: nn.Module, source_tokens: torch.Tensor) -> Iterator[None]:
        """While inside, ``img_in``'s output gets ``proj(source_tokens)`` added on its first ``N`` tokens.

        Args:
            img_in: the transformer's input projection (called once per transformer forward).
            source_tokens: Picture 1 packed on the target's grid, ``[B, N, C·p²]`` (``N`` = target tokens, which
                come first in the image stream).
        """
        n = source_tokens.shape[1]

        def add(_module: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
            added = out[:, :n] + self.proj(source_tokens.to(out.dtype))
            return torch.cat([added, out[:, n:]], dim=1)

        handle = img_in.register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()
