"""Text conditioning inside collation: cached embeddings where the key matches, online encoding otherwise.

The key (docs/architecture.md rule 6) covers the instruction *after* Stochastic Instruction Alignment and, for
encoders that see the reference images (Qwen2.5-VL), the ordered hashes of the condition images the encoder
makes from the references exactly as this batch serves them (cover-cropped to their bucket, post-SIA order):
the image a cache entry was made from is the image an online encoding would see, so a hit equals a miss
(``rededit-data encode-text`` derives its keys with the same :func:`~rededit.data.text_cache.prepare_with_hashes`
from the same bucket crop), and a re-indexed, re-ordered or differently cropped sample never reuses a stale
entry.
"""

from __future__ import annotations

from typing import Any

import torch

from rededit.data.text_cache import TextEmbeddingCache, encode_with_cache


class TextConditioner:
    """Callable ``batch -> (text_emb [B, L, D], text_mask [B, L])`` used by :class:`EditCollator`."""

    def __init__(self, encoder: Any, *, root: str, cache_dir: str | None = None, write_back: bool = False):
        self.encoder = encoder
        self.root = root  # the manifest's folder (reference URIs resolve against it)
        self.cache = TextEmbeddingCache(cache_dir, cache_id=encoder.cache_id) if cache_dir else None
        self.write_back = write_back

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = None
        if self.encoder.uses_images:
            refs = batch["references"]  # per position [B, 3, H, W], already in post-SIA order
            images = [[r[i] for r in refs] for i in range(len(batch["ids"]))]
        return encode_with_cache(
            self.encoder,
            batch["texts"],
            None,
            cache=self.cache,
            write_back=self.write_back,
            images=images,
        )
