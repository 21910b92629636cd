"""Training stages: thin LightningModules over one shared backbone (docs/architecture.md rule 2).

``BaseStage`` and the Pretrain/CT, SFT, DPO and NFT modules; checkpoint resolution, weights-only loading and
the export to a diffusers folder (:mod:`.checkpoints`).

May import: ``rededit.rewards`` (NFT), ``rededit.scoring``, ``rededit.data``, the core, ``rededit.models``,
``rededit.utils``.
"""

from rededit.stages.base import BaseStage
from rededit.stages.dpo import DPOModule
from rededit.stages.nft import NFTModule
from rededit.stages.pretrain import PretrainModule
from rededit.stages.sft import SFTModule

__all__ = ["BaseStage", "DPOModule", "NFTModule", "PretrainModule", "SFTModule"]
