"""Held-out identity similarity of an editor on portrait edits (consistency ablation, report §3.7).

For every bench row of a portrait manifest (:mod:`rededit.datagen.synth.portraits`): edit Picture 1 with the
row's instruction at the editor's training resolution (the cap of its bucket set, as ``rededit-edit``
sizes it), then compare the edit's face with the target's: SFace embeddings (φ of the loss, OpenCV Zoo's
MobileFaceNet) of both images aligned by the *target's* landmarks to the ArcFace 112² template
(:class:`rededit.losses.consistency.FaceIdentityLoss`), cosine similarity. Figures per job:

* ``id_sim``: mean cosine(φ(edit), φ(target)) over the held-out faces (1 = same identity embedding);
* ``id_sim_input``: the same for Picture 1 itself (what an editor that copies its input would score: the
  degradation of Picture 1 alone costs this much);
* ``id_gain``: ``id_sim − id_sim_input`` (> 0: the edit is closer to the target's identity than the input);
* ``psnr``: PSNR of the edit against the target (dB, whole image; :func:`rededit.scoring.edit_metrics.psnr`).

Items are edited in batches of ``batch_size`` per output size (one seed per batch, as ``rededit-eval``).
Cached as ``<job>/eval_identity_<ema|raw>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRICS = (
    ("id_sim", "identity sim ↑", ".4f"),
    ("id_gain", "id sim − input's ↑", ".4f"),
    ("psnr", "PSNR vs target dB ↑", ".2f"),
)


def bench_items(manifest: str | Path) -> list[dict[str, Any]]:
    """The bench rows that carry face landmarks: instruction, Picture 1 and target images, landmarks."""
    from rededit.data.images import load_image
    from rededit.data.manifest import Manifest

    m = Manifest.open(manifest, validate=False)
    cols = ["id", "split", "instruction", "target", "references", "face_landmarks"]
    items = []
    for row in m.table.select(cols).to_pylist():
        if row["split"] != "bench" or not row["face_landmarks"] or not row["references"]:
            continue
        items.append(
            {
                "id": row["id"],
                "instruction": row["instruction"],
                "reference": load_image(row["references"][0], m.root),
                "target": load_image(row["target"], m.root),
                "landmarks": np.asarray(row["face_landmarks"], dtype=np.float32).reshape(-1, 5, 2),
            }
        )
    if not items:
        raise ValueError(f"{manifest}: no bench rows with face landmarks (run `rededit-data faces` first)")
    return items


@torch.no_grad()
def evaluate_identity(
    job: Path, manifest: str | Path, *, raw: bool = False, steps: int = 8, seed: int = 0, batch_size: int = 16
):
    """The figures of the module docstring for the exported editor of ``job`` (cached per weights)."""
    from rededit.data.images import transform_points
    from rededit.inference.editor import load_editor
    from rededit.inference.images import image_tensor
    from rededit.inference.sizing import DEFAULT_MAX_AREA, bucket_max_area, fit_size, size_multiple
    from rededit.losses.consistency import FaceIdentityLoss
    from rededit.models.faces import SFaceIdentity
    from rededit.scoring.edit_metrics import psnr
    from rededit.utils.io import atomic_write_text

    cache = job / f"eval_identity_{'raw' if raw else 'ema'}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    editor = load_editor(job / "export", raw=raw)
    m = size_multiple(editor)
    max_area = bucket_max_area(editor.inference_config) or DEFAULT_MAX_AREA
    criterion = FaceIdentityLoss(SFaceIdentity())
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for item in bench_items(manifest):  # one batch per output size: the tiny editor is overhead-bound
        tgt = item["target"]
        groups.setdefault(fit_size(tgt.height, tgt.width, m, max_area), []).append(item)
    sims, sims_in, psnrs = [], [], []
    for (h, w), items in groups.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            picture1 = torch.cat([image_tensor(it["reference"], h, w) for it in chunk])
            target = torch.cat([image_tensor(it["target"], h, w) for it in chunk])
            lms = [
                torch.from_numpy(
                    transform_points(it["landmarks"], (it["target"].height, it["target"].width), (h, w))
                )
                for it in chunk
            ]
            texts = [it["instruction"] for it in chunk]
            out = (
                editor.generate([picture1], texts, height=h, width=w, seed=seed, steps=steps)
                .float()
                .clamp(-1, 1)
            )
            dist, _ = criterion(out, target, lms)
            dist_in, _ = criterion(picture1, target, lms)
            sims += (1 - dist).tolist()
            sims_in += (1 - dist_in).tolist()
            psnrs += psnr(out, target).tolist()
    result = {
        "id_sim": float(np.mean(sims)),
        "id_sim_input": float(np.mean(sims_in)),
        "id_gain": float(np.mean(sims) - np.mean(sims_in)),
        "psnr": float(np.mean(psnrs)),
        "n": len(sims),
        "steps": steps,
        "seed": seed,
        "weights": "raw" if raw else "ema",
    }
    atomic_write_text(cache, json.dumps(result, indent=1))
    return result
