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
from rededit.utils.logging import get_logger

log = get_logger(__name__)

#: After this many cache lookups without a single hit, say so once (the cache is for another setup).
NO_HIT_WARN_AFTER = 256


class TextConditioner:
    """Callable ``batch -> (text_emb [B, L, D], text_mask [B, L])`` used by :class:`EditCollator`."""

    def __init__(self, encoder: Any, *, root: str, cache_dir: str | None = None, write_back: bool = False):
        self.encoder = encoder
        self.root = root  # the manifest's folder (reference URIs resolve against it)
        self.cache = TextEmbeddingCache(cache_dir, cache_id=encoder.cache_id) if cache_dir else None
        self.write_back = write_back
        self.stats: dict[str, int] = {"hits": 0, "misses": 0}
        self._warned = False

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = None
        if self.encoder.uses_images:
            refs = batch["references"]  # per position [B, 3, H, W], already in post-SIA order
            images = [[r[i] for r in refs] for i in range(len(batch["ids"]))]
        out = encode_with_cache(
            self.encoder,
            batch["texts"],
            None,
            cache=self.cache,
            write_back=self.write_back,
            images=images,
            stats=self.stats,
        )
        if not self._warned and self.stats["hits"] == 0 and self.stats["misses"] >= NO_HIT_WARN_AFTER:
            self._warned = True
            hint = " and --buckets = data.buckets" if self.encoder.uses_images else ""
            log.warning(
                "text cache %s: none of the first %d lookups hit, every text is encoded online; was it written "
                "by `rededit-data encode-text` with this encoder%s?",
                self.cache.root,
                self.stats["misses"],
                hint,
            )
        return out
