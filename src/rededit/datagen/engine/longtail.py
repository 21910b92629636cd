"""Long-tail check-and-fill (report §2.4): index every instruction, measure density per task and per
instruction cluster, flag data gaps, retrieve base images for a gap, and fill it with the synthetic engine.

Check::

    idx = build_instruction_index(manifest, "index/", encoder)     # FAISS inner-product index of unit
                                                                   # text embeddings [N, D] + metadata
    rep = density_report("index/", n_clusters=64, min_per_task=500, min_per_cluster=20)   # report.{json,md}
    q = idx.density(["make it snow"], encoder, radius=0.8)          # "sample density for an instruction"

Fill::

    fill_gap("corpus/manifest.parquet", task="viewpoint", n=200, seed=0)   # synth rows appended atomically
    build_image_index(pool_uris, root, embedder, "pool/")                  # §2.4 retrieval framework
    query_images("pool/", embedder, text="a snowy street")                 # text→image (joint embedder)
    query_images("pool/", embedder, image=seed_img)                        # image→image

Embeddings: any object with ``encode(texts) -> [N, D]`` (``embedder_id`` names it in ``index.json``):
:class:`MiniLMSentenceEncoder` (the embedded default text encoder, mean-pooled) or the model-free
:class:`HashingTextEncoder`. Image embedders implement ``encode_images(images) -> [N, D]`` and, for text
queries, ``encode(texts)`` into the same space (:class:`CLIPJointEmbedder` on a local CLIP/SigLIP folder;
:class:`ColourLayoutEmbedder` is a model-free image→image descriptor of layout and colour). Vectors are
L2-normalised so inner product = cosine similarity.

Fill uses the model-free template engine (:func:`rededit.datagen.synth.synthesize`, restricted to the gap's
task with ``task_weights``); the report's fill routes *retrieved* images through expert editing models,
which need weights we do not ship — :func:`query_images` returns those candidates for such a pipeline.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rededit.data.images import load_image
from rededit.datagen.engine.filters.embedders import CLIPEmbedder, describe_callable
from rededit.datagen.engine.stage import DROP_COLUMN
from rededit.datagen.synth import TASKS, synthesize
from rededit.models.text_encoder import MiniLMTextEncoder
from rededit.scoring.judges.vlm import fingerprint_folder
from rededit.utils.io import atomic_path, atomic_write_text
from rededit.utils.logging import get_logger
from rededit.utils.seeding import derive_seed

__all__ = [
    "CLIPJointEmbedder",
    "ColourLayoutEmbedder",
    "EngineImageEmbedder",
    "FillResult",
    "HashingTextEncoder",
    "InstructionIndex",
    "MiniLMSentenceEncoder",
    "TextEmbedder",
    "build_image_index",
    "build_instruction_index",
    "cluster_embeddings",
    "density_report",
    "fill_from_report",
    "fill_gap",
    "query_images",
]

log = get_logger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.parquet"
INFO_FILE = "index.json"
FORMAT = 1


class TextEmbedder(Protocol):
    embedder_id: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12))


def _encode(embedder: Any, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """``[N, D]`` unit float32 embeddings of ``texts`` in batches."""
    parts = [
        np.asarray(embedder.encode(list(texts[i : i + batch_size]))) for i in range(0, len(texts), batch_size)
    ]
    if not parts:
        raise ValueError("nothing to embed")
    out = _unit(np.concatenate(parts))
    if out.shape[0] != len(texts):
        raise ValueError(f"embedder returned {out.shape[0]} vectors for {len(texts)} texts")
    return out


def _embedder_id(embedder: Any) -> str:
    return str(getattr(embedder, "embedder_id", type(embedder).__qualname__))


class HashingTextEncoder:
    """Model-free text embedding: hashed word unigrams and bigrams (signed feature hashing), ``[N, dim]``.

    Deterministic on every machine; captures lexical overlap only (paraphrases with different words are
    far apart), so it is a fallback and a test fixture, not a replacement for a learned encoder.
    """

    def __init__(self, dim: int = 256):
        if dim < 8:
            raise ValueError(f"dim must be ≥ 8, got {dim}")
        self.dim = int(dim)
        self.embedder_id = f"hashing-bow:{self.dim}:v1"

    def _features(self, text: str) -> list[str]:
        # Latin words; CJK text has no spaces, so each Han character is a token (bigrams give phrases).
        words = re.findall(r"[\u4e00-\u9fff]|[^\W\u4e00-\u9fff]+", text.lower())
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for f in self._features(t):
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return out


class MiniLMSentenceEncoder:
    """Mean-pooled all-MiniLM-L6-v2 sentence vectors (the embedded default text encoder), ``[N, 384]``."""

    def __init__(self, path: str | None = None, max_length: int = 64):
        self._enc = MiniLMTextEncoder(path=path, max_length=max_length)
        self.embedder_id = self._enc.cache_id

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._enc.pooled(list(texts), normalize=True).float().cpu().numpy()


class ColourLayoutEmbedder:
    """Model-free image descriptor: a ``grid × grid`` RGB thumbnail (layout + colour distribution) plus a
    per-channel 8-bin histogram, ``[N, 3·grid² + 24]``, centred so cosine compares structure, not brightness.
    Image→image queries only (it has no text side)."""

    def __init__(self, grid: int = 8):
        self.grid = int(grid)
        self.embedder_id = f"colour-layout:{self.grid}:v1"

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        from PIL import Image

        rows = []
        for im in images:
            rgb = (
                np.asarray(im.convert("RGB").resize((self.grid, self.grid), Image.Resampling.BOX), np.float32)
                / 255.0
            )
            hist = [
                np.histogram(np.asarray(im.convert("RGB"))[..., c], bins=8, range=(0, 256))[0]
                for c in range(3)
            ]
            h = np.concatenate(hist).astype(np.float32)
            h /= max(h.sum() / 3.0, 1.0)
            rows.append(np.concatenate([rgb.ravel() - 0.5, h - 1.0 / 8.0]))
        return np.stack(rows)


class EngineImageEmbedder:
    """Adapter: a data-engine :class:`~rededit.datagen.engine.filters.embedders.ImageEmbedder` (``embed`` on
    ``[H, W, 3]`` uint8 arrays: pixel, torch-checkpoint or CLIP embedders of the dedup stages) used as a
    long-tail image embedder (``encode_images`` on PIL images). Image→image only."""

    def __init__(self, embedder: Any):
        self.embedder = embedder
        cfg = embedder.config() if callable(getattr(embedder, "config", None)) else {}
        self.embedder_id = (
            f"engine:{describe_callable(embedder)}:{json.dumps(cfg, sort_keys=True, default=str)}"
        )

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        return self.embedder.embed([np.asarray(im.convert("RGB")) for im in images])


class CLIPJointEmbedder(EngineImageEmbedder):
    """Text→image and image→image retrieval (§2.4) with a local CLIP / SigLIP ``transformers`` folder.

    The image side is the dedup stages' :class:`~rededit.datagen.engine.filters.embedders.CLIPEmbedder`
    (``get_image_features``); the text side is ``get_text_features`` of the same model, so both land in
    the joint space. The id is a fingerprint of the folder's files, not its path.
    """

    def __init__(self, path: str | Path, input_size: int = 224, device: str = "cpu", max_length: int = 77):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"CLIP model folder not found: {path} (no hub access: use a local copy)")
        super().__init__(CLIPEmbedder(path, input_size=input_size, device=device))
        self.path = str(path)
        self.max_length = int(max_length)
        self.embedder_id = f"clip:{fingerprint_folder(Path(path))}:{input_size}"
        self._tokenizer = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch
        from transformers import AutoTokenizer

        self.embedder.setup()
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.embedder.device)
        with torch.no_grad():
            out = self.embedder._module.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
            )
        out = out if not hasattr(out, "pooler_output") else out.pooler_output
        return _unit(out.float().cpu().numpy())


# --- instruction index ---------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a declared dependency of the engine
        raise ImportError("long-tail indexing needs faiss-cpu (pip install faiss-cpu)") from err
    return faiss


def _write_index(index: Any, path: Path) -> None:
    faiss = _faiss()
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _read_table(manifest: str | Path | pa.Table) -> pa.Table:
    return manifest if isinstance(manifest, pa.Table) else pq.read_table(manifest)


@dataclass
class InstructionIndex:
    """A saved instruction index: FAISS inner-product index over unit embeddings, one entry per text.

    Attributes:
        folder: where ``index.faiss``, ``meta.parquet`` (id, task, column, text) and ``index.json`` live.
        index: the FAISS index.
        meta: one row per indexed text, in index order.
        info: embedder id, dimension, columns, counts.
    """

    folder: Path
    index: Any
    meta: pa.Table
    info: dict

    @classmethod
    def load(cls, folder: str | Path) -> InstructionIndex:
        folder = Path(folder)
        missing = [n for n in (INDEX_FILE, META_FILE, INFO_FILE) if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a long-tail index folder (missing {missing})")
        info = json.loads((folder / INFO_FILE).read_text())
        index = _faiss().read_index(str(folder / INDEX_FILE))
        meta = pq.read_table(folder / META_FILE)
        if index.ntotal != meta.num_rows:
            raise ValueError(f"{folder}: index has {index.ntotal} vectors but meta has {meta.num_rows} rows")
        return cls(folder, index, meta, info)

    def embeddings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``[stop - start, D]`` stored vectors (exact for flat indexes, decoded for compressed ones)."""
        stop = self.index.ntotal if stop is None else min(stop, self.index.ntotal)
        return self.index.reconstruct_n(start, stop - start)

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """``[len(positions), D]`` stored vectors at the given index positions."""
        faiss = _faiss()
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:  # not an IVF index: every position reconstructs directly
            ivf = None
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()  # IVF lists are keyed by id; random access needs the map
        return self.index.reconstruct_batch(np.asarray(positions, dtype=np.int64))

    def check_embedder(self, embedder: Any) -> None:
        if _embedder_id(embedder) != self.info["embedder_id"]:
            raise ValueError(
                f"index {self.folder} was built with {self.info['embedder_id']!r}; "
                f"query embedder is {_embedder_id(embedder)!r}"
            )

    def density(
        self,
        queries: Sequence[str],
        embedder: Any,
        radius: float = 0.8,
        min_count: int = 1,
        examples: int = 5,
    ) -> list[dict]:
        """Training samples near each query instruction (§2.4 "quantify the available training samples").

        Args:
            queries: instructions describing the domain the model is weak at.
            radius: cosine similarity at or above which an indexed text counts as "this instruction".
            min_count: fewer distinct rows than this → ``gap: True``.
            examples: nearest texts listed per query.

        Returns:
            One dict per query: ``count`` (distinct rows within ``radius``), ``tasks`` (their task
            histogram), ``gap``, ``nearest`` [(similarity, id, text)].
        """
        self.check_embedder(embedder)
        q = _encode(embedder, list(queries))
        lims, _, ids = self.index.range_search(q, float(radius))
        k = min(examples, self.index.ntotal)
        top_s, top_i = self.index.search(q, k) if k else (np.zeros((len(q), 0)), np.zeros((len(q), 0), int))
        row_ids = self.meta.column("id").to_pylist()
        tasks = self.meta.column("task").to_pylist()
        texts = self.meta.column("text").to_pylist()
        out = []
        for j, query in enumerate(queries):
            hit = ids[lims[j] : lims[j + 1]]
            rows = {row_ids[h]: tasks[h] for h in hit}
            out.append({
                "query": query,
                "radius": float(radius),
                "count": len(rows),
                "tasks": dict(sorted(Counter(rows.values()).items())),
                "gap": len(rows) < min_count,
                "nearest": [(round(float(s), 4), row_ids[i], texts[i]) for s, i in zip(top_s[j], top_i[j]) if i >= 0],
            })  # fmt: skip
        return out


def build_instruction_index(
    manifest: str | Path | pa.Table,
    out_dir: str | Path,
    embedder: Any,
    columns: Sequence[str] = ("instruction",),
    include_dropped: bool = False,
    batch_size: int = 256,
    index_factory: str = "Flat",
    train_size: int = 200_000,
) -> InstructionIndex:
    """Embed every non-empty text of ``columns`` (kept rows only unless ``include_dropped``) into a FAISS
    inner-product index saved atomically under ``out_dir``.

    Embeddings are streamed into the index batch by batch, so memory holds the index, not an ``[N, D]``
    copy. ``index_factory`` is a FAISS factory string: ``"Flat"`` (exact, default) or, for 10⁸-row
    corpora, a compressed one such as ``"OPQ32,IVF65536,PQ32"``, trained on ``train_size`` texts taken
    at an even stride through the manifest.

    Raises:
        ValueError: unknown column, or no text to index.
    """
    table = _read_table(manifest)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"manifest has no column(s) {missing}; columns: {table.column_names}")
    keep = [True] * table.num_rows
    if DROP_COLUMN in table.column_names and not include_dropped:
        keep = [r is None for r in table.column(DROP_COLUMN).to_pylist()]
    ids, tasks = table.column("id").to_pylist(), table.column("task").to_pylist()
    meta: dict[str, list] = {"id": [], "task": [], "column": [], "text": []}
    for col in columns:
        for rid, task, text, k in zip(ids, tasks, table.column(col).to_pylist(), keep):
            if k and isinstance(text, str) and text.strip():
                for key, v in (("id", rid), ("task", task), ("column", col), ("text", text.strip())):
                    meta[key].append(v)
    texts = meta["text"]
    if not texts:
        raise ValueError(f"no non-empty text in columns {list(columns)} of the kept rows")
    faiss = _faiss()
    index = None
    step = max(batch_size, 8192)
    for start in range(0, len(texts), step):
        emb = _encode(embedder, texts[start : start + step], batch_size)
        if index is None:
            if index_factory == "Flat":
                index = faiss.IndexFlatIP(emb.shape[1])
            else:
                index = faiss.index_factory(emb.shape[1], index_factory, faiss.METRIC_INNER_PRODUCT)
                stride = max(1, len(texts) // max(1, train_size))
                index.train(_encode(embedder, texts[::stride][:train_size], batch_size))
        index.add(emb)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_index(index, out / INDEX_FILE)
    meta_table = pa.table({k: pa.array(v, pa.string()) for k, v in meta.items()})
    with atomic_path(out / META_FILE) as tmp:
        pq.write_table(meta_table, tmp)
    info = {
        "format": FORMAT,
        "kind": "instructions",
        "embedder_id": _embedder_id(embedder),
        "dim": int(index.d),
        "index_factory": index_factory,
        "n_entries": len(texts),
        "n_rows": len(set(meta["id"])),
        "columns": list(columns),
        "metric": "inner_product_on_unit_vectors",
        "source": str(manifest) if not isinstance(manifest, pa.Table) else None,
    }
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=1))
    log.info("long-tail: indexed %d texts of %d rows into %s", info["n_entries"], info["n_rows"], out)
    return InstructionIndex(out, index, meta_table, info)


def cluster_embeddings(
    emb: np.ndarray, n_clusters: int, seed: int, niter: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means over unit vectors (spherical): ``(assignment [N], centroids [k, D])``; k ≤ N."""
    emb = _unit(emb)
    k = max(1, min(int(n_clusters), emb.shape[0]))
    km = _faiss().Kmeans(
        emb.shape[1], k, niter=niter, seed=int(derive_seed("longtail-kmeans", seed) % 2**31),
        spherical=True, verbose=False, min_points_per_centroid=1,
    )  # fmt: skip
    km.train(emb)
    _, assign = km.index.search(emb, 1)
    return assign[:, 0].astype(np.int64), np.asarray(km.centroids)


def density_report(
    index_dir: str | Path,
    n_clusters: int = 32,
    min_per_task: int = 100,
    min_per_cluster: int = 10,
    expected_tasks: Sequence[str] = (),
    seed: int = 0,
    out_dir: str | Path | None = None,
    examples: int = 3,
    max_train_points: int = 500_000,
    chunk_size: int = 262_144,
) -> dict:
    """Density per task and per instruction cluster; gaps below the thresholds (§2.4 "check").

    Task counts are distinct rows; ``expected_tasks`` adds tasks with no row at all (the worst gap).
    Writes ``report.json`` and ``report.md`` (atomically) to ``out_dir`` (default: the index folder).
    Clusters: spherical k-means trained on at most ``max_train_points`` entries (even stride), every
    entry then assigned in chunks of ``chunk_size``.
    """
    idx = InstructionIndex.load(index_dir)
    n = idx.index.ntotal
    # k-means on an even-stride sample (FAISS itself subsamples to 256 points per centroid), then every
    # entry is assigned chunk by chunk: no [N, D] or [N, k] array is ever held.
    sample = np.unique(np.linspace(0, n - 1, min(n, max_train_points)).astype(np.int64))
    train = idx.embeddings() if n <= len(sample) else idx.sample(sample)
    _, centroids = cluster_embeddings(train, n_clusters, seed)
    cindex = _faiss().IndexFlatIP(centroids.shape[1])
    cindex.add(_unit(centroids))
    sim = np.empty(n, np.float32)
    assign = np.empty(n, np.int64)
    for start in range(0, n, chunk_size):
        d, i = cindex.search(_unit(idx.embeddings(start, start + chunk_size)), 1)
        sim[start : start + len(d)], assign[start : start + len(d)] = d[:, 0], i[:, 0]
    row_enc = idx.meta.column("id").combine_chunks().dictionary_encode()
    task_enc = idx.meta.column("task").combine_chunks().dictionary_encode()
    row_code = row_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    task_code = task_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    task_names = task_enc.dictionary.to_pylist()
    texts = idx.meta.column("text")
    _, first = np.unique(row_code, return_index=True)  # one entry per row (its task is the row's task)
    n_rows = len(first)
    task_counts = Counter(
        dict(zip(task_names, np.bincount(task_code[first], minlength=len(task_names)).tolist()))
    )
    for t in expected_tasks:
        task_counts.setdefault(t, 0)
    task_rows = [
        {"task": t, "rows": c, "share": c / n_rows if n_rows else 0.0, "gap": c < min_per_task,
         "need": max(0, min_per_task - c)}
        for t, c in sorted(task_counts.items(), key=lambda kv: (kv[1], kv[0]))
    ]  # fmt: skip
    order = np.lexsort((-sim, assign))  # grouped by cluster, most central first
    bounds = np.searchsorted(assign[order], np.arange(centroids.shape[0] + 1))
    clusters = []
    for c in range(centroids.shape[0]):
        members = order[bounds[c] : bounds[c + 1]]
        rows, pos = np.unique(row_code[members], return_index=True)
        hist = Counter(
            {
                task_names[t]: int(v)
                for t, v in enumerate(np.bincount(task_code[members[pos]], minlength=len(task_names)))
                if v
            }
        )
        clusters.append({
            "cluster": c, "rows": len(rows), "entries": int(members.size),
            "dominant_task": hist.most_common(1)[0][0] if hist else None,
            "tasks": dict(sorted(hist.items())), "gap": len(rows) < min_per_cluster,
            "examples": [texts[int(i)].as_py() for i in members[:examples]],
        })  # fmt: skip
    clusters.sort(key=lambda d: (d["rows"], d["cluster"]))
    gaps = [
        {"kind": "task", "task": r["task"], "rows": r["rows"], "need": r["need"]}
        for r in task_rows
        if r["gap"]
    ]
    gaps += [
        {"kind": "cluster", "cluster": c["cluster"], "task": c["dominant_task"], "rows": c["rows"],
         "need": max(0, min_per_cluster - c["rows"]), "examples": c["examples"]}
        for c in clusters if c["gap"]
    ]  # fmt: skip
    report = {
        "index": str(idx.folder),
        "embedder_id": idx.info["embedder_id"],
        "n_rows": n_rows,
        "n_entries": len(texts),
        "n_clusters": int(centroids.shape[0]),
        "thresholds": {"min_per_task": min_per_task, "min_per_cluster": min_per_cluster},
        "seed": seed,
        "tasks": task_rows,
        "clusters": clusters,
        "gaps": gaps,
    }
    out = Path(out_dir) if out_dir is not None else idx.folder
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False))
    atomic_write_text(out / "report.md", _markdown(report))
    return report


def _markdown(rep: dict) -> str:
    th = rep["thresholds"]
    lines = [
        "# Long-tail density report (report §2.4)",
        "",
        f"{rep['n_rows']} rows / {rep['n_entries']} texts, embedder `{rep['embedder_id']}`, "
        f"{rep['n_clusters']} clusters (seed {rep['seed']}). Gap thresholds: task < {th['min_per_task']} rows, "
        f"cluster < {th['min_per_cluster']} rows.",
        "",
        "## Tasks",
        "",
        "| task | rows | share | gap | need |",
        "|---|---:|---:|:-:|---:|",
    ]
    lines += [
        f"| {r['task']} | {r['rows']} | {r['share']:.3f} | {'**gap**' if r['gap'] else ''} | {r['need']} |"
        for r in rep["tasks"]
    ]
    lines += [
        "",
        "## Instruction clusters (sparsest first)",
        "",
        "| cluster | rows | dominant task | gap | examples |",
        "|---:|---:|---|:-:|---|",
    ]
    for c in rep["clusters"]:
        ex = " / ".join(e.replace("|", "\\|")[:60] for e in c["examples"])
        lines.append(
            f"| {c['cluster']} | {c['rows']} | {c['dominant_task']} | {'**gap**' if c['gap'] else ''} | {ex} |"
        )
    lines += ["", f"## Gaps ({len(rep['gaps'])})", ""]
    lines += [
        f"- {g['kind']} {g.get('cluster', g['task'])}: {g['rows']} rows, need {g['need']} more"
        for g in rep["gaps"]
    ]
    return "\n".join(lines) + "\n"


# --- image retrieval (§2.4 "image retrieval framework") ----------------------------------------------


def build_image_index(
    uris: Sequence[str], root: str | Path, embedder: Any, out_dir: str | Path, batch_size: int = 64
) -> Path:
    """Embed a candidate pool of images (URIs resolved against ``root``) into a saved FAISS index."""
    uris = list(dict.fromkeys(uris))
    if not uris:
        raise ValueError("empty image pool")
    parts = []
    for i in range(0, len(uris), batch_size):
        imgs = [load_image(u, root) for u in uris[i : i + batch_size]]
        parts.append(np.asarray(embedder.encode_images(imgs)))
    emb = _unit(np.concatenate(parts))
    index = _faiss().IndexFlatIP(emb.shape[1])
    index.add(emb)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_index(index, out / INDEX_FILE)
    with atomic_path(out / META_FILE) as tmp:
        pq.write_table(pa.table({"uri": pa.array(uris, pa.string())}), tmp)
    info = {"format": FORMAT, "kind": "images", "embedder_id": _embedder_id(embedder), "dim": int(emb.shape[1]),
            "n_entries": len(uris), "root": str(Path(root).resolve()), "metric": "inner_product_on_unit_vectors"}  # fmt: skip
    atomic_write_text(out / INFO_FILE, json.dumps(info, indent=1))
    return out


def query_images(
    index_dir: str | Path, embedder: Any, *, text: str | None = None, image: Any = None, k: int = 10
) -> list[tuple[str, float]]:
    """Nearest pool images to a text query (needs ``embedder.encode`` in the image space) or a seed image.

    Returns:
        ``[(uri, cosine)]`` best first.
    """
    if (text is None) == (image is None):
        raise ValueError("give exactly one of text= or image=")
    idx = InstructionIndex.load(index_dir)
    if idx.info.get("kind") != "images":
        raise ValueError(f"{index_dir} is an index of {idx.info.get('kind')!r}, not of images")
    idx.check_embedder(embedder)
    if text is not None:
        if not callable(getattr(embedder, "encode", None)):
            raise ValueError(
                f"embedder {_embedder_id(embedder)!r} has no text side (encode); query by image instead"
            )
        q = _unit(np.asarray(embedder.encode([text])))
    else:
        q = _unit(np.asarray(embedder.encode_images([image])))
    sims, ids = idx.index.search(q, min(k, idx.index.ntotal))
    uris = idx.meta.column("uri").to_pylist()
    return [(uris[i], float(s)) for s, i in zip(sims[0], ids[0]) if i >= 0]


# --- fill --------------------------------------------------------------------------------------------------

FILL_DIR = "longtail_fill"


@dataclass(frozen=True)
class FillResult:
    """Outcome of one :func:`fill_gap` call."""

    task: str
    n_added: int
    tag: str
    manifest: Path
    skipped: bool = False


def _prefix_uri(uri: str | None, prefix: str) -> str | None:
    return None if uri is None else f"{prefix}/{uri}"


def fill_gap(
    manifest_path: str | Path,
    task: str,
    n: int,
    seed: int,
    *,
    min_side: int = 256,
    max_side: int = 512,
    inverse_prob: float = 0.0,
    zh_prob: float = 0.3,
    workers: int = 1,
    synthesize_fn: Callable[..., Path] | None = None,
) -> FillResult:
    """Generate ``n`` more samples of ``task`` with the template engine and append them to the manifest.

    Rows get ids ``fill-<task>-s<seed>-<synth id>`` and images under ``longtail_fill/<tag>/`` next to the
    manifest; the manifest is rewritten atomically (old rows untouched, extra columns kept, new rows null
    there). Re-running with the same (task, seed) finds the tag already present and adds nothing, so an
    interrupted fill is resumed by running it again.

    Raises:
        ValueError: ``task`` has no synthetic template, or ``n < 1``.
    """
    if task not in TASKS:
        raise ValueError(f"no synthetic template for task {task!r}; the template engine covers {list(TASKS)}")
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    path = Path(manifest_path)
    table = pq.read_table(path)
    tag = f"fill-{task}-s{seed}"
    if any(str(i).startswith(tag + "-") for i in table.column("id").to_pylist()):
        log.info("long-tail fill %s already in %s; nothing to do", tag, path)
        return FillResult(task, 0, tag, path, skipped=True)
    sub = path.parent / FILL_DIR / tag
    if sub.exists():  # leftovers of an interrupted run: regenerate (deterministic, same bytes)
        shutil.rmtree(sub)
    synth = synthesize_fn or synthesize
    new_manifest = synth(
        sub, n, seed=derive_seed("longtail-fill", seed, task) % 2**31, bench_n=0, task_weights={task: 1.0},
        min_side=min_side, max_side=max_side, workers=workers, inverse_prob=inverse_prob, zh_prob=zh_prob,
    )  # fmt: skip
    new = pq.read_table(new_manifest)
    prefix = f"{FILL_DIR}/{tag}"
    cols: dict[str, Any] = {}
    for name in new.column_names:
        vals = new.column(name).to_pylist()
        if name in ("id", "inverse_of"):
            vals = [None if v is None else f"{tag}-{v}" for v in vals]
        elif name in ("target", "edit_mask"):
            vals = [_prefix_uri(v, prefix) for v in vals]
        elif name == "references":
            vals = [[_prefix_uri(u, prefix) for u in v] for v in vals]
        elif name == "source":
            vals = [f"{v}/longtail-fill" if v else "longtail-fill" for v in vals]
        cols[name] = pa.array(vals, new.schema.field(name).type)
    new = pa.table(cols, schema=new.schema)
    merged = pa.concat_tables([table, new], promote_options="permissive")
    with atomic_path(path) as tmp:
        pq.write_table(merged, tmp, compression="zstd")
    (sub / "manifest.parquet").unlink(missing_ok=True)  # its rows now live in the main manifest
    log.info("long-tail fill: appended %d %s rows (%s) to %s", new.num_rows, task, tag, path)
    return FillResult(task, new.num_rows, tag, path)


def fill_from_report(
    manifest_path: str | Path, report: dict | str | Path, seed: int, max_per_task: int | None = None, **kwargs
) -> list[FillResult]:
    """Fill every task gap of a :func:`density_report` that the template engine can synthesise.

    Cluster gaps are reported for inspection (their dominant task is not necessarily what is missing), so
    only ``kind == "task"`` gaps are filled, each with ``need`` rows (capped at ``max_per_task``).
    """
    rep = json.loads(Path(report).read_text()) if not isinstance(report, dict) else report
    results = []
    for g in rep["gaps"]:
        if g["kind"] != "task" or g["need"] <= 0:
            continue
        if g["task"] not in TASKS:
            log.warning(
                "long-tail fill: no template for task %r (gap of %d rows); skipped", g["task"], g["need"]
            )
            continue
        n = g["need"] if max_per_task is None else min(g["need"], max_per_task)
        results.append(fill_gap(manifest_path, g["task"], n, seed, **kwargs))
    return results
