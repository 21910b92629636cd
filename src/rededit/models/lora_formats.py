"""LoRA files in and out (issue 20): diffusers, ComfyUI, kohya/musubi-tuner and PEFT folders.

One adapter, four spellings. The canonical in-memory form is peft's: the state dict of a LoRA on diffusers'
``QwenImageTransformer2DModel`` (what ``peft.get_peft_model_state_dict`` returns) plus one ``alpha`` per module
(:class:`LoraState`)::

    transformer_blocks.0.attn.to_q.lora_A.weight   A  [r, in]
    transformer_blocks.0.attn.to_q.lora_B.weight   B  [out, r]

and a module ``W`` [out, in] computes ``y = x Wᵀ + s · (x Aᵀ) Bᵀ``, i.e. ``ΔW = s · B A`` with

    s = alpha / r            (peft, diffusers, ComfyUI, kohya)                                     (1)
    s = alpha / √r           (peft with use_rslora)                                                (2)

times the user's strength (``--lora PATH:SCALE``). A file without any alpha means ``alpha = r`` (``s = 1``): that
is what diffusers' loader, ComfyUI (``alpha=None`` → 1.0) and peft (``lora_alpha = r`` when read from weights)
all assume, so it is what rededit assumes too.

The formats (read and written here; the key maps were checked against each tool's loader):

==========  ==================================================  ====================================================
format      keys                                                where alpha lives
==========  ==================================================  ====================================================
diffusers   ``transformer.<module>.lora_A/B.weight``            safetensors header ``lora_adapter_metadata``: the
            (``QwenImageEditPlusPipeline.save_lora_weights``)   LoraConfig with a ``transformer.`` prefix (r,
                                                                lora_alpha, rank/alpha_pattern, use_rslora), as
                                                                ``save_lora_weights(transformer_lora_adapter_metadata
                                                                =...)`` writes it and ``load_lora_weights`` reads it
comfyui     ``diffusion_model.<module>.lora_A/B.weight``        ``diffusion_model.<module>.alpha`` (scalar), so
                                                                strength 1.0 in ComfyUI means what training used
kohya       ``lora_unet_<module, dots → _>.lora_down/up.weight``  ``lora_unet_<...>.alpha`` (scalar)
peft        folder: ``adapter_config.json`` +                   ``lora_alpha``/``alpha_pattern`` of the config
            ``adapter_model.safetensors``
            (``base_model.model.<module>.lora_A/B.weight``)
==========  ==================================================  ====================================================

Reading also takes what ComfyUI's Qwen-Image loader accepts (``comfy/lora.py``, ``model_lora_keys_unet`` for
``QwenImage``; ``comfy/weight_adapter/lora.py``): the prefixes ``diffusion_model.``, ``transformer.``, none,
``lycoris_`` and ``lora_unet_`` and the suffix pairs ``lora_up/lora_down``, ``lora_B/lora_A`` and
``lora_B.default/lora_A.default`` with ``<module>.alpha``. ComfyUI's Qwen-Image model names its layers exactly as
diffusers does (``transformer_blocks.N.attn.to_q``, ``img_mlp.net.0.proj``, ``img_mod.1``, ``norm_out.linear``),
and so does musubi-tuner's (``networks/lora_qwen_image.py``: prefix ``lora_unet``, the block path with dots as
underscores), so one module name serves all four formats. A flat kohya name is turned back into a module path
with the Linear layers of diffusers' class itself (built on the meta device), not with a guessed rule.

A converted adapter keeps its effective scale: the tensors are copied bit for bit and each ``alpha`` is stored
in float32 when that holds it exactly, else in float64, so (1) gives the very ``s`` in the reader's arithmetic.
An rslora adapter (eq. 2) written to a format that knows only eq. (1) gets ``alpha' = alpha·√r`` picked so that
``alpha'/r`` equals ``alpha/√r`` (when no float does, for some ranks that are no power of 2: within 1 ulp, 1e-16
relative, far below the float32 arithmetic of any LoRA application).

Only safetensors and JSON are read; nothing is unpickled or imported from a file. A PEFT folder's
``adapter_config.json`` is validated: settings that would change what the weights mean (DoRA, a LoRA bias,
PiSSA/OLoRA-style initialisations that rewrite the base weights, modules_to_save, ...) are refused by name.
LoKr and LoHa adapters are read from PEFT folders only (peft applies them); single-file LoKr/LoHa (LyCORIS)
files are refused with that advice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rededit.utils.io import atomic_path, atomic_write_text
from rededit.utils.logging import get_logger

log = get_logger(__name__)

#: The file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights(folder)`` looks for.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: The safetensors header key diffusers stores the LoraConfig under (``diffusers.loaders.lora_base``).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: File names :func:`export_lora_files` writes (the diffusers file keeps diffusers' name so that
#: ``pipe.load_lora_weights(out_dir)`` finds it).
EXPORT_NAMES = {
    "diffusers": DIFFUSERS_WEIGHT_NAME,
    "comfyui": "lora_comfyui.safetensors",
    "kohya": "lora_kohya.safetensors",
}
FORMATS = ("diffusers", "comfyui", "kohya", "peft")

_A, _B = "lora_A.weight", "lora_B.weight"
LORA_PARTS = (_A, _B)  # a module's two LoRA tensors, as peft names them relative to the module
# suffix → role, for every LoRA spelling rededit reads (longest first so ".default" wins)
_SUFFIXES = (
    (".lora_A.default.weight", "A"),
    (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
)
# key prefix → (format name, module names are flat with "_" instead of ".")
_PREFIXES = (
    ("base_model.model.", "peft", False),
    ("diffusion_model.", "comfyui", False),
    ("transformer.", "diffusers", False),
    ("lora_unet_", "kohya", True),
    ("lycoris_", "lycoris", True),
)
# parts of other adapter types, named in the error that refuses them
_OTHER_ADAPTERS = {
    "lokr_": "LoKr",
    "hada_": "LoHa",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_mid": "LoCon/Tucker",
    "oft_": "OFT",
    "boft_": "BOFT",
}


class LoraFormatError(ValueError):
    """A LoRA file or folder cannot be read as an adapter of the Qwen-Image transformer (the message names
    the file and what is wrong)."""


# ------------------------------------------------------------------------------------------- canonical form
@dataclasses.dataclass
class LoraState:
    """A LoRA of ``QwenImageTransformer2DModel`` in peft's terms (module docstring, eqs. 1-2).

    Attributes:
        weights: ``{"<module>.lora_A.weight": A [r, in], "<module>.lora_B.weight": B [out, r]}``.
        alphas: ``{module: alpha}`` for every module of ``weights``.
        use_rslora: the scale is ``alpha / √r`` (eq. 2) instead of ``alpha / r``.
    """

    weights: dict[str, torch.Tensor]
    alphas: dict[str, float]
    use_rslora: bool = False

    @property
    def modules(self) -> list[str]:
        return sorted(k[: -len(_A) - 1] for k in self.weights if k.endswith("." + _A))

    def rank(self, module: str) -> int:
        return int(self.weights[f"{module}.{_A}"].shape[0])

    def scale(self, module: str) -> float:
        """``s`` of eq. (1)/(2), computed as peft computes it (Python float)."""
        r = self.rank(module)
        return self.alphas[module] / (math.sqrt(r) if self.use_rslora else r)

    def delta(self, module: str) -> torch.Tensor:
        """``ΔW = s · B A`` [out, in] in float64 (for merging by hand and comparing adapters)."""
        a = self.weights[f"{module}.{_A}"].double()
        b = self.weights[f"{module}.{_B}"].double()
        return self.scale(module) * (b @ a)

    def scales(self) -> dict[str, float]:
        return {m: self.scale(m) for m in self.modules}


def lora_state(
    peft_state: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float] | float | None = None,
    *,
    use_rslora: bool = False,
    source: str = "the adapter",
) -> LoraState:
    """Check and normalise a peft LoRA state dict into a :class:`LoraState`.

    Args:
        peft_state: ``get_peft_model_state_dict`` of the transformer (keys ``<module>.lora_A.weight``; the
            ``.default`` adapter-name spelling of ``model.state_dict()`` is accepted too).
        alphas: per-module alpha, one alpha for every module, or None (``alpha = r``: a file without alpha).
        use_rslora: the adapter was trained with ``use_rslora`` (scale ``alpha/√r``).
        source: named in errors.
    """
    weights: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        for suffix, role in _SUFFIXES[:4]:
            if key.endswith(suffix):
                weights[f"{key[: -len(suffix)]}.lora_{role}.weight"] = value
                break
        else:
            raise LoraFormatError(f"{source}: {key!r} is not a LoRA weight (<module>.lora_A/lora_B.weight)")
    modules = _check_pairs(weights, source)
    if alphas is None:
        table = {m: float(weights[f"{m}.{_A}"].shape[0]) for m in modules}
    elif isinstance(alphas, int | float):
        table = dict.fromkeys(modules, float(alphas))
    else:
        missing = [m for m in modules if m not in alphas]
        if missing:
            raise LoraFormatError(f"{source}: no alpha for module {missing[0]} ({len(missing)} without)")
        table = {m: float(alphas[m]) for m in modules}
    for m, a in table.items():
        if not math.isfinite(a):
            raise LoraFormatError(f"{source}: alpha of {m} is {a}")
    return LoraState(weights, table, use_rslora)


def _check_pairs(weights: Mapping[str, torch.Tensor], source: str) -> list[str]:
    modules = sorted({k.rsplit(".", 2)[0] for k in weights})
    for m in modules:
        a, b = weights.get(f"{m}.{_A}"), weights.get(f"{m}.{_B}")
        if a is None or b is None:
            raise LoraFormatError(
                f"{source}: module {m} has lora_{'A' if a is None else 'B'} (down/up) missing"
            )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraFormatError(
                f"{source}: module {m} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; a LoRA of a "
                "Linear layer needs A [r, in] and B [out, r]"
            )
    if not modules:
        raise LoraFormatError(f"{source}: no LoRA weights")
    return modules


# ---------------------------------------------------------------------------------------------- module names
@functools.cache
def _qwen_linear_names() -> tuple[dict[str, str], dict[str, str]]:
    """Flat → dotted names of the transformer's Linear layers: (top level, inside ``transformer_blocks.N``).

    Read from diffusers' own class (one block, every optional part on, built on the meta device: no memory, no
    weights), so kohya names follow whatever diffusers calls its layers.
    """
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            in_channels=16,
            out_channels=4,
            axes_dims_rope=(2, 2, 4),
            use_additional_t_cond=True,
        )
    top: dict[str, str] = {}
    block: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith("transformer_blocks.0."):
            rel = name[len("transformer_blocks.0.") :]
            block[rel.replace(".", "_")] = rel
        else:
            top[name.replace(".", "_")] = name
    return top, block


def unflatten_module(flat: str, source: str = "the file") -> str:
    """A kohya/LyCORIS module name (dots as ``_``) → the transformer's module path.

    ``transformer_blocks_12_attn_to_out_0`` → ``transformer_blocks.12.attn.to_out.0``.
    """
    top, block = _qwen_linear_names()
    if flat in top:
        return top[flat]
    m = re.fullmatch(r"transformer_blocks_(\d+)_(.+)", flat)
    if m and m.group(2) in block:
        return f"transformer_blocks.{m.group(1)}.{block[m.group(2)]}"
    raise LoraFormatError(
        f"{source}: {flat!r} names no Linear layer of the Qwen-Image transformer (expected e.g. "
        "transformer_blocks_0_attn_to_q, transformer_blocks_0_img_mlp_net_0_proj, proj_out)"
    )


def flatten_module(module: str) -> str:
    return module.replace(".", "_")


# --------------------------------------------------------------------------------------------------- reading
def _other_adapter(key: str) -> str | None:
    for part, name in _OTHER_ADAPTERS.items():
        if part in key:
            return name
    return None


def detect_format(keys: list[str] | Any, source: str = "the file") -> str:
    """The format of a LoRA state dict from its keys: ``diffusers`` (``transformer.``), ``comfyui``
    (``diffusion_model.``), ``kohya`` (``lora_unet_``), ``peft`` (``base_model.model.``), ``lycoris``
    (``lycoris_``) or ``bare`` (module paths without prefix, which ComfyUI also loads).

    Raises:
        LoraFormatError: a key of no known spelling or a mix of spellings, naming ``source`` and a key.
    """
    keys = list(keys)
    if not keys:
        raise LoraFormatError(f"{source}: holds no tensors")
    found: dict[str, str] = {}
    for key in keys:
        other = _other_adapter(key)
        if other is not None:
            hint = " (use a PEFT folder for LoKr/LoHa)" if other in ("LoKr", "LoHa") else ""
            raise LoraFormatError(f"{source}: {other} weights ({key!r}) are not supported in this file{hint}")
        if not any(key.endswith(s) for s, _ in _SUFFIXES):
            raise LoraFormatError(
                f"{source}: unrecognised key {key!r}: not a LoRA weight of the Qwen-Image transformer (expected "
                "<module>.lora_A/lora_B.weight, .lora_down/lora_up.weight or .alpha)"
            )
        fmt = next((f for p, f, _ in _PREFIXES if key.startswith(p)), "bare")
        if fmt == "bare" and (key.startswith("lora_te") or key.startswith("text_encoder")):
            raise LoraFormatError(
                f"{source}: {key!r} is a text-encoder LoRA weight; rededit applies LoRAs to the transformer only"
            )
        found.setdefault(fmt, key)
    if len(found) > 1:
        examples = ", ".join(f"{f}: {k!r}" for f, k in found.items())
        raise LoraFormatError(f"{source}: keys of several formats in one file ({examples})")
    return next(iter(found))


def from_state_dict(
    state: Mapping[str, torch.Tensor], source: str = "the file", metadata: Mapping[str, str] | None = None
) -> tuple[LoraState, str]:
    """A LoRA state dict of any single-file format (:func:`detect_format`) as a :class:`LoraState`.

    Alpha comes from the diffusers header metadata when present (``lora_adapter_metadata``), else from the
    ``.alpha`` tensors, else ``alpha = r``. A kohya ``alpha`` of 0 means ``alpha = r`` (sd-scripts' and
    musubi-tuner's rule).

    Returns:
        the adapter and the detected format.
    """
    fmt = detect_format(state.keys(), source)
    prefix, flat = next(((p, fl) for p, f, fl in _PREFIXES if f == fmt), ("", False))
    weights: dict[str, torch.Tensor] = {}
    file_alphas: dict[str, float] = {}
    for key, value in state.items():
        body = key[len(prefix) :]
        suffix, role = next((s, r) for s, r in _SUFFIXES if body.endswith(s))
        name = body[: -len(suffix)]
        module = unflatten_module(name, source) if flat else name
        if role == "alpha":
            if value.numel() != 1:
                raise LoraFormatError(
                    f"{source}: {key!r} should be one number, has shape {tuple(value.shape)}"
                )
            alpha = float(value.reshape(()).double().item())
            if not math.isfinite(alpha):
                raise LoraFormatError(f"{source}: {key!r} is {alpha}")
            file_alphas[module] = alpha
            continue
        target = f"{module}.lora_{role}.weight"
        if target in weights:
            raise LoraFormatError(f"{source}: module {module} has two lora_{role} tensors (one is {key!r})")
        weights[target] = value
    modules = _check_pairs(weights, source)
    stray = sorted(set(file_alphas) - set(modules))
    if stray:
        raise LoraFormatError(f"{source}: an alpha without weights for module {stray[0]}")
    config = _diffusers_config(metadata, source) if metadata else None
    if config is not None:
        alphas = _alphas_from_config(config, modules, weights, source)
        return LoraState(weights, alphas, bool(config.get("use_rslora", False))), fmt
    alphas = {}
    for m in modules:
        r = float(weights[f"{m}.{_A}"].shape[0])
        a = file_alphas.get(m)
        alphas[m] = r if a is None or (a == 0 and fmt == "kohya") else a
    unset = [m for m in modules if m not in file_alphas]
    if unset:
        log.info(
            "%s: %d of %d modules have no alpha: alpha = rank (scale 1), as diffusers and ComfyUI read them",
            source,
            len(unset),
            len(modules),
        )
    return LoraState(weights, alphas), fmt


def _diffusers_config(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw is None:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"{source}: its {DIFFUSERS_METADATA_KEY} header is not JSON ({err})") from None
    if not isinstance(packed, dict):
        raise LoraFormatError(f"{source}: its {DIFFUSERS_METADATA_KEY} header is not a JSON object")
    config = {k[len("transformer.") :]: v for k, v in packed.items() if k.startswith("transformer.")}
    return config or None


def _alphas_from_config(
    config: Mapping[str, Any], modules: list[str], weights: Mapping[str, torch.Tensor], source: str
) -> dict[str, float]:
    """Per-module alpha from a LoraConfig-shaped dict, with peft's own pattern matching (``get_pattern_key``)
    and its rule that a rank the weights contradict is an error."""
    from peft.utils.other import get_pattern_key

    r = config.get("r", 8)
    alpha = config.get("lora_alpha", r)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LoraFormatError(f"{source}: r must be a positive integer, got {r!r}")
    for name, value in (("lora_alpha", alpha),):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise LoraFormatError(f"{source}: {name} must be a number, got {value!r}")
    for name, table in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(table, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in table.values()
        ):
            raise LoraFormatError(f"{source}: {name} must map module patterns to numbers, got {table!r}")
    out: dict[str, float] = {}
    for m in modules:
        want_r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), m), r)
        have_r = int(weights[f"{m}.{_A}"].shape[0])
        if int(want_r) != have_r:
            raise LoraFormatError(f"{source}: module {m} has rank {have_r} but its config says {want_r}")
        out[m] = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), m), alpha))
    return out


def _read_safetensors(path: Path, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as err:
        raise LoraFormatError(f"{source}: not a readable safetensors file ({err})") from None
    return state, metadata


@dataclasses.dataclass
class LoadedLora:
    """A LoRA (or a PEFT folder's LoKr/LoHa) read from ``path``.

    Attributes:
        path: the file or folder named by the user.
        format: ``diffusers``, ``comfyui``, ``kohya``, ``peft``, ``bare`` or ``lycoris``.
        files: the files read (hashed for provenance).
        lora: the adapter (LoRA of any format).
        peft_config: LoKr/LoHa only: the validated peft config (``lora`` is then None).
        peft_weights: LoKr/LoHa only: its peft state dict.
    """

    path: Path
    format: str
    files: list[Path]
    lora: LoraState | None = None
    peft_config: Any = None
    peft_weights: dict[str, torch.Tensor] | None = None


def _inside(folder: Path, name: str) -> Path:
    """``folder/name``, refused when it is a link that leaves ``folder`` (a handed folder may carry one)."""
    path = folder / name
    real = path.resolve()
    if not real.is_relative_to(folder.resolve()):
        raise LoraFormatError(f"{path}: links outside {folder} (to {real}); refusing to read it")
    return path


def read_lora(path: str | os.PathLike) -> LoadedLora:
    """Read a LoRA in any supported format.

    ``path`` is a ``.safetensors`` file (format from its keys), a PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) or a folder with diffusers' ``pytorch_lora_weights.safetensors``.

    Raises:
        LoraFormatError: anything else, naming the path and what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return _read_peft_folder(path)
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            path = _inside(path, DIFFUSERS_WEIGHT_NAME)
        else:
            raise LoraFormatError(
                f"{path}: a LoRA folder must hold {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT) or "
                f"{DIFFUSERS_WEIGHT_NAME} (diffusers); name a .safetensors file otherwise"
            )
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such LoRA file or folder")
    if path.suffix != ".safetensors":
        raise LoraFormatError(
            f"{path}: LoRA files are read as .safetensors only (a .ckpt/.pt/.bin file would have to be unpickled)"
        )
    state, metadata = _read_safetensors(path, str(path))
    lora, fmt = from_state_dict(state, str(path), metadata)
    return LoadedLora(path=path, format=fmt, files=[path], lora=lora)


# PEFT config keys rededit interprets, per adapter type; everything else must hold its neutral value.
_PEFT_USED = {
    "LORA": {
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "lora_dropout",
        "init_lora_weights",
    },
    "LOKR": {"r", "alpha", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout", "init_weights"}
    | {"use_effective_conv2d", "decompose_both", "decompose_factor", "rank_dropout_scale"},
    "LOHA": {"r", "alpha", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout", "init_weights"}
    | {"use_effective_conv2d"},
}
# Informational, or replaced by the module list of the weights themselves.
_PEFT_IGNORED = {
    "peft_type",
    "task_type",
    "peft_version",
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "runtime_config",
}
# LoRA initialisations that rewrite the base weights (the adapter then means something else on the original).
_BENIGN_INIT = (True, False, "gaussian")


def _neutral(value: Any, default: Any) -> bool:
    return value in (None, False, [], {}, "none") or value == default


def _peft_config(config: Any, source: str) -> Any:
    """A peft config built from a validated ``adapter_config.json`` dict (module docstring)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if not isinstance(config, dict):
        raise LoraFormatError(f"{source}: must be a JSON object")
    kind = config.get("peft_type")
    classes = {"LORA": LoraConfig, "LOKR": LoKrConfig, "LOHA": LoHaConfig}
    if kind not in classes:
        raise LoraFormatError(f"{source}: peft_type {kind!r} is not supported (LORA, LOKR or LOHA)")
    cls = classes[kind]
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    used = _PEFT_USED[kind]
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
        if key in _PEFT_IGNORED:
            continue
        if key in used:
            kwargs[key] = value
        elif key not in defaults:
            raise LoraFormatError(f"{source}: unknown setting {key!r} for a {kind} adapter")
        elif not _neutral(value, defaults[key]):
            raise LoraFormatError(
                f"{source}: {key}={value!r} is not supported (rededit loads plain {kind} adapters: it would "
                "change what the weights mean)"
            )
    init = kwargs.get("init_lora_weights", True)
    if init not in _BENIGN_INIT:
        raise LoraFormatError(
            f"{source}: init_lora_weights={init!r} rewrites the base weights at injection; convert the adapter "
            "to a plain LoRA first (peft's path_initial_model_for_weight_conversion)"
        )
    for key in ("r",):
        if key in kwargs and (
            not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool) or kwargs[key] <= 0
        ):
            raise LoraFormatError(f"{source}: r must be a positive integer, got {kwargs[key]!r}")
    for key in ("lora_alpha", "alpha", "lora_dropout", "rank_dropout", "module_dropout"):
        if key in kwargs and (not isinstance(kwargs[key], int | float) or isinstance(kwargs[key], bool)):
            raise LoraFormatError(f"{source}: {key} must be a number, got {kwargs[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        table = kwargs.get(key, {})
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in table.items()
        ):
            raise LoraFormatError(f"{source}: {key} must map module patterns to numbers")
    return kind, kwargs


def _read_peft_folder(folder: Path) -> LoadedLora:
    cfg_path = _inside(folder, PEFT_CONFIG)
    weights_path = _inside(folder, PEFT_WEIGHTS)
    if not weights_path.is_file():
        raise LoraFormatError(f"{folder}: a PEFT folder needs {PEFT_WEIGHTS} beside {PEFT_CONFIG}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraFormatError(f"{cfg_path}: not valid JSON ({err})") from None
    kind, kwargs = _peft_config(raw, str(cfg_path))
    state, _ = _read_safetensors(weights_path, str(weights_path))
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    if kind == "LORA":
        lora = lora_state(state, None, source=str(weights_path))  # alphas replaced just below
        lora.alphas = _alphas_from_config(kwargs, lora.modules, lora.weights, str(cfg_path))
        lora.use_rslora = bool(kwargs.get("use_rslora", False))
        return LoadedLora(path=folder, format="peft", files=[cfg_path, weights_path], lora=lora)
    from peft import LoHaConfig, LoKrConfig

    parts = "lokr_" if kind == "LOKR" else "hada_"
    modules = sorted({k.split("." + parts)[0] for k in state if "." + parts in k})
    bad = [k for k in state if "." + parts not in k]
    if bad or not modules:
        raise LoraFormatError(
            f"{weights_path}: {'unrecognised key ' + repr(bad[0]) if bad else 'no weights'} for a {kind} adapter"
        )
    cls = LoKrConfig if kind == "LOKR" else LoHaConfig
    config = cls(**kwargs, target_modules=modules)
    return LoadedLora(
        path=folder, format="peft", files=[cfg_path, weights_path], peft_config=config, peft_weights=state
    )


# --------------------------------------------------------------------------------------------------- writing
def _alpha_for_scale(scale: float, rank: int) -> float:
    """The float ``alpha`` whose ``alpha / rank`` (float64, as peft and ComfyUI divide) is closest to ``scale``:
    equal to it whenever a float alpha can give it (the rounded product and its neighbours are tried), else
    1 ulp of ``scale`` away (a rank that is no power of 2 does not reach every float quotient)."""
    best = alpha = scale * rank
    for _ in range(4):
        alpha = math.nextafter(alpha, -math.inf)
    for _ in range(9):
        if abs(alpha / rank - scale) < abs(best / rank - scale):
            best = alpha
        alpha = math.nextafter(alpha, math.inf)
    return best


def _alpha_tensor(alpha: float) -> torch.Tensor:
    """float32 when that holds ``alpha`` exactly (what kohya/ComfyUI files usually carry), else float64."""
    as32 = torch.tensor(alpha, dtype=torch.float32)
    return as32 if float(as32.item()) == alpha else torch.tensor(alpha, dtype=torch.float64)


def plain_alphas(lora: LoraState) -> dict[str, float]:
    """Per-module alpha for formats that know only ``alpha / r`` (eq. 1): an rslora adapter's alphas are
    rewritten so the scale stays exactly the same."""
    if not lora.use_rslora:
        return dict(lora.alphas)
    return {m: _alpha_for_scale(lora.scale(m), lora.rank(m)) for m in lora.modules}


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses non-contiguous and storage-sharing tensors
    return t.detach().to("cpu").contiguous().clone()


def lora_config_dict(lora: LoraState) -> dict[str, Any]:
    """LoraConfig arguments of ``lora``: the commonest rank/alpha, exact per-module exceptions
    (``rank_pattern``/``alpha_pattern`` keyed by the escaped module path, which peft's ``(.*\\.)?(key)$`` match
    reads as that module only) and the exact module list."""
    modules = lora.modules
    ranks = {m: lora.rank(m) for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(lora.alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in lora.alphas.items() if v != alpha},
        "target_modules": modules,
        "use_rslora": lora.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
    }


def lora_config(lora: LoraState) -> Any:
    """The ``peft.LoraConfig`` that reproduces ``lora``'s per-module rank and scale."""
    from peft import LoraConfig

    return LoraConfig(**lora_config_dict(lora))


def to_diffusers(lora: LoraState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and safetensors header of diffusers' format (``save_lora_weights`` with the adapter
    metadata): ``transformer.<module>.lora_A/B.weight``, the LoraConfig under ``lora_adapter_metadata``.

    No ``.alpha`` tensors: diffusers' Qwen loader would then fold ``alpha/r`` into the weights (rounding them)
    *and* apply the metadata's alpha again.
    """
    state = {f"transformer.{k}": _contiguous(v) for k, v in lora.weights.items()}
    config = {f"transformer.{k}": v for k, v in lora_config_dict(lora).items()}
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return state, header


def to_comfyui(lora: LoraState) -> dict[str, torch.Tensor]:
    """``diffusion_model.<module>.lora_A/B.weight`` + ``diffusion_model.<module>.alpha`` (ComfyUI applies
    ``strength · alpha / r · B A``, so strength 1.0 is the trained scale)."""
    alphas = plain_alphas(lora)
    state: dict[str, torch.Tensor] = {}
    for m in lora.modules:
        state[f"diffusion_model.{m}.lora_A.weight"] = _contiguous(lora.weights[f"{m}.{_A}"])
        state[f"diffusion_model.{m}.lora_B.weight"] = _contiguous(lora.weights[f"{m}.{_B}"])
        state[f"diffusion_model.{m}.alpha"] = _alpha_tensor(alphas[m])
    return state


def to_kohya(lora: LoraState) -> dict[str, torch.Tensor]:
    """kohya / musubi-tuner: ``lora_unet_<module with _>.lora_down.weight`` (A), ``.lora_up.weight`` (B),
    ``.alpha``."""
    alphas = plain_alphas(lora)
    state: dict[str, torch.Tensor] = {}
    for m in lora.modules:
        name = f"lora_unet_{flatten_module(m)}"
        unflatten_module(
            name[len("lora_unet_") :], "the adapter"
        )  # refuses a module kohya could not name back
        state[f"{name}.lora_down.weight"] = _contiguous(lora.weights[f"{m}.{_A}"])
        state[f"{name}.lora_up.weight"] = _contiguous(lora.weights[f"{m}.{_B}"])
        state[f"{name}.alpha"] = _alpha_tensor(alphas[m])
    return state


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    return path


def save_lora(lora: LoraState, path: str | os.PathLike, fmt: str) -> Path:
    """Write ``lora`` as ``fmt`` (:data:`FORMATS`): a ``.safetensors`` file, or for ``peft`` a folder
    (``adapter_config.json`` + ``adapter_model.safetensors`` with ``base_model.model.`` keys, as
    ``PeftModel.save_pretrained`` writes them). Written atomically, file by file."""
    path = Path(path)
    if fmt == "diffusers":
        state, header = to_diffusers(lora)
        return _save_safetensors(state, path, header)
    if fmt == "comfyui":
        return _save_safetensors(to_comfyui(lora), path, {"format": "pt"})
    if fmt == "kohya":
        return _save_safetensors(to_kohya(lora), path, {"format": "pt"})
    if fmt == "peft":
        import peft

        config = {"peft_type": "LORA", "task_type": None, "peft_version": peft.__version__}
        config.update(lora_config_dict(lora))
        config["base_model_name_or_path"] = None
        state = {f"base_model.model.{k}": _contiguous(v) for k, v in lora.weights.items()}
        _save_safetensors(state, path / PEFT_WEIGHTS, {"format": "pt"})
        atomic_write_text(path / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path
    raise ValueError(f"unknown LoRA format {fmt!r} (one of {', '.join(FORMATS)})")


def export_lora_files(
    peft_state: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float] | float,
    out_dir: str | os.PathLike,
    *,
    use_rslora: bool = False,
) -> dict[str, Path]:
    """Write one adapter as the diffusers, ComfyUI and kohya files of :data:`EXPORT_NAMES` into ``out_dir``.

    Args:
        peft_state: ``get_peft_model_state_dict(transformer, adapter_name=...)`` (LoRA; tensors are copied to CPU).
        alphas: ``{module: alpha}`` or one alpha for all modules (the LoraConfig's ``lora_alpha``).
        out_dir: the export folder (created; ``pipe.load_lora_weights(out_dir)`` finds the diffusers file).
        use_rslora: the LoraConfig's ``use_rslora``.

    Returns:
        ``{"diffusers": path, "comfyui": path, "kohya": path}``.
    """
    lora = lora_state(peft_state, alphas, use_rslora=use_rslora)
    out = Path(out_dir)
    return {fmt: save_lora(lora, out / name, fmt) for fmt, name in EXPORT_NAMES.items()}


# ----------------------------------------------------------------------------------------- onto a transformer
def check_targets(transformer: torch.nn.Module, loaded: LoadedLora) -> None:
    """Every module of a LoRA is a Linear layer of ``transformer`` with matching shapes (else an error naming
    the file, the module and the shapes)."""
    if loaded.lora is None:
        names = {n for n, _ in transformer.named_modules()}
        missing = [m for m in loaded.peft_config.target_modules if m not in names]
        if missing:
            raise LoraFormatError(f"{loaded.path}: the transformer has no module {sorted(missing)[0]}")
        return
    modules = dict(transformer.named_modules())
    for m in loaded.lora.modules:
        layer = modules.get(m)
        layer = getattr(layer, "base_layer", layer)  # already wrapped by another adapter
        if not isinstance(layer, torch.nn.Linear):
            what = "no such module" if layer is None else f"a {type(layer).__name__}, not a Linear layer"
            raise LoraFormatError(f"{loaded.path}: {m}: {what} in the transformer")
        a, b = loaded.lora.weights[f"{m}.{_A}"], loaded.lora.weights[f"{m}.{_B}"]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise LoraFormatError(
                f"{loaded.path}: {m} is Linear({layer.in_features} → {layer.out_features}) but the LoRA has "
                f"A {tuple(a.shape)}, B {tuple(b.shape)} (a LoRA of another model size?)"
            )


def add_adapter(transformer: Any, loaded: LoadedLora, adapter_name: str) -> None:
    """Inject ``loaded`` into a diffusers transformer as the peft adapter ``adapter_name`` and load its weights
    (diffusers' ``add_adapter`` + peft's ``set_peft_model_state_dict``). diffusers makes the new adapter the only
    active one; :func:`apply_loras` activates several with their strengths."""
    from peft import set_peft_model_state_dict

    check_targets(transformer, loaded)
    if loaded.lora is not None:
        config, state = lora_config(loaded.lora), loaded.lora.weights
    else:
        config, state = loaded.peft_config, loaded.peft_weights
    with warnings.catch_warnings():  # peft warns that a model holding an adapter gets another: intended here
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        transformer.add_adapter(config, adapter_name)
    try:
        result = set_peft_model_state_dict(transformer, state, adapter_name)
        missing = [
            k for k in result.missing_keys if f".{adapter_name}." in k or k.endswith(f".{adapter_name}")
        ]
        if result.unexpected_keys or missing:
            bad = (result.unexpected_keys or missing)[0]
            raise LoraFormatError(f"{loaded.path}: its weights do not fit the adapter peft built ({bad!r})")
    except BaseException:
        transformer.delete_adapters(adapter_name)
        raise


def active_adapters(transformer: Any) -> list[str]:
    """The peft adapters active in a diffusers model (none when it holds no adapter)."""
    if not getattr(transformer, "_hf_peft_config_loaded", False):
        return []
    return list(transformer.active_adapters())


def apply_loras(transformer: Any, loras: list[tuple[LoadedLora, float]], prefix: str = "lora") -> list[str]:
    """Add several adapters, each with its strength, to a diffusers transformer and activate them together.

    The output is ``W x + Σ_i strength_i · s_i · B_i A_i x`` (eqs. 1-2): diffusers' ``set_adapters`` sets each
    adapter's peft scaling to ``strength_i · s_i``. Adapters that were active before (e.g. an export's own)
    stay active at strength 1.0.

    Returns:
        the adapter names given, in order (``<prefix><i>``, numbered past names already in use).
    """
    before = active_adapters(transformer)
    taken = set(getattr(transformer, "peft_config", {}) or {})
    names: list[str] = []
    i = 0
    for loaded, _ in loras:
        while f"{prefix}{i}" in taken:
            i += 1
        name = f"{prefix}{i}"
        taken.add(name)
        add_adapter(transformer, loaded, name)
        names.append(name)
    transformer.set_adapters([*before, *names], [1.0] * len(before) + [float(s) for _, s in loras])
    return names
