"""Data-engine filter stages (report §2.2): dedup, photometric, artifacts, pair-level, learned slot."""

from rededit.datagen.engine.filters.artifacts import (
    CodeFilter,
    LayoutArtifactFilter,
    LearnedScoreFilter,
    TextOverlayFilter,
)
from rededit.datagen.engine.filters.dedup import EmbeddingDedup, ExactDedup, PairDedup, PerceptualDedup
from rededit.datagen.engine.filters.embedders import CLIPEmbedder, ImageEmbedder, PixelEmbedder, TorchEmbedder
from rededit.datagen.engine.filters.photometric import PhotometricFilter, photometric_descriptors

__all__ = [
    "CLIPEmbedder",
    "CodeFilter",
    "EmbeddingDedup",
    "ExactDedup",
    "ImageEmbedder",
    "LayoutArtifactFilter",
    "LearnedScoreFilter",
    "PairDedup",
    "PerceptualDedup",
    "PhotometricFilter",
    "PixelEmbedder",
    "TextOverlayFilter",
    "TorchEmbedder",
    "photometric_descriptors",
]
