"""Pre-computed text embeddings (report §3.2 "System-Level Efficiency": VLM features are extracted
offline and stored as tensors, so training spends no FLOPs on the frozen encoder).

Keys (docs/architecture.md rule 6): an entry is keyed by the sha256 of a canonical JSON of EVERYTHING that
determines the embedding: the encoder's ``cache_id`` (weights id, template version, max length,
dtype), the prompt template the text is encoded with (Qwen-VL: the text-to-image template without
references, the edit template with them), the instruction text exactly as encoded (i.e. AFTER Stochastic
Instruction Alignment re-indexing), the ordered hashes of the reference images *as the encoder sees them*
(for encoders whose output depends on them: :func:`condition_image_hash` of each condition image, the
reference resized as the diffusers pipeline resizes it, from the reference as training serves it, i.e.
cover-cropped to its bucket; ``[]`` for text-only encoders), the max length and the dtype. Any change of
any part is a different key, so a stale entry is a miss and gets encoded online (and optionally written
back); it is never silently reused. ``rededit-data encode-text`` and the training loader derive those
hashes with the same functions, so a cache hit is the online encoding of the same sample.

On-disk layout of a cache folder::

    meta.json                 {"format": 1, "cache_ids": [...]}: encoders that wrote here
    index.json                {key: shard file name}, replaced atomically
    shard-00000.safetensors   entries: key → emb [L_valid, D] (valid tokens only, unpadded);
                              the header metadata stores a blake2b checksum per entry
    .lock                     advisory lock serialising writers (POSIX flock)

The JSON index is loaded whole by every reader (~100 bytes per entry): fine up to a few million
entries; beyond that it should move to a Parquet/SQLite index (same file layout otherwise).

Shards are immutable once written (a writer reserves a fresh name with O_EXCL, writes it atomically,
then merges its keys into the index under the lock), so concurrent writers (ranks writing back
online-encoded misses) never clobber each other. A missing/corrupt shard or an entry failing its
checksum is a miss plus a warning: never a crash, never a reuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rededit.models.text_encoder import TextEncoder, pad_embeddings
from rededit.utils.io import atomic_path, atomic_write_text
from rededit.utils.logging import get_logger

log = get_logger(__name__)

KEY_VERSION = 2  # 2: the template name, and condition-image hashes instead of file hashes
FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


AUTO = "auto"
DEFAULT_DIRNAME = "text_cache"


def default_cache_dir(manifest: str | Path) -> Path:
    """Where ``rededit-data encode-text`` writes a manifest's cache unless told otherwise: ``text_cache/``
    beside the manifest, so training finds it with ``data.text_cache=auto`` (the default)."""
    return Path(manifest).parent / DEFAULT_DIRNAME


def resolve_cache_dir(setting: str | Path | None, manifest: str | Path) -> str | None:
    """The cache folder a run reads: ``setting`` itself, or for ``auto`` the manifest's
    :func:`default_cache_dir` when it exists (else none: every text is encoded online).

    A run told ``null`` while a cache sits beside its manifest says so once: it trains correctly (every
    text is encoded online) but pays the encoder on every step.
    """
    beside = default_cache_dir(manifest)
    if setting is None:
        if beside.is_dir():
            log.warning("data.text_cache=null: encoding every text online although %s holds a cache", beside)
        return None
    if str(setting) == AUTO:
        if beside.is_dir():
            log.info("text embeddings: the cache beside the manifest, %s (misses are encoded online)", beside)
            return str(beside)
        return None
    return str(setting)


def text_cache_key(
    cache_id: str,
    text: str,
    reference_hashes: Sequence[str],
    max_length: int,
    dtype: str,
    template: str | None = None,
) -> str:
    """Content key of one embedding (sha256 hex).

    Args:
        cache_id: the encoder's :attr:`~rededit.models.text_encoder.TextEncoder.cache_id`.
        text: the exact text given to the encoder, after SIA re-indexing (no normalisation: any change
            may change the tokens).
        reference_hashes: ordered :func:`image_content_hash` of the reference images the encoder sees;
            ``[]`` for encoders that do not use images.
        max_length: token limit.
        dtype: embedding dtype name (``"float32"``, ``"bfloat16"``).
        template: the prompt template's name (:meth:`~rededit.models.text_encoder.TextEncoder.template_for`).
    """
    payload = {
        "v": KEY_VERSION,
        "cache_id": cache_id,
        "template": template,
        "text": text,
        "refs": list(reference_hashes),
        "max_length": int(max_length),
        "dtype": str(dtype).removeprefix("torch."),
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def image_content_hash(data: bytes) -> str:
    """sha256 hex of an image file's bytes (re-encoding an image changes it: a conservative miss)."""
    return hashlib.sha256(data).hexdigest()


def condition_image_hash(image: torch.Tensor) -> str:
    """sha256 hex of a condition image exactly as an image-using encoder consumes it (uint8 ``[3, h, w]``
    from :meth:`~rededit.models.text_encoder.TextEncoder.prepare_images`): its shape and pixels."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"condition images are uint8 [3, h, w], got {image.dtype} {tuple(image.shape)}")
    h = hashlib.sha256(f"{tuple(image.shape)}".encode())
    h.update(image.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_keys(
    encoder: TextEncoder, texts: Sequence[str], reference_hashes_per_text: Sequence[Sequence[str]]
) -> list[str]:
    """The cache key of each text with its ordered reference hashes (``[]`` for text-only encoders)."""
    dtype = encoder.dtype_name
    # A duck-typed encoder without ``template_for`` has a single template (its cache_id names it).
    template_for = getattr(encoder, "template_for", lambda n: None)
    return [
        text_cache_key(encoder.cache_id, t, h, encoder.max_length, dtype, template=template_for(len(h)))
        for t, h in zip(texts, reference_hashes_per_text)
    ]


def prepare_with_hashes(
    encoder: TextEncoder, images: Sequence[Sequence[Any]]
) -> tuple[list[list[torch.Tensor]], list[list[str]]]:
    """Per text, the condition images ``encoder`` encodes from ``images`` (the references as training serves
    them) and their :func:`condition_image_hash` es: the one derivation of the image part of a key, shared by
    ``rededit-data encode-text`` and the training loader."""
    prepared = encoder.prepare_images(images) or [[] for _ in images]
    return prepared, [[condition_image_hash(c) for c in per] for per in prepared]


def _checksum(t: torch.Tensor) -> str:
    raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    h = hashlib.blake2b(raw, digest_size=16)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    return h.hexdigest()


class TextEmbeddingCache:
    """Sharded safetensors store of unpadded text embeddings ``[L_valid, D]`` keyed by
    :func:`text_cache_key`.

    Args:
        root: cache folder (created if missing).
        cache_id: the encoder that will read/write here. A cache written by another ``cache_id`` is an
            error unless ``allow_mixed``: keys include the cache id so mixing is SAFE (entries never
            collide), the check only guards against pointing a run at the wrong folder.
        allow_mixed: accept a folder that already holds entries of other encoders.
        shard_size: at most this many entries per shard file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cache_id: str | None = None,
        *,
        allow_mixed: bool = False,
        shard_size: int = 1024,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        if not self.root.is_dir():
            self.root.mkdir(parents=True)
        self.shard_size = shard_size
        self.cache_id = cache_id
        self._index: dict[str, str] = {}
        if cache_id is not None and cache_id not in self._read_meta().get("cache_ids", []):
            # Only a new encoder id needs the lock and a write, so read-only caches open fine.
            with self._lock():
                ids = list(self._read_meta().get("cache_ids", []))
                if ids and cache_id not in ids and not allow_mixed:
                    raise ValueError(
                        f"text cache {self.root} was written by encoder(s) {ids}, not {cache_id!r}; use "
                        "another folder or pass allow_mixed=True (keys include the encoder id, so "
                        "entries never collide)"
                    )
                if cache_id not in ids:
                    ids.append(cache_id)
                    atomic_write_text(
                        self.root / "meta.json",
                        json.dumps({"format": FORMAT_VERSION, "cache_ids": ids}, indent=1),
                    )
        self.refresh()

    # --- files -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_meta(self) -> dict:
        path = self.root / "meta.json"
        if not path.exists():
            return {}
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported text cache format {meta.get('format')!r}")
        return meta

    def _read_index(self) -> dict[str, str]:
        path = self.root / "index.json"
        if not path.exists():
            return {}
        try:
            return dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            log.warning("text cache index %s is unreadable (%s); rebuilding from shards", path, err)
            return self._scan_shards()

    def _scan_shards(self) -> dict[str, str]:
        index: dict[str, str] = {}
        for shard in sorted(p for p in self.root.iterdir() if _SHARD_RE.match(p.name)):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    index.update(dict.fromkeys(f.keys(), shard.name))
            except Exception as err:  # a corrupt shard only costs its entries
                log.warning("text cache shard %s is unreadable (%s); its entries are misses", shard, err)
        return index

    def refresh(self) -> None:
        """Re-read the index (to see entries other processes wrote since this object was made)."""
        self._index = self._read_index()

    def rebuild_index(self) -> int:
        """Rebuild ``index.json`` from the shard headers (e.g. after deleting shards). Returns its size."""
        with self._lock():
            self._index = self._scan_shards()
            atomic_write_text(self.root / "index.json", json.dumps(self._index))
        return len(self._index)

    def _reserve_shard(self) -> Path:
        nums = [int(m.group(1)) for p in self.root.iterdir() if (m := _SHARD_RE.match(p.name))]
        n = max(nums, default=-1) + 1
        while True:
            path = self.root / f"shard-{n:05d}.safetensors"
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return path
            except FileExistsError:
                n += 1

    # --- mapping API -----------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> Iterable[str]:
        return self._index.keys()

    def get(self, key: str) -> torch.Tensor | None:
        """The stored ``[L_valid, D]`` embedding, or None (absent, or its shard is missing/corrupt)."""
        return self.get_many([key])[key]

    def get_many(self, keys: Sequence[str]) -> dict[str, torch.Tensor | None]:
        """Look up several keys, opening each shard once. Misses (and unreadable entries) map to None."""
        out: dict[str, torch.Tensor | None] = dict.fromkeys(keys)
        by_shard: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            shard = self._index.get(key)
            if shard is not None:
                by_shard.setdefault(shard, []).append(key)
        for shard, shard_keys in by_shard.items():
            path = self.root / shard
            try:
                with safe_open(str(path), framework="pt") as f:
                    sums = f.metadata() or {}
                    for key in shard_keys:
                        try:
                            t = f.get_tensor(key)
                        except Exception as err:
                            log.warning("text cache entry %s missing from %s (%s); miss", key[:12], path, err)
                            continue
                        if t.ndim != 2 or sums.get(key) != _checksum(t):
                            log.warning("text cache entry %s in %s fails its checksum; miss", key[:12], path)
                            continue
                        out[key] = t
            except Exception as err:
                log.warning("text cache shard %s is unreadable (%s); %d misses", path, err, len(shard_keys))
        return out

    def put_many(self, entries: Mapping[str, torch.Tensor]) -> int:
        """Store new entries (each ``[L_valid, D]``) in new shard(s) and publish them in the index.

        Keys already present are skipped (they are content keys: same key, same embedding).

        Returns:
            The number of entries written.
        """
        new = {k: v for k, v in entries.items() if k not in self._index}
        for key, t in new.items():
            if t.ndim != 2:
                raise ValueError(f"cache entries must be [L, D], got {tuple(t.shape)} for {key[:12]}")
        if not new:
            return 0
        items = list(new.items())
        written: dict[str, str] = {}
        for start in range(0, len(items), self.shard_size):
            chunk = {k: v.detach().to("cpu").contiguous() for k, v in items[start : start + self.shard_size]}
            path = self._reserve_shard()
            with atomic_path(path) as tmp:
                save_file(chunk, str(tmp), metadata={k: _checksum(v) for k, v in chunk.items()})
            written.update(dict.fromkeys(chunk, path.name))
        with self._lock():
            index = self._read_index()  # merge with what other writers published meanwhile
            index.update({k: v for k, v in written.items() if k not in index})
            atomic_write_text(self.root / "index.json", json.dumps(index))
            self._index = index
        return len(written)


def encode_with_cache(
    encoder: TextEncoder,
    texts: Sequence[str],
    reference_hashes_per_text: Sequence[Sequence[str]] | None = None,
    cache: TextEmbeddingCache | None = None,
    write_back: bool = False,
    images: Sequence[Sequence[Any]] | None = None,
    stats: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings for a batch: cached entries where the key matches, online encoding for the rest.

    Args:
        encoder: the (frozen) text encoder; its ``cache_id``/``max_length``/``dtype`` enter the key.
        texts: ``B`` texts exactly as they are to be encoded (after SIA re-indexing).
        reference_hashes_per_text: per text, the ordered :func:`condition_image_hash` es of its references;
            None to derive them from ``images`` (:func:`prepare_with_hashes`). Ignored (``[]`` is used) when
            ``encoder.uses_images`` is False, since the output does not depend on them.
        cache: the store, or None to always encode.
        write_back: store the online-encoded misses in ``cache``.
        images: per text, its ordered reference images as training serves them (``[3, H, W]`` in
            [-1, 1]); needed by an image-using encoder unless the hashes are given and every text hits.
        stats: optional counters, incremented in place: ``hits`` and ``misses`` (lookups in ``cache``).

    Returns:
        ``(emb [B, L, D], mask [B, L] bool)``, padded like ``encoder.encode``.
    """
    n = len(texts)
    prepared = None
    if encoder.uses_images:
        if reference_hashes_per_text is None:
            if images is None or len(images) != n:
                raise ValueError("an image-using encoder needs one reference-image (or hash) list per text")
            prepared, ref_hashes = prepare_with_hashes(encoder, images)
        elif len(reference_hashes_per_text) != n:
            raise ValueError("an image-using encoder needs one reference-hash list per text")
        else:
            ref_hashes = [list(h) for h in reference_hashes_per_text]
    else:
        ref_hashes = [[] for _ in range(n)]
    keys = cache_keys(encoder, texts, ref_hashes)
    seqs: list[torch.Tensor | None] = [None] * n
    if cache is not None:
        found = cache.get_many(keys)
        for i, key in enumerate(keys):
            t = found[key]
            if t is not None and (t.shape[-1] != encoder.dim or not 1 <= t.shape[0] <= encoder.max_length):
                log.warning(
                    "text cache entry %s has shape %s for a D=%d encoder; miss",
                    key[:12],
                    tuple(t.shape),
                    encoder.dim,
                )
                t = None
            if t is not None:
                seqs[i] = t.to(encoder.device)
    misses = [i for i in range(n) if seqs[i] is None]
    if misses:
        miss_texts = [texts[i] for i in misses]
        if not encoder.uses_images:
            encoded = encoder.encode_sequences(miss_texts, None)
        else:
            if prepared is None:
                if images is None and any(ref_hashes[i] for i in misses):
                    raise ValueError("cache misses for an image-using encoder need the reference images")
                miss_images = [list(images[i]) if images is not None else [] for i in misses]
                miss_prepared = encoder.prepare_images(miss_images) or [[] for _ in misses]
                got = [[condition_image_hash(c) for c in per] for per in miss_prepared]
                if got != [ref_hashes[i] for i in misses]:
                    raise ValueError("the reference images given do not match the reference hashes given")
            else:
                miss_prepared = [prepared[i] for i in misses]
            encoded = encoder.encode_prepared(miss_texts, miss_prepared)
        for i, e in zip(misses, encoded):
            seqs[i] = e
        if cache is not None and write_back:
            cache.put_many({keys[i]: seqs[i] for i in misses})
    log.debug("text cache: %d hits, %d misses", n - len(misses), len(misses))
    if stats is not None and cache is not None:
        stats["hits"] = stats.get("hits", 0) + n - len(misses)
        stats["misses"] = stats.get("misses", 0) + len(misses)
    length = encoder.max_length if encoder.pad_to_max else None
    return pad_embeddings([s for s in seqs if s is not None], length, encoder.dim)
