"""Training stages: thin LightningModules over one shared backbone (DESIGN.md rule 2)."""

from rededit.stages.base import BaseStage
from rededit.stages.dpo import DPOModule
from rededit.stages.nft import NFTModule
from rededit.stages.pretrain import PretrainModule
from rededit.stages.sft import SFTModule

__all__ = ["BaseStage", "DPOModule", "NFTModule", "PretrainModule", "SFTModule"]
