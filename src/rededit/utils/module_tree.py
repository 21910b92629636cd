"""Holding a module without registering it as a child."""

from __future__ import annotations

from torch import nn


def hidden_from_tree(module: nn.Module | None) -> list:
    """``[module]``: a one-item list, so assigning it to an ``nn.Module`` attribute does not register the module.

    Frozen parts (VAE, text encoder, the consistency loss's face encoder, DPO's reference twin) held this way
    stay out of the owner's ``state_dict`` (checkpoints), ``parameters()`` (optimiser, EMA) and FSDP wrapping;
    read them back as ``attr[0]``.
    """
    return [module]
