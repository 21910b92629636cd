"""Checkpoint chaining and export.

* ``load_backbone_state``: weights-only chaining between stages (``stage.init_from``, report Fig. 8):
  from a Lightning ``.ckpt`` (raw ``backbone.*`` weights, or the EMA callback's shadow on top of them),
  a run folder (its ``checkpoints/last.ckpt``), or an export folder.
* ``export_editor``: writes the editor as a folder that ``rededit-edit --checkpoint`` accepts and that
  diffusers loads: ``transformer/`` (``QwenImageTransformer2DModel.save_pretrained``, EMA weights when
  available), ``backbone_raw.safetensors`` (raw weights), ``rededit.yaml`` (the resolved config that
  rebuilds VAE, text encoder and backbone). Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rededit.utils.io import atomic_path, atomic_write_text

EMA_STATE_KEY = "EMA"
EXPORT_CONFIG = "rededit.yaml"


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file, or a run folder / export folder holding one (``checkpoints/last.ckpt``)."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint at {path} (looked for the file itself and checkpoints/last.ckpt)")


def is_export_folder(path: str | Path) -> bool:
    return (Path(path) / EXPORT_CONFIG).is_file() and (Path(path) / "transformer").is_dir()


def _ema_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    for key, value in ckpt.get("callbacks", {}).items():
        if key.split("{")[0] == EMA_STATE_KEY and isinstance(value, dict) and value.get("shadow"):
            return value["shadow"]
    return None


def load_backbone_state(path: str | Path, *, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Backbone state dict (keys relative to ``EditBackbone``) and which weights it is ("raw"/"ema")."""
    path = Path(path)
    if path.is_dir() and is_export_folder(path):
        if not use_ema:
            return load_file(path / "backbone_raw.safetensors"), "raw"
        from diffusers import QwenImageTransformer2DModel

        transformer = QwenImageTransformer2DModel.from_pretrained(path / "transformer")
        state = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
        return state, (path / "WEIGHTS").read_text().strip()
    ckpt = torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=False)
    state = {
        k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")
    }
    if not state:
        raise ValueError(f"{path}: the checkpoint holds no backbone.* weights")
    shadow = _ema_state(ckpt) if use_ema else None
    if shadow:
        for name, value in shadow.items():
            state[name] = value.to(state[name].dtype)
        return state, "ema"
    return state, "raw"


def export_editor(
    backbone: torch.nn.Module,
    out_dir: str | Path,
    *,
    config_yaml: str,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out_dir`` (see module docstring). ``ema_state``: full backbone state with EMA weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_path(out_dir / "backbone_raw.safetensors") as tmp:
        save_file(raw, str(tmp))
    transformer = backbone.transformer
    saved = None
    if ema_state is not None:
        saved = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        transformer.load_state_dict({k.removeprefix("transformer."): v for k, v in ema_state.items()})
    try:
        # save_pretrained writes several files: build the folder aside, then swap it in.
        tmp_dir = Path(tempfile.mkdtemp(prefix=".transformer.", dir=out_dir))
        transformer.save_pretrained(tmp_dir)
        final = out_dir / "transformer"
        if final.exists():
            shutil.rmtree(final)
        tmp_dir.rename(final)
    finally:
        if saved is not None:
            transformer.load_state_dict(saved)
    with atomic_path(out_dir / EXPORT_CONFIG) as tmp:
        tmp.write_text(config_yaml, encoding="utf-8")
    atomic_write_text(out_dir / "WEIGHTS", "ema\n" if ema_state is not None else "raw\n")
    return out_dir
