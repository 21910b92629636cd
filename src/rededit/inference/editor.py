"""Loading a trained editor for inference: export folder, run folder or ``.ckpt`` file.

``load_editor`` accepts

* an export folder written by :func:`rededit.stages.checkpoints.export_editor` (``rededit.yaml``,
  ``transformer/`` with the EMA weights when the run had EMA, ``backbone_raw.safetensors``);
* a Lightning ``.ckpt`` file or a run folder (``config.yaml`` beside ``checkpoints/``): the EMA weights
  stored by the EMA callback are used when present, ``raw=True`` takes the raw ones.

VAE, text encoder and stage are rebuilt from the saved (resolved) Hydra config, so the editor runs with
exactly the components it was trained with. A saved config may come from anyone: it is read with
:func:`rededit.utils.trusted_config.load_trusted_config` and checkpoints load weights-only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rededit.stages.checkpoints import (
    EXPORT_CONFIG,
    EXPORT_EXTRAS,
    is_export_folder,
    load_backbone_state,
    resolve_checkpoint,
)
from rededit.utils.logging import get_logger
from rededit.utils.safe_load import UnsafeCheckpointError
from rededit.utils.trusted_config import UntrustedConfigError, load_trusted_config

log = get_logger(__name__)

RUN_CONFIG = "config.yaml"


class EditorLoadError(Exception):
    """The checkpoint path cannot be turned into an editor (missing files, no saved config)."""


def find_config(checkpoint: Path) -> Path:
    """The resolved config saved with a checkpoint: ``<run>/config.yaml`` for ``<run>/checkpoints/x.ckpt``."""
    candidates = (
        [checkpoint / RUN_CONFIG]
        if checkpoint.is_dir()
        else [checkpoint.parent / RUN_CONFIG, checkpoint.parent.parent / RUN_CONFIG]
    )
    for c in candidates:
        if c.is_file():
            return c
    raise EditorLoadError(
        f"no saved config for {checkpoint}: looked for {', '.join(str(c) for c in candidates)} "
        "(rededit-train writes config.yaml into the run folder; an export folder has rededit.yaml)"
    )


def build_editor_from_config(cfg: DictConfig, *, backbone_node: Any | None = None) -> Any:
    """Instantiate VAE, text encoder and stage from a resolved training config and build the backbone.

    Args:
        cfg: config with ``stage``, ``vae`` and ``text_encoder`` nodes (``stage.backbone`` a ``_partial_``).
        backbone_node: replacement for ``stage.backbone`` (e.g. loading from an export's transformer folder).

    Returns:
        the stage (a :class:`~rededit.stages.base.BaseStage`) with ``configure_model()`` done, in eval mode.
    """
    from hydra.utils import instantiate

    for key in ("stage", "vae"):
        if cfg.get(key) is None:
            raise EditorLoadError(f"the saved config has no `{key}` node; is it a rededit training config?")
    vae = instantiate(cfg.vae)
    text_encoder = instantiate(cfg.text_encoder) if cfg.get("text_encoder") else None
    # init_from points at the previous stage's run, which need not exist where the editor runs; the
    # weights come from this checkpoint anyway.
    overrides: dict[str, Any] = {"vae": vae, "text_encoder": text_encoder, "init_from": None}
    if backbone_node is not None:
        overrides["backbone"] = backbone_node
    stage = instantiate(cfg.stage, **overrides)
    stage.configure_model()
    stage.eval()
    return stage


def load_editor(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", *, raw: bool = False
) -> Any:
    """Rebuild an editor for inference (see the module docstring for accepted paths).

    Args:
        checkpoint: export folder, run folder or ``.ckpt`` file.
        device: where to put it.
        raw: use the raw (non-EMA) weights.

    Returns:
        the stage, with :meth:`~rededit.stages.base.BaseStage.generate`, and the attributes
        ``inference_config`` (the saved config), ``checkpoint_path`` and ``weights`` (``"ema"``/``"raw"``).

    Raises:
        EditorLoadError: nothing usable at ``checkpoint``.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise EditorLoadError(f"checkpoint not found: {path}")
    export = path.is_dir() and is_export_folder(path)
    cfg_path = path / EXPORT_CONFIG if export else find_config(path)
    try:
        cfg = load_trusted_config(cfg_path)  # a handed folder: no `_target_` outside rededit's own
    except UntrustedConfigError as err:
        raise EditorLoadError(str(err)) from err
    if export and not raw:
        # The EMA (or only) weights are the diffusers folder itself: build the backbone from it directly
        # instead of a random init that load_backbone_state would overwrite (matters for 20B models).
        node = OmegaConf.to_container(cfg.stage.backbone, resolve=True)
        node.update(transformer_config=None, pretrained_path=str(path / "transformer"), subfolder=None)
        stage = build_editor_from_config(cfg, backbone_node=node)
        if (path / EXPORT_EXTRAS).is_file():  # backbone parts outside transformer/ (FireEdit options)
            from safetensors.torch import load_file

            stage.backbone.load_state_dict({**stage.backbone.state_dict(), **load_file(path / EXPORT_EXTRAS)})
        weights = (path / "WEIGHTS").read_text().strip() if (path / "WEIGHTS").is_file() else "ema"
    else:
        if not export:
            try:
                resolve_checkpoint(path)
            except FileNotFoundError as err:
                raise EditorLoadError(str(err)) from err
        stage = build_editor_from_config(cfg)
        try:
            state, weights = load_backbone_state(path, use_ema=not raw)
        except UnsafeCheckpointError as err:
            raise EditorLoadError(str(err)) from err
        stage.backbone.load_state_dict(state, strict=True)
    stage.to(device)
    stage.inference_config = cfg
    stage.checkpoint_path = str(path)
    stage.weights = weights
    log.info("loaded the %s editor from %s (config %s)", weights, path, cfg_path)
    return stage
