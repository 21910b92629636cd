"""Losses beyond plain flow matching: Diffusion-DPO with ω/λ (eq. 2), DiffusionNFT (eq. 3, and the form of its
official trainer) and the identity / object consistency loss (eq. 6-8). Plain PyTorch on tensors.

May import: ``rededit.models``, ``rededit.utils``. No Lightning.
"""

from rededit.losses.dpo import dpo_loss, dpo_stats
from rededit.losses.nft import nft_kl, nft_loss, nft_loss_official, optimality_probability

__all__ = ["dpo_loss", "dpo_stats", "nft_kl", "nft_loss", "nft_loss_official", "optimality_probability"]
