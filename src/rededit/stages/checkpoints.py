"""Checkpoint chaining and export.

* ``load_backbone_state``: weights-only chaining between stages (``stage.init_from``, report Fig. 8):
  from a Lightning ``.ckpt`` (raw ``backbone.*`` weights, or the EMA callback's shadow on top of them),
  a run folder (its ``checkpoints/last.ckpt``), or an export folder.
* ``export_editor``: writes the editor as a folder that ``rededit-edit --checkpoint`` accepts and that
  diffusers loads: ``transformer/`` (``QwenImageTransformer2DModel.save_pretrained``, EMA weights when
  available), ``backbone_raw.safetensors`` (raw weights), ``rededit.yaml`` (the resolved config that
  rebuilds VAE, text encoder and backbone). Every file is written under a temporary name and renamed.
* ``consolidate``: one full (raw, EMA) backbone state from any checkpoint a strategy writes — a Lightning
  ``.ckpt`` file (single device, DDP), a sharded DCP directory (FSDP2/HSDP: ``.metadata`` + ``meta.pt``;
  the EMA shadow is stored as ``__ema__.*`` shards, see ``callbacks/ema.py``) or a DeepSpeed directory
  (Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``); ``rededit-consolidate`` exports it.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rededit.parallel import meta_init
from rededit.parallel.safe_dcp import load_dcp_full
from rededit.utils.io import atomic_path, atomic_write_text, make_private_temp_public
from rededit.utils.safe_load import UnsafeCheckpointError, forced_weights_only

EMA_STATE_KEY = "EMA"
EXPORT_CONFIG = "rededit.yaml"
EXPORT_EXTRAS = (
    "backbone_extras.safetensors"  # backbone tensors outside transformer/ (FireEdit options, issue 10)
)


# = rededit.callbacks.ema.DCP_PREFIX (repeated so that loading needs no Lightning import)
DCP_EMA_PREFIX = "__ema__."


def is_dcp_dir(path: str | Path) -> bool:
    """A sharded (torch.distributed.checkpoint) checkpoint directory."""
    return (Path(path) / ".metadata").is_file()


def is_deepspeed_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or is_dcp_dir(path) or is_deepspeed_dir(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file or sharded/DeepSpeed checkpoint directory, or a run folder holding one
    (``checkpoints/last.ckpt``)."""
    path = Path(path)
    if _is_checkpoint(path):
        return path
    for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if _is_checkpoint(candidate):
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
        if (path / EXPORT_EXTRAS).is_file():
            state.update(load_file(path / EXPORT_EXTRAS))
        return state, (path / "WEIGHTS").read_text().strip()
    raw, shadow = consolidate(path)
    state = dict(raw)
    if shadow and use_ema:
        for name, value in shadow.items():
            state[name] = value.to(state[name].dtype)
        return state, "ema"
    return state, "raw"


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes a DeepSpeed ZeRO state file really holds (found in a ZeRO-2 checkpoint's
    ``*_optim_states.pt`` with ``torch.serialization.get_unsafe_globals_in_checkpoint``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _load_full_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as one in-memory dict (``state_dict``, ``callbacks``, ...), whatever wrote it.

    Nothing is unpickled beyond weights and plain containers (a checkpoint handed to rededit-eval or
    ``init_from`` may come from anyone): ``.ckpt`` files load with ``weights_only=True``, DCP folders through
    :mod:`rededit.parallel.safe_dcp`, DeepSpeed folders with every ``torch.load`` of its converter forced to
    weights-only (its three state classes allowed).
    """
    if is_dcp_dir(path):
        ckpt = load_dcp_full(path)  # single process: reads every rank's shards
        meta = path / "meta.pt"
        if meta.is_file():
            ckpt = {**torch.load(meta, map_location="cpu", weights_only=True), **ckpt}
        return ckpt
    if is_deepspeed_dir(path):
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory(prefix="rededit-consolidate-") as tmp:
            out = Path(tmp) / "fp32.ckpt"
            try:
                with forced_weights_only(), torch.serialization.safe_globals(_deepspeed_safe_globals()):
                    convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
            except pickle.UnpicklingError as err:
                raise UnsafeCheckpointError(
                    f"{path}: refused to load this DeepSpeed checkpoint: one of its files holds an object that "
                    f"is not a weight or a DeepSpeed state class (a crafted file may run code): {err}"
                ) from err
            return torch.load(out, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def consolidate(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Full raw backbone state (keys relative to ``EditBackbone``) and the EMA shadow (trainable tensors
    only, same keys; None without EMA) of any training checkpoint (see the module docstring)."""
    ckpt_path = resolve_checkpoint(path)
    ckpt = _load_full_checkpoint(ckpt_path)
    weights = ckpt.get("state_dict", ckpt)
    raw = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    if not raw:
        raise ValueError(f"{ckpt_path}: the checkpoint holds no backbone.* weights")
    shadow = {k.removeprefix(DCP_EMA_PREFIX): v for k, v in weights.items() if k.startswith(DCP_EMA_PREFIX)}
    return raw, (shadow or _ema_state(ckpt) or None)


def backbone_from_state(cfg: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rebuild the ``EditBackbone`` of a run config (``cfg.backbone``, a ``_partial_``) on the meta device and
    adopt ``state``'s tensors (no random init, no second copy of the weights)."""
    from hydra.utils import instantiate

    patch = int(cfg.backbone.get("patch_size", 2))
    latent_channels = state["transformer.img_in.weight"].shape[1] // patch**2
    backbone = meta_init(instantiate(cfg.backbone), latent_channels=latent_channels)
    backbone.load_state_dict(state, strict=True, assign=True)
    backbone.rebuild_rope()
    return backbone


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
    extras = {k: v for k, v in (ema_state or raw).items() if not k.startswith("transformer.")}
    if extras:  # parts diffusers' folder cannot hold (FireEdit options), EMA weights when available
        with atomic_path(out_dir / EXPORT_EXTRAS) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in extras.items()}, str(tmp))
    transformer = backbone.transformer
    saved = None
    if ema_state is not None:
        saved = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        transformer.load_state_dict(
            {k.removeprefix("transformer."): v for k, v in ema_state.items() if k.startswith("transformer.")}
        )
    try:
        # save_pretrained writes several files: build the folder aside, then swap it in.
        tmp_dir = Path(tempfile.mkdtemp(prefix=".transformer.", dir=out_dir))
        make_private_temp_public(tmp_dir)  # mkdtemp is 0700 whatever the umask
        transformer.save_pretrained(tmp_dir)
        for written in tmp_dir.rglob("*"):  # some writers (safetensors) create 0600 files too
            make_private_temp_public(written)
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
