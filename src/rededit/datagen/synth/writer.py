"""Corpus writer: N template-synthesised samples → ``images/**.png`` + ``manifest.parquet`` (§2.3).

Determinism: sample ``i`` of split ``s`` draws everything from ``numpy_rng(seed, stream, i)``
(``stream`` = ``"synth"`` for train, ``"bench"`` for the held-out bench split), so any sample can be
generated alone, in any order, by any worker, and two runs with the same arguments write identical
bytes. The task of sample ``i`` comes from a golden-ratio (Weyl) sequence over the cumulative task
weights: like independent draws it does not depend on N, but every prefix of the corpus matches the
weights to within a couple of samples, so even small corpora contain every task.

Row layout: ``train-000123`` (forward edit), ``train-000123-inv`` (its Task Inversion twin, which
reuses the same files with source and target swapped, ``inverse_of = "train-000123"``), then
``bench-000004`` rows. Image URIs are relative to the manifest's folder.
"""

from __future__ import annotations

import io
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rededit.data.schema import manifest_schema
from rededit.datagen.synth import text as T
from rededit.datagen.synth.scene import BACKGROUND_KINDS, OBJECT_SIZE
from rededit.datagen.synth.tasks import BUILDERS, Sample, SynthConfig
from rededit.utils.io import atomic_path, atomic_write_bytes
from rededit.utils.logging import get_logger
from rededit.utils.progress import Progress
from rededit.utils.seeding import derive_seed, numpy_rng

log = get_logger(__name__)

# Roughly the report's split (§2.1: T2I vs I2I, semantic / stylistic / structural edits), tilted
# towards edits because the synthetic corpus exists to teach editing.
# The opt-in tasks (tasks.OPT_IN_TASKS: ``invert``) have weight 0 here: a corpus holds them only when
# ``--task-weights`` names them.
DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "t2i": 0.14,
    "add": 0.10,
    "remove": 0.10,
    "replace": 0.08,
    "color": 0.10,
    "background": 0.08,
    "stylize": 0.09,
    "restore": 0.07,
    "text": 0.08,
    "viewpoint": 0.07,
    "compose": 0.09,
}
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
MANIFEST_NAME = "manifest.parquet"


@dataclass(frozen=True)
class _Job:
    out_dir: str
    seed: int
    split: str  # "train" | "bench"
    index: int
    task: str
    cfg: SynthConfig
    inverse_prob: float
    zh_prob: float
    compress_level: int


def _stream(split: str) -> str:
    return "synth" if split == "train" else "bench"


def task_schedule(seed: int, split: str, n: int, task_weights: Mapping[str, float]) -> list[str]:
    """Task of each of the first ``n`` samples: a Weyl sequence through the cumulative weights.

    Raises:
        ValueError: unknown task names, negative weights or no positive weight.
    """
    unknown = sorted(set(task_weights) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown synth tasks {unknown}; known: {list(BUILDERS)}")
    # BUILDERS order (opt-in tasks last), so adding a task never moves the draws of a mix without it.
    names = [t for t in BUILDERS if task_weights.get(t, 0.0) > 0]
    if any(v < 0 for v in task_weights.values()) or not names:
        raise ValueError(
            f"task_weights need non-negative values with at least one > 0, got {dict(task_weights)}"
        )
    w = np.array([task_weights[t] for t in names], dtype=np.float64)
    edges = np.cumsum(w / w.sum())
    offset = derive_seed(seed, _stream(split), "task-offset") / 2.0**63
    u = (offset + _GOLDEN * np.arange(n, dtype=np.float64)) % 1.0
    idx = np.minimum(np.searchsorted(edges, u, side="right"), len(names) - 1)
    return [names[i] for i in idx]


def _png(img: Image.Image, level: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def _flat_boxes(scene) -> list[float]:
    return [float(v) for o in scene.objects for v in o.box]


def _cluster(task: str, key: str) -> int:
    return derive_seed("synth-cluster", task, key) % (2**31)


def _empty_row() -> dict[str, Any]:
    return {f.name: None for f in manifest_schema()}


def generate_sample(seed: int, split: str, index: int, task: str, cfg: SynthConfig) -> Sample:
    """Build sample ``index`` of ``split`` in memory (no files written)."""
    return BUILDERS[task](numpy_rng(seed, _stream(split), index), cfg)


def _run_job(job: _Job) -> list[dict[str, Any]]:
    """Generate one sample, write its images, return its manifest row(s)."""
    sample = generate_sample(job.seed, job.split, job.index, job.task, job.cfg)
    # Side decisions use their own streams so changing inverse_prob / zh_prob never changes images.
    text_rng = numpy_rng(job.seed, _stream(job.split), job.index, "captions")
    use_zh = numpy_rng(job.seed, _stream(job.split), job.index, "zh").random() < job.zh_prob
    use_inv = (
        job.split == "train"
        and sample.inverse is not None
        and numpy_rng(job.seed, _stream(job.split), job.index, "inverse").random() < job.inverse_prob
    )

    out = Path(job.out_dir)
    stem = f"images/{job.split}/{job.index // 1000:04d}/{job.index:06d}"

    def put(img: Image.Image, name: str) -> str:
        rel = f"{stem}_{name}.png"
        atomic_write_bytes(out / rel, _png(img, job.compress_level))
        return rel

    target = put(sample.target, "target")
    refs = [put(r, f"ref{k}") for k, r in enumerate(sample.references)]
    mask = put(sample.mask, "mask") if sample.mask is not None else None
    row_id = f"{job.split}-{job.index:06d}"

    style_en, style_zh = sample.style_caption or ("flat 2D vector graphic", "扁平二维矢量图形")
    cap_en, cap_zh = T.structured_caption(text_rng, sample.target_scene, style_en, style_zh)
    row = _empty_row() | {
        "id": row_id,
        "task": sample.task,
        "target": target,
        "target_width": sample.target.width,
        "target_height": sample.target.height,
        "references": refs,
        "reference_widths": [r.width for r in sample.references],
        "reference_heights": [r.height for r in sample.references],
        "caption": cap_en,
        "caption_original": T.original_caption(text_rng, sample.target_scene),
        "caption_type": sample.caption_type,
        "split": job.split,
        "edit_mask": mask,
        "ocr_target": sample.ocr_target,
        "source": f"synth/{sample.template}",
        "cluster": _cluster(sample.task, sample.cluster_key),
        "object_boxes": _flat_boxes(sample.target_scene),
    }
    if sample.texts is not None:
        _put_texts(row, sample.texts, use_zh)
    else:
        en, zh = sample.t2i_instruction
        row["instruction"] = en
        if use_zh:
            row["instruction_zh"] = zh
    if use_zh:
        row["caption_zh"] = cap_zh
    rows = [row]

    if use_inv:
        inv = sample.inverse
        icap_en, icap_zh = T.structured_caption(text_rng, inv.target_scene)
        irow = _empty_row() | {
            "id": f"{row_id}-inv",
            "task": inv.task,
            "target": refs[0],
            "target_width": sample.references[0].width,
            "target_height": sample.references[0].height,
            "references": [target],
            "reference_widths": [sample.target.width],
            "reference_heights": [sample.target.height],
            "caption": icap_en,
            "caption_original": T.original_caption(text_rng, inv.target_scene),
            "caption_type": "instructive",
            "split": job.split,
            "edit_mask": mask,  # the changed pixels are the same set in both directions
            "source": f"synth/{inv.template}/inverse",
            "cluster": _cluster(inv.task, sample.cluster_key),
            "inverse_of": row_id,
            "object_boxes": _flat_boxes(inv.target_scene),
        }
        _put_texts(irow, inv.texts, use_zh)
        if use_zh:
            irow["caption_zh"] = icap_zh
        rows.append(irow)
    return rows


def _put_texts(row: dict[str, Any], texts: T.Texts, use_zh: bool) -> None:
    row["instruction"] = texts.instruction
    row["instruction_concise"] = texts.concise
    row["instruction_user"] = texts.user
    if use_zh:
        row["instruction_zh"] = texts.instruction_zh
        row["instruction_concise_zh"] = texts.concise_zh
        row["instruction_user_zh"] = texts.user_zh


def synthesize(
    out_dir: str | Path,
    n: int,
    seed: int,
    bench_n: int | None = None,
    task_weights: Mapping[str, float] | None = None,
    min_side: int = 256,
    max_side: int = 512,
    workers: int = 1,
    inverse_prob: float = 0.3,
    zh_prob: float = 0.3,
    compress_level: int = 1,
    max_objects: int = 4,
    backgrounds: Sequence[str] | None = None,
    object_size: tuple[float, float] | None = None,
    sign_prob: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic edit corpus and return the manifest path (report §2.3, §2.5).

    Args:
        out_dir: folder for ``manifest.parquet`` and ``images/``.
        n: forward train samples (Task Inversion rows come on top, about ``inverse_prob`` × the
            reversible ones).
        seed: corpus seed; the same arguments give byte-identical files.
        bench_n: held-out ``bench`` rows from a separate seed stream (default ``n // 10``).
        task_weights: task → weight (default :data:`DEFAULT_TASK_WEIGHTS`); zero drops a task.
        min_side, max_side: image side range in pixels (sides are multiples of 32).
        workers: processes (1 = in this process).
        inverse_prob: probability that a reversible train edit also gets its inverse row.
        zh_prob: fraction of rows that also carry Chinese text columns.
        compress_level: PNG zlib level (1 is fast; the bytes are deterministic for any level).
        overwrite: replace a corpus already in ``out_dir``. Its manifest goes first, so a synth killed midway
            leaves no manifest at all — never the old one pointing at new images. Without it a folder that
            holds a corpus (``manifest.parquet`` or ``images/``) is refused.
        max_objects, backgrounds, object_size, sign_prob: the world's complexity (:class:`SynthConfig`; None
            and the defaults give the full corpus).

    Returns:
        Path of the written manifest.
    """
    if n < 0 or (bench_n is not None and bench_n < 0):
        raise ValueError(f"n and bench_n must be >= 0, got n={n}, bench_n={bench_n}")
    if min_side > max_side:
        raise ValueError(f"min_side={min_side} > max_side={max_side}")
    out = Path(out_dir)
    old = [p for p in (out / MANIFEST_NAME, out / "images") if p.exists()]
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds a corpus ({', '.join(p.name for p in old)}); pass overwrite=True "
            "(rededit-data synth --overwrite) to replace it, or choose another folder"
        )
    if old:
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # first: no manifest may outlive its images
        shutil.rmtree(out / "images", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(DEFAULT_TASK_WEIGHTS if task_weights is None else task_weights)
    bench_n = n // 10 if bench_n is None else bench_n
    cfg = SynthConfig(
        min_side,
        max_side,
        max_objects,
        tuple(backgrounds) if backgrounds else BACKGROUND_KINDS,
        tuple(object_size) if object_size else OBJECT_SIZE,
        sign_prob,
    )
    jobs = [
        _Job(str(out), seed, split, i, task, cfg, inverse_prob, zh_prob, compress_level)
        for split, count in (("train", n), ("bench", bench_n))
        for i, task in enumerate(task_schedule(seed, split, count, weights))
    ]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with Progress(len(jobs), "synth", unit="samples") as bar:
        if workers <= 1:
            for job in jobs:
                rows.extend(_run_job(job))
                bar.update()
        else:
            # spawn, not fork: the parent may hold torch / thread pools that do not survive a fork.
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                chunk = max(1, min(16, len(jobs) // (4 * workers) or 1))
                for part in pool.map(_run_job, jobs, chunksize=chunk):
                    rows.extend(part)
                    bar.update()
    table = pa.Table.from_pylist(rows, schema=manifest_schema())
    path = out / MANIFEST_NAME
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    log.info(
        "synth: wrote %d rows (%d train + %d bench samples) to %s in %.1f s",
        table.num_rows,
        n,
        bench_n,
        path,
        time.perf_counter() - t0,
    )
    return path
