"""What an evaluation's numbers depend on: the weights' hash, the package versions, the generation settings.

``rededit-eval`` writes these into ``metrics.json`` and ``generation.json`` so that a table can be traced to the
exact checkpoint bytes and software it came from, and so that images generated with other settings are never
mixed into one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from rededit.stages.checkpoints import is_export_folder, is_pipeline_folder, resolve_checkpoint
from rededit.utils.io import sha256_files, write_json

VERSION_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "torchmetrics",
    "lightning",
    "numpy",
    "pillow",
    "rededit",
)


def weights_files(checkpoint: str | os.PathLike, raw: bool = False) -> tuple[list[Path], Path | None]:
    """The files holding the weights an editor is loaded from, and the root their names are relative to."""
    path = Path(checkpoint)
    if path.is_dir() and is_export_folder(path):
        if raw and (path / "backbone_raw.safetensors").is_file():
            return [path / "backbone_raw.safetensors"], path
        files = sorted(p for p in (path / "transformer").rglob("*") if p.is_file() and p.suffix != ".json")
        return files, path
    if path.is_dir() and is_pipeline_folder(path):  # a published editor's folder: its transformer's weights
        files = sorted(p for p in (path / "transformer").rglob("*") if p.is_file() and p.suffix != ".json")
        return files, path
    ckpt = resolve_checkpoint(path)
    return [ckpt], None


def checkpoint_hash(checkpoint: str | os.PathLike, raw: bool = False) -> str:
    """sha256 over the weight files (names relative to the export folder, then bytes)."""
    files, root = weights_files(checkpoint, raw)
    if not files:
        raise FileNotFoundError(f"no weight files found for checkpoint {checkpoint}")
    return sha256_files(files, root)


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def check_generation_settings(out_dir: Path, data: dict[str, Any], overwrite: bool) -> None:
    """Pin what the images in ``out_dir`` depend on (``generation.json``); refuse to mix settings."""
    path = out_dir / "generation.json"
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in data.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"{out_dir} holds edits generated with other settings {diff} (old, new); use another out_dir, "
                "or overwrite=true to discard them"
            )
        return
    if overwrite and (out_dir / "images").is_dir():
        shutil.rmtree(out_dir / "images")
    write_json(path, data)
