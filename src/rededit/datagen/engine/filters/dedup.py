"""Hierarchical deduplication (report §2.2.1).

* Level 1, global: :class:`ExactDedup` (SHA-256 of the image bytes), :class:`PerceptualDedup` (pHash,
  Hamming distance ≤ ``max_distance``) and :class:`EmbeddingDedup` (FAISS range search on image embeddings,
  cosine ≥ ``threshold``). Near-duplicates are grouped into connected components; the first row of each
  component in corpus order is kept, the others get ``drop_reason = "<name>:duplicate"`` and the keeper's
  id in column ``<name>_of``. Keeping the first row in corpus order makes the result independent of how
  many workers ran.
* Levels 2–3, pair-level: :class:`PairDedup` compares each edit's source (first reference) with its target
  by PSNR, SSIM and embedding cosine and drops trivial identity mappings (the edit changed nothing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from rededit.data.uri import resolve_uri
from rededit.datagen.engine.filters.common import PartitionMemo, duplicates_from_pairs, load_rgb, map_kept
from rededit.datagen.engine.filters.embedders import ImageEmbedder, PixelEmbedder
from rededit.datagen.engine.stage import (
    BaseEngineStage,
    GlobalEngineStage,
    StageContext,
    apply_drops,
    kept_mask,
    set_column,
)


class _DuplicateStage(GlobalEngineStage):
    """Shared fit/process of the global dedup stages: ``fit`` builds ``{id: keeper id}``, ``process`` applies it.

    Subclasses implement :meth:`keys` (one key per kept row of a partition, None for dropped rows, and the
    per-row error reasons from :func:`map_kept`) and :meth:`group` (index pairs of duplicates among all keys).
    """

    key_column = "key"

    def __init__(self) -> None:
        self._duplicates: dict[str, str] = {}
        self._memo = PartitionMemo()

    def _keys(self, table: pa.Table, ctx: StageContext) -> tuple[list[Any], list[str | None]]:
        return self._memo.get(table, lambda: self.keys(table, ctx))

    def keys(self, table: pa.Table, ctx: StageContext) -> tuple[list[Any], list[str | None]]:
        raise NotImplementedError

    def group(self, keys: list[Any]) -> Iterable[tuple[int, int]]:
        raise NotImplementedError

    def fit(self, partitions: Iterable[pa.Table], ctx: StageContext) -> None:
        ids: list[str] = []
        keys: list[Any] = []
        for table in partitions:
            ks, _ = self._keys(table, ctx)
            for sid, k, keep in zip(table.column("id").to_pylist(), ks, kept_mask(table)):
                if keep and k is not None:
                    ids.append(sid)
                    keys.append(k)
        self._duplicates = duplicates_from_pairs(ids, self.group(keys))

    def state_dict(self) -> dict[str, Any]:
        return {"duplicates": dict(sorted(self._duplicates.items()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._duplicates = dict(state["duplicates"])

    def key_to_column(self, keys: list[Any]) -> pa.Array | None:
        return None

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        keep = kept_mask(table)
        ids = table.column("id").to_pylist()
        of = [self._duplicates.get(sid) if k else None for sid, k in zip(ids, keep)]
        keys, errors = self._keys(table, ctx)
        reasons = [
            self.drop(e) if e is not None else (self.drop("duplicate") if o is not None else None)
            for o, e in zip(of, errors)
        ]
        col = self.key_to_column(keys) if self.key_column else None
        if col is not None:
            table = set_column(table, f"{self.name}_{self.key_column}", col)
        table = set_column(table, f"{self.name}_of", pa.array(of, pa.string()))
        return apply_drops(table, reasons)


class ExactDedup(_DuplicateStage):
    """Exact duplicates: SHA-256 of the target bytes (and, with ``include_references``, of every reference
    in order, so two edits sharing a target but not a source are distinct). Column ``<name>_sha256``."""

    key_column = "sha256"

    def __init__(self, include_references: bool = True, name: str = "exact_dedup"):
        super().__init__()
        self.name = name
        self.include_references = bool(include_references)

    def keys(self, table: pa.Table, ctx: StageContext) -> tuple[list[str | None], list[str | None]]:
        def key(row: dict) -> str:
            h = hashlib.sha256(resolve_uri(row["target"], ctx.root))
            if self.include_references:
                for ref in row.get("references") or []:
                    h.update(b"\0" + hashlib.sha256(resolve_uri(ref, ctx.root)).digest())
            return h.hexdigest()

        return map_kept(table, key)

    def group(self, keys: list[str]) -> Iterable[tuple[int, int]]:
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            j = first.setdefault(k, i)
            if j != i:
                yield j, i

    def key_to_column(self, keys):
        return pa.array(keys, pa.string())


class PerceptualDedup(_DuplicateStage):
    """Near-duplicates by perceptual hash (``imagehash.phash``, ``hash_size² `` bits) of the target.

    Pairs within Hamming distance ``max_distance`` are found without comparing all pairs: the hash is cut
    into ``max_distance + 1`` bands and, by the pigeonhole principle, two hashes that differ in at most
    ``max_distance`` bits agree exactly on at least one band; only rows sharing a band are compared.
    Column ``<name>_phash`` (hex).
    """

    key_column = "phash"

    def __init__(
        self, max_distance: int = 4, hash_size: int = 8, max_side: int = 512, name: str = "phash_dedup"
    ):
        super().__init__()
        self.name = name
        self.max_distance = int(max_distance)
        self.hash_size = int(hash_size)
        self.max_side = int(max_side)
        if not 0 <= self.max_distance < self.hash_size**2:
            raise ValueError(f"{name}: max_distance must be in [0, {self.hash_size**2}), got {max_distance}")

    def keys(self, table: pa.Table, ctx: StageContext) -> tuple[list[np.ndarray | None], list[str | None]]:
        import imagehash
        from PIL import Image

        def key(row: dict) -> np.ndarray:
            img = Image.fromarray(load_rgb(row["target"], ctx.root, self.max_side))
            return imagehash.phash(img, hash_size=self.hash_size).hash.reshape(-1).astype(bool)

        return map_kept(table, key)

    def group(self, keys: list[np.ndarray]) -> Iterable[tuple[int, int]]:
        if not keys:
            return
        bits = np.stack(keys)  # [N, L] bool
        bands = np.array_split(np.arange(bits.shape[1]), self.max_distance + 1)
        seen: set[tuple[int, int]] = set()
        for band in bands:
            buckets: dict[bytes, list[int]] = {}
            for i, b in enumerate(np.packbits(bits[:, band], axis=1)):
                buckets.setdefault(b.tobytes(), []).append(i)
            for members in buckets.values():
                for a_pos, a in enumerate(members):
                    for b in members[a_pos + 1 :]:
                        if (a, b) not in seen and int(
                            np.count_nonzero(bits[a] != bits[b])
                        ) <= self.max_distance:
                            seen.add((a, b))
                            yield a, b

    def key_to_column(self, keys):
        out = [None if k is None else np.packbits(k).tobytes().hex() for k in keys]
        return pa.array(out, pa.string())


class EmbeddingDedup(_DuplicateStage):
    """Near-duplicate clustering on image embeddings with FAISS (report §2.2.1 Level 1).

    Every kept target is embedded (``[N, D]`` unit vectors), indexed with ``faiss.index_factory(D,
    index, METRIC_INNER_PRODUCT)`` ("Flat" is exact; "IVF4096,Flat" etc. for 100M rows) and each row's
    neighbours with cosine ≥ ``threshold`` are found by ``range_search``; connected components are clusters.
    Column ``<name>_cluster_size`` is not stored; ``<name>_of`` names the kept representative.
    """

    key_column = None
    needs_model = True

    def __init__(
        self,
        embedder: ImageEmbedder | None = None,
        threshold: float = 0.95,
        index: str = "Flat",
        nprobe: int = 16,
        max_side: int = 512,
        batch_size: int = 64,
        name: str = "embed_dedup",
    ):
        super().__init__()
        self.name = name
        self.embedder = embedder if embedder is not None else PixelEmbedder()
        self.threshold = float(threshold)
        self.index = index
        self.nprobe = int(nprobe)
        self.max_side = int(max_side)
        self.batch_size = int(batch_size)

    def setup(self) -> None:
        self.embedder.setup()

    def keys(self, table: pa.Table, ctx: StageContext) -> tuple[list[np.ndarray | None], list[str | None]]:
        imgs, errors = map_kept(table, lambda row: load_rgb(row["target"], ctx.root, self.max_side))
        present = [i for i, im in enumerate(imgs) if im is not None]
        out: list[np.ndarray | None] = [None] * len(imgs)
        for s in range(0, len(present), self.batch_size):
            idx = present[s : s + self.batch_size]
            emb = self.embedder.embed([imgs[i] for i in idx])
            for i, e in zip(idx, emb):
                out[i] = e
        return out, errors

    def fit(self, partitions: Iterable[pa.Table], ctx: StageContext) -> None:
        self.setup()
        super().fit(partitions, ctx)

    def group(self, keys: list[np.ndarray]) -> Iterable[tuple[int, int]]:
        import faiss

        if len(keys) < 2:
            return []
        x = np.ascontiguousarray(np.stack(keys).astype(np.float32))
        index = faiss.index_factory(x.shape[1], self.index, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(x)
        if hasattr(index, "nprobe"):
            index.nprobe = self.nprobe
        index.add(x)
        lims, _, labels = index.range_search(x, self.threshold)
        pairs = []
        for i in range(len(keys)):
            for j in labels[lims[i] : lims[i + 1]]:
                if j > i:
                    pairs.append((i, int(j)))
        return pairs


class PairDedup(BaseEngineStage):
    """Pair-level deduplication of edit rows (report §2.2.1 Levels 2–3): drop trivial identity mappings.

    For rows with at least one reference, the source (first reference) is resized to the target's size
    (both capped at ``max_side``) and compared: PSNR (dB), SSIM (``torchmetrics.functional``) on
    ``[1, 3, H, W]`` in [0, 1], and the embedding cosine. A row is dropped as
    ``"<name>:identity_<metric>"`` when any metric reaches its ``*_max`` (None disables a metric).
    Columns ``<name>_psnr``, ``<name>_ssim``, ``<name>_cosine`` (null for T2I rows).
    """

    needs_model = True

    def __init__(
        self,
        psnr_max: float | None = 40.0,
        ssim_max: float | None = 0.98,
        cosine_max: float | None = 0.995,
        embedder: ImageEmbedder | None = None,
        max_side: int = 256,
        name: str = "pair_dedup",
    ):
        self.name = name
        self.psnr_max = psnr_max
        self.ssim_max = ssim_max
        self.cosine_max = cosine_max
        self.embedder = embedder if embedder is not None else PixelEmbedder()
        self.max_side = int(max_side)

    def setup(self) -> None:
        self.embedder.setup()

    def metrics(self, source: np.ndarray, target: np.ndarray) -> dict[str, float]:
        """PSNR / SSIM / cosine of two ``[H, W, 3]`` uint8 images (source resized to the target's size).

        PSNR = 10·log10(1 / MSE) on [0, 1] pixels (capped at 100 dB; what ``torchmetrics`` computes, done in
        numpy because importing torchmetrics costs seconds per worker); SSIM is torchmetrics'
        ``structural_similarity_index_measure`` (Gaussian 11x11 window), imported only when ``ssim_max`` is set.
        """
        from PIL import Image

        if source.shape != target.shape:
            source = np.asarray(
                Image.fromarray(source).resize((target.shape[1], target.shape[0]), Image.BICUBIC)
            )
        s = source.astype(np.float64) / 255.0
        t = target.astype(np.float64) / 255.0
        mse = float(np.mean((s - t) ** 2))
        psnr = 100.0 if mse <= 1e-10 else min(100.0, 10.0 * np.log10(1.0 / mse))
        ssim = float("nan")
        if self.ssim_max is not None and min(target.shape[:2]) >= 11:
            import torch
            from torchmetrics.functional.image import structural_similarity_index_measure

            st = torch.from_numpy(s).permute(2, 0, 1)[None].float()
            tt = torch.from_numpy(t).permute(2, 0, 1)[None].float()
            ssim = float(structural_similarity_index_measure(st, tt, data_range=1.0))
        emb = self.embedder.embed([source, target])
        return {"psnr": float(psnr), "ssim": ssim, "cosine": float(emb[0] @ emb[1])}

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        self.setup()

        def one(row: dict) -> dict[str, float] | None:
            refs = row.get("references") or []
            if not refs:
                return None
            return self.metrics(
                load_rgb(refs[0], ctx.root, self.max_side), load_rgb(row["target"], ctx.root, self.max_side)
            )

        results, reasons = map_kept(table, one)
        limits = {"psnr": self.psnr_max, "ssim": self.ssim_max, "cosine": self.cosine_max}
        out_reasons: list[str | None] = []
        for res, why in zip(results, reasons):
            if why is not None:
                out_reasons.append(self.drop(why))
                continue
            hit = [m for m, lim in limits.items() if res is not None and lim is not None and res[m] >= lim]
            out_reasons.append(self.drop(f"identity_{hit[0]}") if hit else None)
        for m in ("psnr", "ssim", "cosine"):
            table = set_column(
                table,
                f"{self.name}_{m}",
                pa.array([None if r is None else r[m] for r in results], pa.float32()),
            )
        return apply_drops(table, out_reasons)
