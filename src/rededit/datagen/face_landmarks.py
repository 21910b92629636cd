"""Face landmarks for a manifest: the ``face_landmarks`` column the §3.7 consistency loss reads.

Every target image is run through a face detector once, offline, and its 5 landmarks per face are stored
(flat ``[F*5*2]`` float32, target-image pixels, ArcFace order), so training never runs a detector: the
dataset maps the points through the bucket crop/resize and the loss aligns faces from them. Rows with no
face get an empty list; rows whose image cannot be read get null and are reported by row id.
``rededit-data faces`` is the command line over :func:`write_landmarks`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rededit.data.images import ImageDecodeError, load_image
from rededit.data.manifest import Manifest
from rededit.data.schema import ALL_FIELDS
from rededit.utils.io import atomic_path
from rededit.utils.logging import get_logger

log = get_logger(__name__)
COLUMN = "face_landmarks"


def detect_manifest(manifest: Manifest, detector, *, min_face: float = 0.0, max_faces: int | None = None):
    """Run ``detector`` on every target image.

    Returns:
        (landmarks per row: flat float32 list, ``[]`` for no face, ``None`` when unreadable;
        unreadable ``[(row id, reason)]``).
    """
    targets = manifest.table.column("target").to_pylist()
    ids = manifest.table.column("id").to_pylist()
    out: list[list[float] | None] = []
    bad: list[tuple[str, str]] = []
    for sid, uri in zip(ids, targets):
        try:
            img = np.asarray(load_image(uri, manifest.root, mode="RGB"))
        except (FileNotFoundError, ImageDecodeError, ValueError, OSError) as err:
            bad.append((sid, str(err)))
            out.append(None)
            continue
        det = detector.detect(img)
        lm = det.landmarks
        if min_face > 0 and len(det):
            wh = det.boxes[:, 2:] - det.boxes[:, :2]
            lm = lm[wh.min(1) >= min_face]
        if max_faces is not None:
            lm = lm[:max_faces]
        out.append(np.asarray(lm, np.float32).reshape(-1).tolist())
    return out, bad


def with_landmarks(table: pa.Table, values: list[list[float] | None]) -> pa.Table:
    """``table`` with its ``face_landmarks`` column replaced (or appended), typed as in the schema."""
    field = ALL_FIELDS[COLUMN]
    column = pa.array(values, type=field.type)
    if COLUMN in table.column_names:
        return table.set_column(table.column_names.index(COLUMN), field, column)
    return table.append_column(field, column)


@dataclass
class LandmarkSummary:
    """What :func:`write_landmarks` did: rows per face count, unreadable rows, where it wrote."""

    detector: str
    rows: int
    faces_per_row: list[int]
    unreadable: list[tuple[str, str]]
    out: Path
    seconds: float

    def line(self) -> str:
        f = self.faces_per_row
        n0, n1 = sum(x == 0 for x in f), sum(x == 1 for x in f)
        return (
            f"faces ({self.detector}): {self.rows} rows in {self.seconds:.1f}s: {n0} with 0 faces, {n1} with 1, "
            f"{len(f) - n0 - n1} with 2+, {len(self.unreadable)} unreadable; {sum(f)} faces -> {self.out}"
        )


def write_landmarks(
    manifest: Manifest,
    detector,
    out: str | Path,
    *,
    min_face: float = 0.0,
    max_faces: int | None = None,
) -> LandmarkSummary:
    """Detect faces in every target of ``manifest`` and write it with the ``face_landmarks`` column to ``out``
    (temporary name, then rename: a killed run leaves the old file)."""
    t0 = time.perf_counter()
    values, bad = detect_manifest(manifest, detector, min_face=min_face, max_faces=max_faces)
    out = Path(out)
    with atomic_path(out) as tmp:
        pq.write_table(with_landmarks(manifest.table, values), tmp)
    return LandmarkSummary(
        detector=detector.name,
        rows=len(values),
        faces_per_row=[len(v) // 10 for v in values if v is not None],
        unreadable=bad,
        out=out,
        seconds=time.perf_counter() - t0,
    )
