"""Constructed images and tiny manifests for the data-engine tests (tests/test_filters*.py, test_engine_runner*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from rededit.data.schema import manifest_schema


def photo(
    name: str = "astronaut", size: int = 128, crop: tuple[float, float, float] | None = None
) -> np.ndarray:
    """A real photo from scikit-image as ``[size, size, 3]`` uint8 (optionally a crop (x, y, side) in [0, 1])."""
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = a[..., :3]
    if crop is not None:
        h, w = a.shape[:2]
        side = int(min(h, w) * crop[2])
        x, y = int((w - side) * crop[0]), int((h - side) * crop[1])
        a = a[y : y + side, x : x + side]
    return np.array(Image.fromarray(a).resize((size, size), Image.BILINEAR))


NORMAL_PHOTOS = ("astronaut", "coffee", "chelsea", "immunohistochemistry", "rocket")


def normal_corpus(n: int, size: int = 128) -> list[np.ndarray]:
    """``n`` ordinary photo crops (distinct, deterministic)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        name = NORMAL_PHOTOS[i % len(NORMAL_PHOTOS)]
        out.append(photo(name, size, crop=(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.6, 0.9))))
    return out


def over_exposed(a: np.ndarray) -> np.ndarray:
    return np.clip(a.astype(np.float32) * 0.3 + 200, 0, 255).astype(np.uint8)


def under_exposed(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32) * 0.08).astype(np.uint8)


def flat(size: int = 128) -> np.ndarray:
    noise = np.random.default_rng(1).integers(0, 2, (size, size, 3))
    return (np.full((size, size, 3), 128) + noise).astype(np.uint8)


def blurred(a: np.ndarray, radius: float = 5.0) -> np.ndarray:
    return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius)))


def write_manifest(
    root: Path,
    targets: dict[str, np.ndarray],
    references: dict[str, list[np.ndarray]] | None = None,
    tasks: dict[str, str] | None = None,
    fmt: str = "png",
) -> Path:
    """Write images under ``root/images`` and a valid ``root/manifest.parquet``; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    references = references or {}
    rows = []
    for sid, img in targets.items():
        tpath = f"images/{sid}_t.{fmt}"
        Image.fromarray(img).save(root / tpath)
        refs = []
        for k, r in enumerate(references.get(sid, [])):
            rp = f"images/{sid}_r{k}.{fmt}"
            Image.fromarray(r).save(root / rp)
            refs.append((rp, r.shape[1], r.shape[0]))
        rows.append(
            {
                "id": sid,
                "task": (tasks or {}).get(sid, "edit" if refs else "t2i"),
                "instruction": f"instruction {sid}",
                "target": tpath,
                "target_width": img.shape[1],
                "target_height": img.shape[0],
                "references": [r[0] for r in refs],
                "reference_widths": [r[1] for r in refs],
                "reference_heights": [r[2] for r in refs],
            }
        )
    schema = manifest_schema([])
    table = pa.Table.from_pylist(rows, schema=schema)
    path = root / "manifest.parquet"
    pq.write_table(table, path)
    return path


def reasons_by_id(table: pa.Table) -> dict[str, str | None]:
    return dict(zip(table.column("id").to_pylist(), table.column("drop_reason").to_pylist()))


_EAN_L = (
    "0001101",
    "0011001",
    "0010011",
    "0111101",
    "0100011",
    "0110001",
    "0101111",
    "0111011",
    "0110111",
    "0001011",
)
_EAN_G = tuple("".join("1" if c == "0" else "0" for c in code)[::-1] for code in _EAN_L)
_EAN_R = tuple("".join("1" if c == "0" else "0" for c in code) for code in _EAN_L)
_EAN_PARITY = (
    "LLLLLL",
    "LLGLGG",
    "LLGGLG",
    "LLGGGL",
    "LGLLGG",
    "LGGLLG",
    "LGGGLL",
    "LGLGLG",
    "LGLGGL",
    "LGGLGL",
)


def ean13_barcode(digits12: str = "590123412345", module: int = 2, height: int = 60) -> np.ndarray:
    """``[H, W]`` uint8 EAN-13 barcode (black bars on white with a quiet zone), drawn from the standard's
    L/G/R code tables; the 13th digit is the checksum."""
    d = [int(c) for c in digits12]
    d.append((10 - sum(x * (3 if i % 2 else 1) for i, x in enumerate(d)) % 10) % 10)
    left = "".join((_EAN_L if p == "L" else _EAN_G)[x] for p, x in zip(_EAN_PARITY[d[0]], d[1:7]))
    bits = "101" + left + "01010" + "".join(_EAN_R[x] for x in d[7:]) + "101"
    row = np.array([0 if b == "1" else 255 for b in bits], np.uint8).repeat(module)
    img = np.full((height + 20, row.size + 40), 255, np.uint8)
    img[10 : 10 + height, 20 : 20 + row.size] = row
    return img
