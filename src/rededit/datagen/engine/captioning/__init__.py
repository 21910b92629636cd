"""Captioning engine (report §2.5): prompt templates and the :class:`CaptionStage` data-engine stage."""

from rededit.datagen.engine.captioning.prompts import (
    CaptionTemplate,
    TemplateSet,
    default_templates,
    load_templates,
)
from rededit.datagen.engine.captioning.stage import CAPTION_FIELDS, CaptionStage, rule_user_like

__all__ = [
    "CAPTION_FIELDS",
    "CaptionStage",
    "CaptionTemplate",
    "TemplateSet",
    "default_templates",
    "load_templates",
    "rule_user_like",
]
