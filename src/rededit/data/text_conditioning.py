"""Text conditioning inside collation: cached embeddings where the key matches, online encoding otherwise.

The key (docs/architecture.md rule 6) covers the instruction *after* Stochastic Instruction Alignment and, for
encoders that see the reference images (Qwen2.5-VL), the ordered content hashes of those images, so a
re-indexed or re-ordered sample never reuses a stale entry.
"""

from __future__ import annotations

from typing import Any

import torch

from rededit.data.text_cache import TextEmbeddingCache, encode_with_cache, image_content_hash
from rededit.data.uri import resolve_uri


class TextConditioner:
    """Callable ``batch -> (text_emb [B, L, D], text_mask [B, L])`` used by :class:`EditCollator`."""

    def __init__(self, encoder: Any, *, root: str, cache_dir: str | None = None, write_back: bool = False):
        self.encoder = encoder
        self.root = root  # the manifest's folder: reference URIs resolve against it
        self.cache = TextEmbeddingCache(cache_dir, cache_id=encoder.cache_id) if cache_dir else None
        self.write_back = write_back
        self._hash_of_uri: dict[str, str] = {}

    def _ref_hashes(self, batch: dict[str, Any]) -> list[list[str]] | None:
        if not self.encoder.uses_images:
            return None

        hashes = []
        for uris in batch["reference_uris"]:
            row = []
            for uri in uris:
                if uri not in self._hash_of_uri:
                    self._hash_of_uri[uri] = image_content_hash(resolve_uri(uri, self.root))
                row.append(self._hash_of_uri[uri])
            hashes.append(row)
        return hashes

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = None
        if self.encoder.uses_images:
            refs = batch["references"]  # per position [B, 3, H, W], already in post-SIA order
            images = [[r[i] for r in refs] for i in range(len(batch["ids"]))]
        return encode_with_cache(
            self.encoder,
            batch["texts"],
            self._ref_hashes(batch),
            cache=self.cache,
            write_back=self.write_back,
            images=images,
        )
