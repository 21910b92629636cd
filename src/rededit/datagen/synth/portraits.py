"""A portrait-edit corpus from real photos that ship with installed packages (report §3.7 studies).

The synthetic corpus has no faces, so the identity-consistency loss (eq. 6–8) has nothing to act on there.
This builds the same manifest layout (``rededit-data synth`` rows, splits, bench split) with every image
replaced by a real portrait crop: scikit-image's astronaut (Eileen Collins) and cameraman, matplotlib's
Grace Hopper: three identities, offline, no downloads. Each row gets a random crop (face width ≈ 40–55 %
of the frame, random horizontal shift and mirror); the edit is a restoration: Picture 1 is the target with a
random per-channel colour cast and a Gaussian blur (σ 1.5–2.5 px at 128²), the target is the untouched crop,
so the editor must recover the person's identity from a degraded input (a colour cast alone leaves SFace's
identity embedding almost unchanged, cosine ≈ 0.99, and gives the loss nothing to correct). Every text
column carries the one instruction. Landmarks are then written by ``rededit-data faces`` (YuNet), as a user
would for real data.

Used by ``experiments/benchmarks/consistency_loss`` (cost, every sample a portrait) and the consistency
ablation (``conf/ablation/consistency.yaml``, identity similarity on held-out portraits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from rededit.data.manifest import Manifest
from rededit.datagen.face_landmarks import write_landmarks
from rededit.datagen.synth.writer import synthesize
from rededit.models.faces import YuNetDetector
from rededit.utils.io import atomic_path
from rededit.utils.seeding import numpy_rng

INSTRUCTION = (
    "Restore Picture 1: remove the blur and the colour cast, and keep the person exactly as they are."
)
TEXT_COLUMNS = ("instruction", "caption", "caption_original", "instruction_concise", "instruction_user")
ZH_COLUMNS = (
    "caption_zh",
    "caption_original_zh",
    "instruction_zh",
    "instruction_concise_zh",
    "instruction_user_zh",
)


def portrait_images() -> list[np.ndarray]:
    """The three offline portraits as RGB ``uint8`` arrays ``[H, W, 3]``."""
    import matplotlib.cbook as cbook
    import skimage.data

    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    camera = np.repeat(skimage.data.camera()[..., None], 3, axis=2)
    return [skimage.data.astronaut(), np.ascontiguousarray(hopper), camera]


def portrait_crop(img: np.ndarray, face_box: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A ``side``² crop around ``face_box`` (x0, y0, x1, y1): face width ≈ 40–55 % of the crop, random
    horizontal shift and mirror."""
    x0, y0, x1, y1 = face_box
    cx, cy = (x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * (x1 - x0), (y0 + y1) / 2
    half = (x1 - x0) / rng.uniform(0.8, 1.1)
    h, w = img.shape[:2]
    box = (max(cx - half, 0), max(cy - half, 0), min(cx + half, w), min(cy + half, h))
    crop = Image.fromarray(img).crop(tuple(round(v) for v in box)).resize((side, side), Image.BICUBIC)
    out = np.asarray(crop)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def make_portrait_corpus(
    out_dir: str | Path, rows: int, seed: int = 0, side: int = 128, bench_n: int = 4
) -> tuple[Path, str]:
    """Write the portrait corpus at ``out_dir``; returns (manifest path, the ``rededit-data faces`` report).

    Row ``i`` uses portrait ``i mod 3``; crops, mirrors, colour casts and blurs derive from (seed, row id).
    """
    manifest = synthesize(
        out_dir,
        n=rows,
        seed=seed,
        bench_n=bench_n,
        task_weights={"color": 1.0},  # one Picture 1 per row, a colour edit: the layout the portraits fill
        min_side=side,
        max_side=side,
        inverse_prob=0.0,
        zh_prob=0.0,
        overwrite=True,  # the portrait corpus is regenerated whole (deterministic)
    )
    det = YuNetDetector()
    sources = [(img, det.detect(img).boxes[0]) for img in portrait_images()]
    m = Manifest.open(manifest, validate=False)
    for i, row in enumerate(m.table.select(["id", "target", "references"]).to_pylist()):
        rng = numpy_rng(seed, "portrait", row["id"])
        img, box = sources[i % len(sources)]
        target = portrait_crop(img, box, side, rng)
        Image.fromarray(target).save(m.root / row["target"])
        for uri in row["references"]:
            shift = rng.uniform(-25, 25, size=3)  # a colour cast ...
            cast = Image.fromarray(np.clip(target + shift, 0, 255).astype(np.uint8))
            # ... and a blur that puts the identity at risk (SFace cosine to the target ≈ 0.75 at 64², see the study)
            cast.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5) * side / 128)).save(m.root / uri)
    table = m.table
    n = table.num_rows
    for name in TEXT_COLUMNS + ZH_COLUMNS:
        if name in table.column_names:
            value = INSTRUCTION if name in TEXT_COLUMNS else None
            idx = table.column_names.index(name)
            table = table.set_column(idx, name, pa.array([value] * n, pa.string()))
    for name in ("edit_mask", "object_boxes"):  # the synthetic scene's masks/boxes do not describe portraits
        if name in table.column_names:
            idx = table.column_names.index(name)
            table = table.set_column(idx, name, pa.nulls(n, table.schema.field(name).type))
    with atomic_path(manifest) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    summary = write_landmarks(Manifest.open(manifest, validate=False), det, manifest)
    if summary.unreadable:
        raise RuntimeError(f"face landmarks: unreadable rows {summary.unreadable}")
    return Path(manifest), summary.line()
