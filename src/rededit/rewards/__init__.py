"""Rewards of the online RL stage (report §3.6.2): layout-aware OCR (eq. 5), VLM soft score (eq. 4),
preservation, their weighted mix, and the unrewarded hack monitors logged next to them.

Pure PyTorch (no Lightning): the NFT stage and the evaluation harness both import them.

May import: ``rededit.scoring`` (OCR, metrics, judges), ``rededit.data``, the core, ``rededit.models``,
``rededit.utils``.
"""

from rededit.rewards.base import Reward, RewardMix, from_dataset_range, source_from_batch
from rededit.rewards.monitors import MONITOR_KEYS, hack_monitors, text_area_fraction
from rededit.rewards.ocr_layout import (
    CharBox,
    LayoutOCRScore,
    OCRReward,
    levenshtein_alignment,
    ocr_layout_reward,
)
from rededit.rewards.preservation import PreservationReward
from rededit.rewards.vlm_soft import (
    OpenAICompatibleSoftScorer,
    SoftScorer,
    TransformersSoftScorer,
    VLMSoftReward,
    soft_score_from_top_logprobs,
    vlm_soft_score,
)

__all__ = [
    "MONITOR_KEYS",
    "CharBox",
    "LayoutOCRScore",
    "OCRReward",
    "OpenAICompatibleSoftScorer",
    "PreservationReward",
    "Reward",
    "RewardMix",
    "SoftScorer",
    "TransformersSoftScorer",
    "VLMSoftReward",
    "from_dataset_range",
    "hack_monitors",
    "levenshtein_alignment",
    "ocr_layout_reward",
    "soft_score_from_top_logprobs",
    "source_from_batch",
    "text_area_fraction",
    "vlm_soft_score",
]
