"""rededit.losses"""

from rededit.losses.dpo import dpo_loss, dpo_stats
from rededit.losses.nft import nft_loss, optimality_probability

__all__ = ["dpo_loss", "dpo_stats", "nft_loss", "optimality_probability"]
