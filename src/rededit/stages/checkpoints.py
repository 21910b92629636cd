"""Checkpoint chaining and export.

* ``load_backbone_state``: weights-only chaining between stages (``stage.init_from``, report Fig. 8):
  from a Lightning ``.ckpt`` (raw ``backbone.*`` weights, or the EMA callback's shadow on top of them),
  a run folder (its ``checkpoints/last.ckpt``), or an export folder.
* ``export_editor``: writes the editor as a folder that ``rededit-edit --checkpoint`` accepts and that
  diffusers loads: ``transformer/`` (``QwenImageTransformer2DModel.save_pretrained``, EMA weights when
  available), ``backbone_raw.safetensors`` (raw weights), ``rededit.yaml`` (the resolved config that
  rebuilds VAE, text encoder and backbone). When the backbone came from a diffusers pipeline folder
  (``pipeline_from``, issue 19) the export is a complete pipeline folder too: ``model_index.json`` and the
  base folder's other components (``vae/``, ``text_encoder/``, ``tokenizer/``, ``processor/``,
  ``scheduler/``: hard-linked when on the same filesystem, else copied, each recorded in
  ``rededit_export.json``), loadable by ``QwenImageEditPlusPipeline.from_pretrained(export)``, and a model
  card ``README.md`` (recipe, stage, steps, data manifest hash, the run's evaluation table when it has one).
  The whole folder is built beside ``out_dir`` and renamed into place (a previous export is swapped out
  only once the new one is complete); files get the mode a plain write gives under the umask.
* Adapter runs (``adapter=lora|lokr|loha``, issue 20; :func:`export_adapter`): ``transformer/`` and
  ``backbone_raw.safetensors`` hold the frozen *base* (unmerged, plain keys) and ``adapter/`` the trained adapter
  (EMA weights when available) as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), plus,
  for LoRA, ``pytorch_lora_weights.safetensors`` in diffusers' format (``transformer.*`` keys, the adapter config
  as metadata) that ``QwenImageEditPlusPipeline.load_lora_weights`` reads; ``adapter_raw/`` holds the raw adapter
  when ``adapter/`` holds the EMA one. ``stage.init_from`` of such an export is the merged model.
* ``consolidate``: one full (raw, EMA) backbone state from any checkpoint a strategy writes — a Lightning
  ``.ckpt`` file (single device, DDP), a sharded DCP directory (FSDP2/HSDP: ``.metadata`` + ``meta.pt``;
  the EMA shadow is stored as ``__ema__.*`` shards, see ``callbacks/ema.py``) or a DeepSpeed directory
  (Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``); ``rededit-consolidate`` exports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rededit.models import adapters
from rededit.models.lora_formats import DIFFUSERS_WEIGHT_NAME, export_lora_files
from rededit.parallel import meta_init
from rededit.parallel.safe_dcp import load_dcp_full
from rededit.utils.io import (
    atomic_path,
    atomic_write_text,
    file_mode,
    make_private_temp_public,
    sha256_file,
    write_json,
)
from rededit.utils.logging import get_logger
from rededit.utils.safe_load import UnsafeCheckpointError, forced_weights_only

log = get_logger(__name__)

EMA_STATE_KEY = "EMA"
EXPORT_CONFIG = "rededit.yaml"
EXPORT_EXTRAS = (
    "backbone_extras.safetensors"  # backbone tensors outside transformer/ (FireEdit options, issue 10)
)
EXPORT_METADATA = "rededit_export.json"  # a full pipeline export: where each component came from
MODEL_INDEX = "model_index.json"
EXPORT_ADAPTER = "adapter"  # an adapter run's export: the trained adapter (PEFT folder + diffusers LoRA file)
EXPORT_ADAPTER_RAW = "adapter_raw"  # ... and its raw weights when adapter/ holds the EMA ones
DIFFUSERS_LORA_FILE = DIFFUSERS_WEIGHT_NAME  # what QwenImageEditPlusPipeline.load_lora_weights(folder) finds
EDIT_PIPELINE_CLASS = "QwenImageEditPlusPipeline"


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


def is_pipeline_folder(path: str | Path) -> bool:
    """A diffusers pipeline folder (``model_index.json``): a published editor or a full export."""
    return (Path(path) / MODEL_INDEX).is_file()


def _ema_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    for key, value in ckpt.get("callbacks", {}).items():
        if key.split("{")[0] == EMA_STATE_KEY and isinstance(value, dict) and value.get("shadow"):
            return value["shadow"]
    return None


def load_backbone_state(path: str | Path, *, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Backbone state dict (keys relative to ``EditBackbone``) and which weights it is ("raw"/"ema")."""
    path = Path(path)
    if path.is_dir() and is_export_folder(path) and (path / EXPORT_ADAPTER).is_dir():
        return merged_export_state(path, use_ema=use_ema)
    if path.is_dir() and is_export_folder(path):
        if not use_ema:
            return load_file(path / "backbone_raw.safetensors"), "raw"
        from diffusers import QwenImageTransformer2DModel

        transformer = QwenImageTransformer2DModel.from_pretrained(path / "transformer")
        state = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
        if (path / EXPORT_EXTRAS).is_file():
            state.update(load_file(path / EXPORT_EXTRAS))
        return state, (path / "WEIGHTS").read_text().strip()
    raw, shadow, _, record = consolidate_full(path)
    if record is not None:
        raise ValueError(
            f"{path} is an adapter run's checkpoint (only adapter weights, no base): chain from its export "
            "folder (the merged model), or from `rededit-consolidate --merge-adapter` of it, or keep its base "
            "(stage.init_from=<the run's own init_from>) and continue its adapter with adapter.init_from=<export>/adapter"
        )
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
    raw, shadow, _ = consolidate_with_step(path)
    return raw, shadow


def consolidate_with_step(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int | None]:
    """:func:`consolidate` plus the checkpoint's ``global_step`` (None when it records none)."""
    raw, shadow, step, _ = consolidate_full(path)
    return raw, shadow, step


def consolidate_full(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int | None, dict[str, Any] | None]:
    """:func:`consolidate_with_step` plus the adapter record of an adapter run's checkpoint (None for a full
    fine-tune's): then ``raw`` holds only the trainable tensors (adapter, FireEdit), not the base."""
    ckpt_path = resolve_checkpoint(path)
    ckpt = _load_full_checkpoint(ckpt_path)
    weights = ckpt.get("state_dict", ckpt)
    raw = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    if not raw:
        raise ValueError(f"{ckpt_path}: the checkpoint holds no backbone.* weights")
    shadow = {k.removeprefix(DCP_EMA_PREFIX): v for k, v in weights.items() if k.startswith(DCP_EMA_PREFIX)}
    step = ckpt.get("global_step")
    record = ckpt.get(adapters.CHECKPOINT_KEY)
    return (
        raw,
        (shadow or _ema_state(ckpt) or None),
        (int(step) if isinstance(step, int) else None),
        record if isinstance(record, dict) else None,
    )


def backbone_from_state(cfg: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rebuild the ``EditBackbone`` of a run config (``cfg.backbone``, a ``_partial_``) on the meta device and
    adopt ``state``'s tensors (no random init, no second copy of the weights)."""
    from hydra.utils import instantiate

    patch = int(cfg.backbone.get("patch_size", 2))
    latent_channels = state["transformer.img_in.weight"].shape[1] // patch**2
    backbone = meta_init(instantiate(cfg.backbone), latent_channels=latent_channels)
    node = cfg.get("adapter")
    # an adapter run's gathered state (FSDP2 export): the adapter layers first, then its tensors
    if adapters.is_enabled(node) and any(".base_layer." in k for k in state):
        adapters.apply_adapter(backbone, {**adapters.plain(node), "init_from": None})
        # A stage's other adapters (NFT's old policy ``nft_old``, sharded beside the trained one) are training
        # state, not part of the editor: leave them out (strict loading still catches any other stray key).
        own = set(backbone.state_dict())
        layers = [layer for _, layer in adapters.tuner_layers(backbone)]
        attrs = {a for layer in layers for a in (*layer.adapter_layer_names, *layer.other_param_names)}
        state = {k: v for k, v in state.items() if k in own or not set(k.split(".")) & attrs}
    backbone.load_state_dict(state, strict=True, assign=True)
    backbone.rebuild_rope()
    return backbone


# --------------------------------------------------------------------------------------------- pipeline export
#: Which config node names the folder a pipeline component was loaded from (else: the backbone's base folder).
_COMPONENT_SOURCES = {
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "text_encoder",
    "processor": "text_encoder",
}


def pipeline_base(cfg: Any) -> Path | None:
    """The diffusers pipeline folder the run's backbone came from (``backbone.pretrained_path``), or None."""
    node = cfg.get("backbone") if cfg is not None else None
    path = node.get("pretrained_path") if node is not None else None
    if not path or not isinstance(path, str | os.PathLike) or not Path(path).is_dir():
        return None
    return Path(path) if is_pipeline_folder(path) else None


def _vl_root(cfg: Any) -> Path | None:
    """``text_encoder.path`` when it is a plain Qwen2.5-VL folder (model and processor files at its root, no
    ``text_encoder/``), else None."""
    node = cfg.get("text_encoder") if cfg is not None else None
    path = node.get("path") if node is not None and "path" in node else None
    if (
        not isinstance(path, str)
        or not (Path(path) / "config.json").is_file()
        or (Path(path) / "text_encoder").is_dir()
    ):
        return None
    return Path(path)


def edit_processor_source(cfg: Any) -> Path | None:
    """The folder of the Qwen2.5-VL *image* processor the run's text encoder used (``text_encoder.path``'s
    ``processor/``, or its root for a plain Qwen2.5-VL folder), or None when it used none (text only)."""
    node = cfg.get("text_encoder") if cfg is not None else None
    path = node.get("path") if node is not None and "path" in node else None
    if not isinstance(path, str):
        return None
    for folder in (Path(path) / "processor", Path(path)):
        if _has_image_processor(folder):
            return folder
    return None


def _has_image_processor(folder: Path) -> bool:
    """Whether ``folder`` holds an image processor's settings: ``preprocessor_config.json`` (as published
    Qwen2.5-VL folders have) or a ``processor_config.json`` with an ``image_processor`` entry (what
    transformers 5 writes)."""
    if (folder / "preprocessor_config.json").is_file():
        return True
    config = folder / "processor_config.json"
    try:
        return config.is_file() and "image_processor" in json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config}: not a JSON object ({err})") from err


def pipeline_sources(cfg: Any, base: Path) -> dict[str, Path]:
    """``{component: the folder to copy as <component>/}`` for every component of ``base``'s
    ``model_index.json`` except the transformer: the folder the run loaded it from (``vae.path``,
    ``text_encoder.path``: its ``<component>/``, or for a plain Qwen2.5-VL folder the folder itself as
    ``text_encoder/``) when there is one, else ``base/<component>``.

    A text-to-image base (Qwen-Image: no ``processor`` in its index) trained into an editor with a text encoder
    that read images (a Qwen2.5-VL processor) also gets ``processor``: the export must be a
    ``QwenImageEditPlusPipeline`` folder, and that pipeline encodes its reference images with this processor."""
    index = json.loads((base / MODEL_INDEX).read_text(encoding="utf-8"))
    vl_root = _vl_root(cfg)
    sources = {}
    for name in index:
        if name.startswith("_") or name == "transformer" or not isinstance(index[name], list):
            continue
        node = cfg.get(_COMPONENT_SOURCES.get(name, ""), None) if cfg is not None else None
        path = node.get("path") if node is not None and "path" in node else None
        if name == "text_encoder" and vl_root is not None:
            sources[name] = vl_root
            continue
        folder = Path(path) if isinstance(path, str) and (Path(path) / name).is_dir() else base
        if not (folder / name).is_dir():
            raise FileNotFoundError(
                f"{base / MODEL_INDEX} lists {name!r} but {folder / name} is not a folder"
            )
        sources[name] = folder / name
    if "processor" not in sources and (processor := edit_processor_source(cfg)) is not None:
        sources["processor"] = processor
    return sources


def _link_or_copy_tree(src: Path, dst: Path, root: Path | None = None) -> str:
    """Every file of ``src`` into ``dst``: a hard link when the filesystem allows (same device; the file then
    keeps the base file's mode, as it is the same file), else a copy with the mode a plain write gives under
    the umask. Returns ``"hardlink"``, ``"copy"`` or ``"mixed"``.

    Raises:
        ValueError: a file of ``src`` is a link to a file outside ``root`` (default: ``src``'s parent, the
            pipeline folder it belongs to).
    """
    modes = set()
    base = (root or src.parent).resolve()
    # A hub cache's snapshot folder holds symlinks to its repository's blobs/; nothing else may lead out of
    # the base folder (a folder someone handed over must not copy, say, ~/.ssh into an export to be shipped).
    roots = [base, base.parent.parent / "blobs"] if base.parent.name == "snapshots" else [base]
    dst.mkdir(parents=True, exist_ok=True)  # mkdir: the mode a plain mkdir gives under the umask
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise ValueError(f"{path} links to {real}, outside the pipeline folder {base}: refused")
        try:
            os.link(real, target)
            modes.add("hardlink")
        except OSError:
            shutil.copyfile(real, target)
            os.chmod(target, file_mode())
            modes.add("copy")
    return modes.pop() if len(modes) == 1 else ("mixed" if modes else "copy")


def _eval_table(run_dir: Path | None) -> str | None:
    """The run's evaluation table (``rededit-eval``'s ``table.md``) in ``<run>/eval/`` or one folder below
    the run, or None."""
    if run_dir is None or not Path(run_dir).is_dir():
        return None
    for candidate in (Path(run_dir) / "eval" / "table.md", *sorted(Path(run_dir).glob("*/table.md"))):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return None


def export_card_info(cfg: Any, *, step: int | None, run_dir: str | Path | None) -> dict[str, Any]:
    """What the model card says about a run: recipe, stage, steps, data manifest (path and sha256), evaluation
    table (from the run folder, when there is one)."""
    from omegaconf import OmegaConf

    def get(key: str) -> Any:
        try:
            return OmegaConf.select(cfg, key, default=None)
        except Exception:  # an interpolation the exporting process cannot resolve
            return None

    manifest = get("data.manifest")
    manifest_sha = sha256_file(manifest) if manifest and Path(str(manifest)).is_file() else None
    # the recipe as typed: rededit-train's command-line overrides (Hydra keeps them in <run>/.hydra/)
    overrides_file = Path(run_dir) / ".hydra" / "overrides.yaml" if run_dir else None
    overrides = None
    if overrides_file is not None and overrides_file.is_file():
        overrides = [str(o) for o in (OmegaConf.load(overrides_file) or [])]
    return {
        "recipe": overrides,
        "stage": get("stage._target_"),
        "stage_name": get("stage_name"),
        "run_name": get("run_name"),
        "variant": get("backbone.variant"),
        "steps": step,
        "max_steps": get("trainer.max_steps"),
        "learning_rate": get("optimizer.lr"),
        "seed": get("seed"),
        "data_manifest": str(manifest) if manifest else None,
        "data_manifest_sha256": manifest_sha,
        "run_dir": str(run_dir) if run_dir else None,
        "eval_table": _eval_table(Path(run_dir)) if run_dir else None,
    }


def _model_card(name: str, info: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The export's ``README.md``."""
    base = meta.get("base_pipeline") or ""
    recipe = info.get("recipe")
    rows = [
        ("base pipeline", f"`{base}`" + (f" (preset `{info['variant']}`)" if info.get("variant") else "")),
        ("recipe (rededit-train overrides)", f"`{' '.join(recipe)}`" if recipe else "not recorded"),
        ("stage", f"`{info.get('stage')}` ({info.get('stage_name')})"),
        ("optimizer steps", f"{info.get('steps')} (max_steps {info.get('max_steps')})"),
        ("weights in transformer/", meta.get("weights")),
        ("learning rate, seed", f"{info.get('learning_rate')}, {info.get('seed')}"),
        ("data manifest", f"`{info.get('data_manifest')}`"),
        ("data manifest sha256", f"`{info.get('data_manifest_sha256')}`"),
        ("run folder", f"`{info.get('run_dir')}`"),
    ]
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: image-to-image",
        "tags: [rededit, qwen-image, image-editing]",
        "---",
        f"# {name}",
        "",
        "An instruction-based image editor trained with rededit from a diffusers "
        "Qwen-Image pipeline folder. This folder is a complete diffusers pipeline:",
        "",
        "```python",
        "import torch",
        f"from diffusers import {meta.get('pipeline_class', 'QwenImageEditPlusPipeline')}",
        f'pipe = {meta.get("pipeline_class", "QwenImageEditPlusPipeline")}.from_pretrained("{name}", torch_dtype=torch.bfloat16)',
        "```",
        "",
        f"or `rededit-edit --checkpoint {name} --image A.png --instruction ...` (the same image for the same "
        "inputs and seed).",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Components",
        "",
        "| component | taken from | how |",
        "|---|---|---|",
        f"| transformer | trained by this run | {meta.get('weights')} weights |",
        *[f"| {c} | `{m['source']}` | {m['mode']} |" for c, m in sorted(meta.get("components", {}).items())],
        "",
    ]
    table = info.get("eval_table")
    lines += ["## Evaluation", "", table.strip() if table else "No evaluation table in the run folder.", ""]
    return "\n".join(lines)


def export_editor(
    backbone: torch.nn.Module,
    out_dir: str | Path,
    *,
    config_yaml: str,
    ema_state: dict[str, torch.Tensor] | None = None,
    pipeline_from: str | Path | None = None,
    components: Mapping[str, str | Path] | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir`` (see module docstring). ``ema_state``: full backbone state with EMA weights.

    Args:
        pipeline_from: the diffusers pipeline folder the backbone came from (:func:`pipeline_base`): the export
            becomes a complete pipeline folder. None: today's layout (the tiny demo editors).
        components: ``{component: the folder to copy as <component>/}`` (:func:`pipeline_sources`; default:
            every component of ``pipeline_from``).
        card: what the model card says (:func:`export_card_info`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build the whole folder aside, then rename it into place: a reader never sees a half-written export.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = None
    try:
        make_private_temp_public(tmp_dir)  # mkdtemp is 0700 whatever the umask
        weights = _write_editor(backbone, tmp_dir, config_yaml=config_yaml, ema_state=ema_state)
        if adapters.has_adapter(backbone):
            export_adapter(backbone, tmp_dir, ema_state=ema_state)
        if pipeline_from is not None:
            _write_pipeline(tmp_dir, Path(pipeline_from), components, weights, card or {}, out_dir.name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            out_dir.rename(old)
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            old.rename(out_dir)  # the previous export stays in place
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _write_pipeline(
    out: Path,
    base: Path,
    components: Mapping[str, str | Path] | None,
    weights: str,
    card: Mapping[str, Any],
    name: str,
) -> None:
    """``model_index.json``, the base's other components, ``rededit_export.json`` and ``README.md``."""
    index = json.loads((base / MODEL_INDEX).read_text(encoding="utf-8"))
    sources = {k: Path(v) for k, v in (components or pipeline_sources(None, base)).items()}
    meta: dict[str, Any] = {
        "format": "diffusers pipeline + rededit editor",
        "pipeline_class": index.get("_class_name"),
        "base_pipeline": str(base.resolve()),
        "weights": weights,
        "transformer": "trained (EMA weights)" if weights == "ema" else "trained (raw weights)",
        "components": {},
    }
    for component, folder in sorted(sources.items()):
        if component == "processor" and "processor" not in index:
            # A text-to-image base trained into an editor: the edit pipeline needs the image processor the run's
            # text encoder used. Written by transformers from its files (never a copy of a whole model folder).
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(folder))
            processor.save_pretrained(str(out / "processor"))
            index["processor"] = ["transformers", type(processor).__name__]
            index["_class_name"] = meta["pipeline_class"] = EDIT_PIPELINE_CLASS
            mode = "written"
        else:
            root = folder if folder.name != component else None  # a plain Qwen2.5-VL folder is its own root
            mode = _link_or_copy_tree(folder, out / component, root)
        meta["components"][component] = {"source": str(folder.resolve()), "mode": mode}
    atomic_write_text(out / MODEL_INDEX, json.dumps(index, indent=2) + "\n")
    write_json(out / EXPORT_METADATA, {**meta, "card": {k: v for k, v in card.items() if k != "eval_table"}})
    atomic_write_text(out / "README.md", _model_card(name, card, meta))


def _write_editor(
    backbone: torch.nn.Module,
    out_dir: Path,
    *,
    config_yaml: str,
    ema_state: dict[str, torch.Tensor] | None,
) -> str:
    """The editor files of an export into ``out_dir`` (an empty folder); returns ``"ema"`` or ``"raw"``."""
    adapted = adapters.has_adapter(backbone)
    # An adapter run: the files hold the frozen base in plain keys (the adapter goes to adapter/).
    state = adapters.base_state_dict(backbone) if adapted else backbone.state_dict()
    raw = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out_dir / "backbone_raw.safetensors") as tmp:
        save_file(raw, str(tmp))
    extras = {k: v for k, v in (ema_state or raw).items() if not k.startswith("transformer.")}
    if extras:  # parts diffusers' folder cannot hold (FireEdit options), EMA weights when available
        with atomic_path(out_dir / EXPORT_EXTRAS) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in extras.items()}, str(tmp))
    transformer = backbone.transformer
    saved = None
    if ema_state is not None and not adapted:  # an adapter's EMA leaves the frozen base as it is
        saved = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        transformer.load_state_dict(
            {k.removeprefix("transformer."): v for k, v in ema_state.items() if k.startswith("transformer.")}
        )
    try:
        final = out_dir / "transformer"
        final.mkdir()
        make_private_temp_public(final)
        with adapters.unwrapped(transformer) if adapted else contextlib.nullcontext():
            transformer.save_pretrained(final)
        for written in final.rglob("*"):  # some writers (safetensors) create 0600 files
            make_private_temp_public(written)
    finally:
        if saved is not None:
            transformer.load_state_dict(saved)
    with atomic_path(out_dir / EXPORT_CONFIG) as tmp:
        tmp.write_text(config_yaml, encoding="utf-8")
    weights = "ema" if ema_state is not None else "raw"
    atomic_write_text(out_dir / "WEIGHTS", weights + "\n")
    return weights


# --------------------------------------------------------------------------------------------- adapters (issue 20)
def export_adapter(
    backbone: torch.nn.Module, out_dir: str | Path, *, ema_state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the adapter files of an adapter run's export into ``out_dir`` (see the module docstring):
    ``adapter/`` (PEFT folder; EMA weights when ``ema_state`` is given, and then ``adapter_raw/`` with the raw
    ones) and, for LoRA, the single files the ecosystem loads (:func:`rededit.models.lora_formats.export_lora_files`:
    diffusers' ``pytorch_lora_weights.safetensors``, ComfyUI's and kohya's) in ``adapter/``. The one place an
    export writes adapter files. Returns ``out_dir/adapter``."""
    out_dir = Path(out_dir)
    folder = out_dir / EXPORT_ADAPTER
    state = adapters.adapter_state_dict(backbone, state=ema_state)
    adapters.save_peft_folder(backbone, folder, state=state)
    config = adapters.peft_config_of(backbone)
    if config.peft_type.value == "LORA":
        if config.alpha_pattern or config.rank_pattern:
            # Per-module ranks/alphas have no single-file spelling we can check here; the PEFT folder keeps them.
            log.warning("adapter with rank/alpha patterns: only the PEFT folder %s is written", folder)
        else:
            export_lora_files(state, float(config.lora_alpha), folder, use_rslora=bool(config.use_rslora))
    if ema_state is not None:
        adapters.save_peft_folder(backbone, out_dir / EXPORT_ADAPTER_RAW)
    return folder


def load_export_adapter(backbone: torch.nn.Module, export: str | Path, *, raw: bool = False) -> str:
    """Fill ``backbone``'s adapter (already injected with the export's config) from an adapter export: the
    ``adapter/`` weights, or ``adapter_raw/`` (when there is one) with ``raw``. Returns ``"ema"``/``"raw"``."""
    export = Path(export)
    folder = export / (
        EXPORT_ADAPTER_RAW if raw and (export / EXPORT_ADAPTER_RAW).is_dir() else EXPORT_ADAPTER
    )
    _, state = adapters.load_peft_folder(folder)
    adapters.load_adapter_state(backbone, state, source=folder)
    weights = (export / "WEIGHTS").read_text().strip() if (export / "WEIGHTS").is_file() else "raw"
    return "raw" if raw else weights


def merged_export_state(export: str | Path, *, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The full backbone state of an adapter export with its adapter merged into the base (``stage.init_from``
    of an adapter run's export: the next stage starts from what the adapter run made)."""
    from diffusers import QwenImageTransformer2DModel

    export = Path(export)
    folder = export / (
        EXPORT_ADAPTER if use_ema or not (export / EXPORT_ADAPTER_RAW).is_dir() else EXPORT_ADAPTER_RAW
    )
    config, state = adapters.load_peft_folder(folder)
    holder = torch.nn.Module()  # adapters' functions take an object with a .transformer
    holder.transformer = QwenImageTransformer2DModel.from_pretrained(export / "transformer")
    holder.transformer.add_adapter(config, adapter_name=adapters.ADAPTER_NAME)
    adapters.load_adapter_state(holder, state, source=folder)
    adapters.merge_adapter(holder)
    merged = {f"transformer.{k}": v for k, v in holder.transformer.state_dict().items()}
    extras = export / EXPORT_EXTRAS if use_ema else export / "backbone_raw.safetensors"
    if extras.is_file():
        merged.update({k: v for k, v in load_file(extras).items() if not k.startswith("transformer.")})
    weights = (export / "WEIGHTS").read_text().strip() if use_ema else "raw"
    return merged, f"{weights}, adapter merged"


def adapter_backbone_from_checkpoint(
    cfg: Any, record: Mapping[str, Any], trainable: Mapping[str, torch.Tensor], *, source: str | Path
) -> torch.nn.Module:
    """Rebuild an adapter run's backbone from its config and checkpoint: the base from ``cfg.backbone`` and
    ``cfg.stage.init_from`` (checked against the recorded base fingerprint), the recorded adapter on it, then the
    checkpoint's trainable tensors (adapter, FireEdit). ``record``: the checkpoint's ``adapter`` entry."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = cfg.backbone
    tc = node.get("transformer_config")
    patch = int(node.get("patch_size", 2))
    channels = int(tc.in_channels) // patch**2 if tc is not None and tc.get("in_channels") else None
    backbone = instantiate(node)(latent_channels=channels)
    backbone.freeze_unused_text_tail()
    init_from = OmegaConf.select(cfg, "stage.init_from", default=None)
    if init_from:
        state, _ = load_backbone_state(
            init_from, use_ema=bool(OmegaConf.select(cfg, "stage.init_from_ema", default=True))
        )
        backbone.load_state_dict(state, strict=True)
    want, have = record.get("base_fingerprint"), adapters.weights_fingerprint(backbone)
    if want is not None and abs(want - have) > 1e-6 * max(1.0, abs(want)):
        raise ValueError(
            f"{source}: the base rebuilt from the run's config (backbone, stage.init_from={init_from}) is not the "
            f"one the adapter was trained on (fingerprint {have:.8g}, recorded {want:.8g}); a random base (no "
            "init_from, no backbone.pretrained_path) cannot be rebuilt"
        )
    adapters.apply_adapter(backbone, {**record["node"], "init_from": None})
    names = [n for n, p in backbone.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in trainable]
    if missing:
        raise ValueError(f"{source}: the checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
    backbone.load_state_dict({n: trainable[n] for n in names}, strict=False)
    return backbone
