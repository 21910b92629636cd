"""Training stages: thin LightningModules over one shared backbone (DESIGN.md rule 2)."""

from rededit.stages.base import BaseStage
from rededit.stages.pretrain import PretrainModule
from rededit.stages.sft import SFTModule

__all__ = ["BaseStage", "PretrainModule", "SFTModule"]
