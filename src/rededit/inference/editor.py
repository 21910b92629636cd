"""Loading a trained editor for inference: export folder, run folder or ``.ckpt`` file.

``load_editor`` accepts

* an export folder written by :func:`rededit.stages.checkpoints.export_editor` (``rededit.yaml``,
  ``transformer/`` with the EMA weights when the run had EMA, ``backbone_raw.safetensors``);
* a Lightning ``.ckpt`` file or a run folder (``config.yaml`` beside ``checkpoints/``): the EMA weights
  stored by the EMA callback are used when present, ``raw=True`` takes the raw ones;
* a diffusers pipeline folder (``model_index.json``: Qwen-Image-Edit-2509/2511, FireRed-Image-Edit-1.0, ...):
  the editor is composed from rededit's presets pointed at the folder (``backbone=qwen_image``,
  ``vae=qwen_image``, ``text_encoder=qwen_vl``, ``stage=sft``; :func:`pipeline_folder_config`), so every
  value comes from the folder (transformer config, scheduler config, tokenizer, processor).

VAE, text encoder and stage are rebuilt from the saved (resolved) Hydra config, so the editor runs with
exactly the components it was trained with. An export that is a complete pipeline folder
(:func:`rededit.stages.checkpoints.export_editor` from a run that started from one) reads its VAE, text
encoder, tokenizer, processor and scheduler from the export itself, not from the base folder the run named.
Adapter runs (issue 20): an export's ``transformer/`` is the base and ``adapter/`` (``adapter_raw/`` with
``raw=True``) the adapter, applied on top; a ``.ckpt`` / run folder of an adapter run rebuilds the base from the run's
config (``stage.init_from``, checked against the checkpoint's base fingerprint) and loads the adapter from it.
A saved config may come from anyone: it is read with :func:`rededit.utils.trusted_config.load_trusted_config`
and checkpoints load weights-only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rededit.models import adapters
from rededit.models.lora_formats import LoraFormatError, apply_loras, read_lora
from rededit.stages.checkpoints import (
    EXPORT_ADAPTER,
    EXPORT_CONFIG,
    EXPORT_EXTRAS,
    adapter_backbone_from_checkpoint,
    consolidate_full,
    is_export_folder,
    is_pipeline_folder,
    load_backbone_state,
    load_export_adapter,
    resolve_checkpoint,
)
from rededit.utils.io import sha256_files
from rededit.utils.logging import get_logger
from rededit.utils.paths import CONF_DIR
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


def build_editor_from_config(
    cfg: DictConfig, *, backbone_node: Any | None = None, backbone: torch.nn.Module | None = None
) -> Any:
    """Instantiate VAE, text encoder and stage from a resolved training config and build the backbone.

    Args:
        cfg: config with ``stage``, ``vae`` and ``text_encoder`` nodes (``stage.backbone`` a ``_partial_``).
        backbone_node: replacement for ``stage.backbone`` (e.g. loading from an export's transformer folder).
        backbone: an already built backbone for the stage (an adapter checkpoint's base + adapter).

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
    node = cfg.stage.get("adapter")
    if adapters.is_enabled(node):  # the adapter's weights come from the checkpoint too
        overrides["adapter"] = {**OmegaConf.to_container(node, resolve=True), "init_from": None}
    stage = instantiate(cfg.stage, **overrides)
    if backbone is not None:
        stage.backbone = backbone  # configure_model keeps it
    stage.configure_model()
    stage.eval()
    return stage


#: Inference settings of an editor loaded straight from a published pipeline folder: the published
#: examples' (Qwen-Image-Edit-2509's model card, FireRed-Image-Edit's inference.py: 40 steps, true CFG 4,
#: negative prompt " ").
PIPELINE_DEFAULTS = {"sample_steps": 40, "cfg_scale": 4.0, "negative_prompt": " "}
_DTYPE_TARGETS = {
    "rededit.models.vae.QwenImageVAE": "dtype",
    "rededit.models.text_encoder.QwenVLTextEncoder": "dtype",
    "rededit.models.text_encoder.MiniLMTextEncoder": "dtype",
}


def _compose_train(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (inside a running Hydra app, e.g. rededit-eval, through
    its own initialised Hydra)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def pipeline_folder_config(folder: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """The editor config of a diffusers pipeline folder: ``backbone=qwen_image`` (its 20B architecture check),
    ``vae=qwen_image``, ``text_encoder=qwen_vl`` and ``stage=sft`` with :data:`PIPELINE_DEFAULTS`, then
    ``overrides`` (Hydra syntax, e.g. ``backbone=qwen_image_edit_2511`` to check the folder is that variant),
    every weight path the folder. No data node: the editor has no training buckets."""
    from omegaconf import open_dict

    defaults = ["backbone=qwen_image", "vae=qwen_image", "text_encoder=qwen_vl", "stage=sft"]
    stage = {
        f"stage.{k}={v!r}" if isinstance(v, str) else f"stage.{k}={v}" for k, v in PIPELINE_DEFAULTS.items()
    }
    cfg = _compose_train([*defaults, *sorted(stage), *overrides])
    folder = str(Path(folder).resolve())
    with open_dict(cfg):
        cfg.backbone.pretrained_path = folder
        cfg.vae.path = folder
        cfg.text_encoder.path = folder
        for key in ("data", "callbacks", "trainer", "strategy", "logger", "hydra", "paths"):
            cfg.pop(key, None)
    return cfg


def override_dtype(cfg: DictConfig, dtype: str) -> None:
    """Load the backbone, and the VAE and text encoder where their class takes a dtype, in ``dtype``."""
    from omegaconf import open_dict

    with open_dict(cfg):
        # a saved (resolved) config holds its own copy of the backbone node under stage/
        for node in (cfg.get("backbone"), OmegaConf.select(cfg, "stage.backbone")):
            if node is not None:
                node.torch_dtype = dtype
        for key in ("vae", "text_encoder"):
            node = cfg.get(key)
            if node is not None and node.get("_target_") in _DTYPE_TARGETS:
                node[_DTYPE_TARGETS[node._target_]] = dtype


def _self_contained(cfg: DictConfig, export: Path) -> None:
    """Point a full pipeline export's VAE and text encoder at the export's own components."""
    from omegaconf import open_dict

    with open_dict(cfg):
        if (export / "vae").is_dir() and cfg.get("vae") is not None and "path" in cfg.vae:
            cfg.vae.path = str(export)
            cfg.vae.subfolder = "vae"
        te = cfg.get("text_encoder")
        if te is not None and "path" in te and (export / "text_encoder").is_dir():
            te.path = str(export)


def load_editor(
    checkpoint: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    raw: bool = False,
    dtype: str | None = None,
    overrides: Sequence[str] = (),
) -> Any:
    """Rebuild an editor for inference (see the module docstring for accepted paths).

    Args:
        checkpoint: export folder, run folder, ``.ckpt`` file or diffusers pipeline folder.
        device: where to put it.
        raw: use the raw (non-EMA) weights.
        dtype: load the backbone (and the Qwen VAE / text encoder) in this dtype instead of the config's
            (``"float32"``, ``"bfloat16"``).
        overrides: for a pipeline folder, Hydra overrides of the composed config (:func:`pipeline_folder_config`).

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
    if path.is_dir() and not export and is_pipeline_folder(path):
        cfg = pipeline_folder_config(path, overrides)
        if dtype is not None:
            override_dtype(cfg, dtype)
        stage = build_editor_from_config(cfg).to(device)
        stage.inference_config = cfg
        stage.checkpoint_path = str(path)
        stage.weights = "pipeline"
        log.info("loaded the editor of the pipeline folder %s", path)
        return stage
    cfg_path = path / EXPORT_CONFIG if export else find_config(path)
    try:
        cfg = load_trusted_config(cfg_path)  # a handed folder: no `_target_` outside rededit's own
    except UntrustedConfigError as err:
        raise EditorLoadError(str(err)) from err
    if dtype is not None:
        override_dtype(cfg, dtype)
    full_pipeline = export and is_pipeline_folder(path)
    if full_pipeline:
        _self_contained(cfg, path)
    if export and (not raw or full_pipeline or (path / EXPORT_ADAPTER).is_dir()):
        # The EMA (or only) weights are the diffusers folder itself: build the backbone from it directly
        # instead of a random init that load_backbone_state would overwrite (matters for 20B models).
        node = OmegaConf.to_container(cfg.stage.backbone, resolve=True)
        node.update(transformer_config=None, pretrained_path=str(path / "transformer"), subfolder=None)
        stage = build_editor_from_config(cfg, backbone_node=node)
        if (path / EXPORT_EXTRAS).is_file():  # backbone parts outside transformer/ (FireEdit options)
            from safetensors.torch import load_file

            stage.backbone.load_state_dict({**stage.backbone.state_dict(), **load_file(path / EXPORT_EXTRAS)})
        weights = (path / "WEIGHTS").read_text().strip() if (path / "WEIGHTS").is_file() else "ema"
        if (path / EXPORT_ADAPTER).is_dir():  # transformer/ is the base: the adapter goes on top
            if not adapters.has_adapter(stage.backbone):
                raise EditorLoadError(
                    f"{path} holds {EXPORT_ADAPTER}/ but its {EXPORT_CONFIG} trains no adapter"
                )
            weights = load_export_adapter(stage.backbone, path, raw=raw)
            if raw:  # the raw FireEdit weights (backbone_raw holds the base and them)
                from safetensors.torch import load_file

                extras = {
                    k: v
                    for k, v in load_file(path / "backbone_raw.safetensors").items()
                    if not k.startswith("transformer.")
                }
                stage.backbone.load_state_dict({**stage.backbone.state_dict(), **extras})
        elif raw:  # a full pipeline export: built from its own folder (the base may be elsewhere), raw on top
            state, weights = load_backbone_state(path, use_ema=False)
            stage.backbone.load_state_dict(state, strict=True)
    else:
        if not export:
            try:
                resolve_checkpoint(path)
            except FileNotFoundError as err:
                raise EditorLoadError(str(err)) from err
        try:
            if export:  # raw weights of a full fine-tune's export (backbone_raw.safetensors)
                trainable, shadow, record = load_backbone_state(path, use_ema=False)[0], None, None
            else:
                trainable, shadow, _, record = consolidate_full(path)
        except UnsafeCheckpointError as err:
            raise EditorLoadError(str(err)) from err
        if record is not None:
            # an adapter run: base from its config, adapter (EMA unless raw) from the checkpoint
            state = {**trainable, **({} if raw or not shadow else shadow)}
            backbone = adapter_backbone_from_checkpoint(cfg, record, state, source=path)
            stage = build_editor_from_config(cfg, backbone=backbone)
            weights = "raw" if raw or not shadow else "ema"
        else:
            stage = build_editor_from_config(cfg)
            # a full fine-tune: the whole backbone (as load_backbone_state)
            state, weights = dict(trainable), "raw"
            if shadow and not raw:
                state.update({k: v.to(state[k].dtype) for k, v in shadow.items()})
                weights = "ema"
            stage.backbone.load_state_dict(state, strict=True)
    stage.to(device)
    stage.inference_config = cfg
    stage.checkpoint_path = str(path)
    stage.weights = weights
    log.info("loaded the %s editor from %s (config %s)", weights, path, cfg_path)
    return stage


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` → (path, strength); a path that itself exists wins over a split at its last colon
    (``C:\\loras\\x.safetensors``, ``a:b.safetensors``), and SCALE defaults to 1.0."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def load_loras(editor: Any, specs: Sequence[str]) -> list[dict[str, Any]]:
    """Load LoRA files (diffusers, ComfyUI, kohya/musubi or PEFT folder; :mod:`rededit.models.lora_formats`)
    into the editor's transformer as named peft adapters, each at its strength (``PATH[:SCALE]``), all active.

    Equal to merging ``Σ_i SCALE_i · alpha_i/r_i · B_i A_i`` into the weights by hand (tests/test_lora_formats.py).
    Sets ``editor.loras`` to one record per file (path, format, strength, sha256 of the files read, adapter name)
    for provenance, and returns it.

    Raises:
        EditorLoadError: a file that cannot be read or does not fit the transformer, naming it and why.
    """
    if not specs:
        return []
    items = []
    for spec in specs:
        path, scale = parse_lora_spec(str(spec))
        if not math.isfinite(scale):
            raise EditorLoadError(f"LoRA {spec}: the strength must be a finite number")
        try:
            items.append((read_lora(path), scale))
        except LoraFormatError as err:
            raise EditorLoadError(f"LoRA {err}") from err
    try:
        names = apply_loras(editor.backbone.transformer, items)
    except LoraFormatError as err:
        raise EditorLoadError(f"LoRA {err}") from err
    editor.loras = [
        {
            "path": str(loaded.path),
            "format": loaded.format,
            "scale": scale,
            "sha256": sha256_files(loaded.files),
            "adapter": name,
        }
        for (loaded, scale), name in zip(items, names)
    ]
    for rec in editor.loras:
        log.info(
            "LoRA %s (%s) at strength %g as adapter %s",
            rec["path"],
            rec["format"],
            rec["scale"],
            rec["adapter"],
        )
    return editor.loras
