"""Parameter-efficient adapters (LoRA, LoKr, LoHa) on the backbone's transformer (issue 20).

The adapter is a PEFT tuner injected through diffusers' PEFT integration of ``QwenImageTransformer2DModel``
(``transformer.add_adapter(config, adapter_name)``), so the diffusers transformer stays the backbone and its
``save_lora_weights`` / ``load_lora_weights`` keys stay the ecosystem's. For a target ``Linear`` ``W``::

    LoRA  (Hu et al. 2021):      y = W x + (α / r) · B A x                 A [r, in], B [out, r]  (B = 0 at init)
    LoKr  (LyCORIS):              y = W x + (α / r) · (W₁ ⊗ W₂) x           W₂ = W₂ₐ W₂ᵦ of rank r when decomposed
    LoHa  (Hyeon-Woo et al. 2022): y = W x + (α / r) · (W₁ₐW₁ᵦ ⊙ W₂ₐW₂ᵦ) x

Only the adapter trains inside ``transformer`` (peft freezes the rest of it); FireEdit modules
(``region_tokens``, ``tati``, ``hvca``) live outside ``transformer`` and keep training when they are on. The
output heads and extra input of the base (``edit_gate``, ``pixel_head``, ``source_in``) are frozen with it: they decode every output, and a LoRA
file cannot carry them, so training them would make ``rededit-edit --lora`` on the base differ from the run.

Default targets: the ones the Qwen-Image LoRA ecosystem (DiffSynth-Studio, musubi-tuner, ai-toolkit) trains, the
joint attention's image/text projections and both MLPs; ``modulation=true`` adds the adaLN ``img_mod.1`` /
``txt_mod.1``. Targets in the last block's unused text tail (:meth:`EditBackbone.unused_text_tail_names`: frozen,
their outputs never reach the loss) get no adapter: an adapter there would be an unused DDP parameter.

The ``adapter`` config node (``conf/adapter/*.yaml``): ``type`` (none | lora | lokr | loha), ``rank``, ``alpha``,
``dropout`` (LoRA's ``lora_dropout``; LoKr/LoHa's ``rank_dropout``), ``init`` (peft's ``init_lora_weights`` /
``init_weights``), ``target_modules``, ``modulation``, ``options`` (any other field of the peft config class) and
``init_from`` (a PEFT folder to start from).

PEFT folder (:func:`save_peft_folder`, :func:`load_peft_folder`): ``adapter_config.json`` +
``adapter_model.safetensors`` with the keys ``PeftModel.save_pretrained`` writes (``base_model.model.<module>
.lora_A.weight``), so ``PeftModel.from_pretrained(transformer, folder)`` loads it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rededit.models.lora_formats import LORA_PARTS, read_lora
from rededit.utils.io import atomic_path, atomic_write_text

ADAPTER_TYPES = ("none", "lora", "lokr", "loha")
#: The trained adapter's name inside the peft layers (peft's own default).
ADAPTER_NAME = "default"
DEFAULT_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
MODULATION_TARGETS = ("img_mod.1", "txt_mod.1")
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: Key prefix of ``PeftModel.save_pretrained``'s weights file (the tuner wraps the model as base_model.model).
PEFT_KEY_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A bad adapter config or adapter file (the message names the file or key and what is wrong)."""


def plain(value: Any) -> Any:
    """OmegaConf containers → plain Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return value


def adapter_type(node: Mapping[str, Any] | None) -> str:
    """``node.type`` checked against :data:`ADAPTER_TYPES` (a missing node is ``none``)."""
    kind = "none" if node is None else str(plain(node).get("type", "none") or "none")
    if kind not in ADAPTER_TYPES:
        raise AdapterError(f"adapter.type must be one of {ADAPTER_TYPES}, got {kind!r}")
    return kind


def is_enabled(node: Mapping[str, Any] | None) -> bool:
    return adapter_type(node) != "none"


def target_modules(node: Mapping[str, Any]) -> list[str]:
    """The node's target list (default :data:`DEFAULT_TARGETS`), plus the modulation Linears when asked."""
    node = plain(node)
    targets = list(node.get("target_modules") or DEFAULT_TARGETS)
    if node.get("modulation", False):
        targets += [t for t in MODULATION_TARGETS if t not in targets]
    return targets


def frozen_tail_modules(backbone: nn.Module) -> list[str]:
    """Module names (relative to ``backbone.transformer``) of the frozen text tail: no adapter goes there."""
    return sorted({n.rsplit(".", 1)[0] for n in backbone.unused_text_tail_names()})


def build_peft_config(node: Mapping[str, Any], exclude: list[str] | tuple[str, ...] = ()) -> Any:
    """The peft config (``LoraConfig`` / ``LoKrConfig`` / ``LoHaConfig``) of an ``adapter`` node.

    Args:
        node: the Hydra ``adapter`` node (see the module docstring).
        exclude: module names that get no adapter (the frozen text tail).
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    node = dict(plain(node))
    kind = adapter_type(node)
    if kind == "none":
        raise AdapterError("adapter.type=none has no peft config")
    rank = int(node.get("rank", 16))
    if rank < 1:
        raise AdapterError(f"adapter.rank must be >= 1, got {rank}")
    alpha = float(node.get("alpha", rank))
    dropout = float(node.get("dropout", 0.0) or 0.0)
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"adapter.dropout must be in [0, 1), got {dropout}")
    common: dict[str, Any] = {"r": rank, "target_modules": target_modules(node)}
    if exclude:
        common["exclude_modules"] = list(exclude)
    init = node.get("init", True)
    options = dict(node.get("options") or {})
    if kind == "lora":
        kwargs = {**common, "lora_alpha": alpha, "lora_dropout": dropout, "init_lora_weights": init}
        cls = LoraConfig
    else:
        kwargs = {**common, "alpha": alpha, "rank_dropout": dropout, "init_weights": init}
        cls = LoKrConfig if kind == "lokr" else LoHaConfig
    clash = sorted(set(options) & set(kwargs))
    if clash:
        raise AdapterError(f"adapter.options repeats {clash}: set them through the adapter node's own keys")
    try:
        return cls(**kwargs, **options)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"adapter={kind}: {cls.__name__} refused the node: {err}") from err


def config_to_json(config: Any) -> str:
    """A peft config as JSON (sets → sorted lists; the checkpoint and ``adapter_config.json`` hold this)."""

    def default(value: Any) -> Any:
        if isinstance(value, set | frozenset):
            return sorted(value)
        if hasattr(value, "value"):  # enums (PeftType)
            return value.value
        raise TypeError(f"not JSON-able: {type(value).__name__}")

    return json.dumps(config.to_dict(), default=default, indent=2, sort_keys=True)


def config_from_json(text: str, source: str | Path) -> Any:
    """A peft config from :func:`config_to_json`'s text (``source`` names the file in errors)."""
    from peft import PeftConfig

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{source}: not a JSON adapter config: {err}") from err
    if not isinstance(data, dict) or data.get("peft_type") not in ("LORA", "LOKR", "LOHA"):
        got = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise AdapterError(f"{source}: peft_type must be LORA, LOKR or LOHA, got {got!r}")
    try:
        return PeftConfig.from_peft_type(**data)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{source}: peft refused the adapter config: {err}") from err


# --------------------------------------------------------------------------------------------- apply / state
def apply_adapter(backbone: nn.Module, node: Mapping[str, Any], *, name: str = ADAPTER_NAME) -> Any:
    """Inject the node's adapter into ``backbone.transformer`` and freeze the base (call after loading the base).

    peft marks only the adapter trainable inside ``transformer``; FireEdit modules outside it keep their
    ``requires_grad``; the base's output heads and extra input (``edit_gate``, ``pixel_head``, ``source_in``) are frozen. ``node.init_from``
    (a PEFT folder or a LoRA file, :func:`initial_adapter_state`) fills the new adapter's weights.

    Returns:
        the peft config.
    """
    config = build_peft_config(node, frozen_tail_modules(backbone))
    backbone.transformer.add_adapter(config, adapter_name=name)
    for part in ("edit_gate", "pixel_head", "source_in"):
        module = getattr(backbone, part, None)
        if module is not None:
            module.requires_grad_(False)  # part of the base (module doc)
    source = plain(node).get("init_from")
    if source:
        load_adapter_state(backbone, initial_adapter_state(source, config, node), name=name, source=source)
    return config


def initial_adapter_state(
    source: str | Path, config: Any, node: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The weights ``adapter.init_from`` names, with :func:`adapter_state_dict`'s keys: a PEFT folder of the
    run's adapter type, or a LoRA file in any format :func:`rededit.models.lora_formats.read_lora` reads
    (diffusers, ComfyUI, kohya/musubi). A LoRA file's ranks must be the run's ``adapter.rank``; its ``lora_B`` is
    rescaled by (file's alpha/r) / (run's alpha/r), so training starts from exactly the edit the file makes."""
    path = Path(source)
    if path.is_dir() and (path / PEFT_CONFIG_FILE).is_file():
        folder_config, state = load_peft_folder(path)
        if folder_config.peft_type != config.peft_type:
            raise AdapterError(
                f"adapter.init_from={source} holds a {folder_config.peft_type.value} adapter, the run trains "
                f"adapter={adapter_type(node)}"
            )
        return state
    loaded = read_lora(path)
    if loaded.lora is None or config.peft_type.value != "LORA":
        raise AdapterError(
            f"adapter.init_from={source}: a {loaded.format} file starts only an adapter=lora run (this run trains "
            f"adapter={adapter_type(node)}); LoKr/LoHa start from a PEFT folder"
        )
    lora, state = loaded.lora, {}
    for module in lora.modules:
        rank = lora.rank(module)
        if rank != config.r:
            raise AdapterError(
                f"adapter.init_from={source}: {module} has rank {rank}, the run's adapter.rank is {config.r}"
            )
        run_scale = config.lora_alpha / (rank**0.5 if config.use_rslora else rank)
        a, b = (f"{module}.{part}" for part in LORA_PARTS)
        state[a] = lora.weights[a]
        state[b] = lora.weights[b] * (lora.scale(module) / run_scale)
    return state


def has_adapter(backbone: nn.Module, name: str = ADAPTER_NAME) -> bool:
    return name in (getattr(backbone.transformer, "peft_config", None) or {})


def peft_config_of(backbone: nn.Module, name: str = ADAPTER_NAME) -> Any:
    return backbone.transformer.peft_config[name]


def tuner_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return ((n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer))


def adapter_state_dict(
    backbone: nn.Module, name: str = ADAPTER_NAME, *, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's name-free keys relative to ``transformer``
    (``transformer_blocks.0.attn.to_q.lora_A.weight``), detached on the CPU.

    Args:
        state: a full backbone state dict to take them from (e.g. :meth:`EMAWeights.ema_state_dict`'s) instead
            of the live weights.
    """
    from peft.utils import get_peft_model_state_dict

    if state is not None:
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
        # peft keeps a handed state's tensors of other adapters (NFT's ``nft_old``, also in a state gathered from
        # a run whose rebuilt backbone has only this adapter): keep this adapter's and the non-adapter tensors
        attrs = _adapter_attrs(layer for _, layer in tuner_layers(backbone.transformer))
        state = {k: v for k, v in state.items() if _adapter_of_key(k, attrs) in (None, name)}
    state = get_peft_model_state_dict(backbone.transformer, state_dict=state, adapter_name=name)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_adapter_state(
    backbone: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    name: str = ADAPTER_NAME,
    source: str | Path = "adapter state",
) -> None:
    """Load :func:`adapter_state_dict`-style weights into adapter ``name``; every adapter tensor must be there."""
    from peft.utils import set_peft_model_state_dict

    want = set(adapter_state_dict(backbone, name))
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise AdapterError(
            f"{source}: adapter weights do not fit this backbone's adapter: missing {missing[:3]} "
            f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)}); same type, rank and targets?"
        )
    own = adapter_state_dict(backbone, name)
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise AdapterError(
                f"{source}: {key} has shape {tuple(value.shape)}, the adapter {tuple(own[key].shape)}"
            )
    set_peft_model_state_dict(backbone.transformer, dict(state), adapter_name=name)


def adapter_parameter_names(backbone: nn.Module, name: str = ADAPTER_NAME) -> list[str]:
    """Names (relative to ``backbone``) of adapter ``name``'s parameters."""
    heads = set()
    for prefix, layer in tuner_layers(backbone):
        for attr in (*layer.adapter_layer_names, *layer.other_param_names):
            holder = getattr(layer, attr, None)
            if isinstance(holder, nn.ModuleDict | nn.ParameterDict) and name in holder:
                heads.add(f"{prefix}.{attr}.{name}")
    # ModuleDict entries: <head>.weight; ParameterDict entries (LoKr / LoHa): <head> itself
    return sorted(n for n, _ in backbone.named_parameters() if n in heads or n.rsplit(".", 1)[0] in heads)


def base_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state without adapters, in the plain backbone's keys (``….to_q.base_layer.weight`` →
    ``….to_q.weight``): what :class:`EditBackbone` has before :func:`apply_adapter` (not merged)."""
    layers = dict(tuner_layers(backbone))
    attrs = _adapter_attrs(layers.values())
    out: dict[str, torch.Tensor] = {}
    for key, value in backbone.state_dict().items():
        if any(key.startswith(p + ".") and key[len(p) + 1 :].split(".")[0] in attrs for p in layers):
            continue  # an adapter tensor
        while ".base_layer." in key:  # nested tuners wrap base_layer again
            key = key.replace(".base_layer.", ".", 1)
        out[key] = value
    return out


def _adapter_attrs(layers: Any) -> set[str]:
    return {a for layer in layers for a in (*layer.adapter_layer_names, *layer.other_param_names)}


def _adapter_of_key(key: str, attrs: set[str]) -> str | None:
    """The adapter name of an adapter tensor's key (``….lora_A.<name>.weight``, ``….lokr_w1.<name>``), else None."""
    parts = key.split(".")
    return next((parts[i + 1] for i, part in enumerate(parts[:-1]) if part in attrs), None)


# --------------------------------------------------------------------------------------------- switches
@contextlib.contextmanager
def _kept_requires_grad(module: nn.Module) -> Iterator[None]:
    """peft's enable/disable/set_adapter also set requires_grad: put every flag back afterwards (the optimizer,
    DDP and the EMA rely on them)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def adapters_disabled(backbone: nn.Module) -> Iterator[None]:
    """Run the block with the base model only (diffusers' ``disable_adapters``): the DPO reference."""
    transformer = backbone.transformer
    with _kept_requires_grad(backbone):
        transformer.disable_adapters()
        try:
            yield
        finally:
            transformer.enable_adapters()


@contextlib.contextmanager
def active_adapter(backbone: nn.Module, name: str) -> Iterator[None]:
    """Run the block with adapter ``name`` instead of the trained one (the NFT old policy)."""
    transformer = backbone.transformer
    previous = transformer.active_adapters()
    with _kept_requires_grad(backbone):
        transformer.set_adapter(name)
        try:
            yield
        finally:
            transformer.set_adapter(previous)


@contextlib.contextmanager
def swapped_weights(backbone: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Copy ``weights`` (backbone parameter names) into the backbone for the block, then restore the originals
    (the FireEdit parameters of a DPO reference / NFT old policy, which no adapter switch covers)."""
    if not weights:
        yield
        return
    params = dict(backbone.named_parameters())
    with torch.no_grad():
        saved = {n: params[n].detach().clone() for n in weights}
        for n, value in weights.items():
            params[n].copy_(value.to(params[n].dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


def add_copy_of_adapter(backbone: nn.Module, new_name: str, *, source: str = ADAPTER_NAME) -> None:
    """A second, frozen adapter ``new_name`` with ``source``'s config and weights (fp32, like peft's own
    adapter weights); ``source`` stays the active, trained one."""
    import copy

    transformer = backbone.transformer
    config = copy.deepcopy(transformer.peft_config[source])
    with _kept_requires_grad(backbone):
        transformer.add_adapter(config, adapter_name=new_name)
        transformer.set_adapter(source)
    src = dict(backbone.named_parameters())
    token_src, token_new = f".{source}.", f".{new_name}."
    with torch.no_grad():
        for n in adapter_parameter_names(backbone, new_name):
            p = src[n]
            p.requires_grad_(False)
            p.copy_(src[n.replace(token_new, token_src)])


# --------------------------------------------------------------------------------------------- merge
@torch.no_grad()
def merge_adapter(backbone: nn.Module, name: str = ADAPTER_NAME) -> nn.Module:
    """Fold adapter ``name`` into the base weights (peft's ``merge``) and remove every adapter layer, in place:
    the backbone becomes a plain :class:`EditBackbone` whose outputs equal the adapted model's."""
    transformer = backbone.transformer
    for _, layer in list(tuner_layers(transformer)):
        layer.merge(adapter_names=[name])
    for module_name, layer in list(tuner_layers(transformer)):
        parent_name, _, child = module_name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, layer.get_base_layer())
    # diffusers keeps the adapter bookkeeping on the model; a plain transformer has none
    for attr in ("peft_config",):
        if hasattr(transformer, attr):
            delattr(transformer, attr)
    transformer._hf_peft_config_loaded = False
    return backbone


# --------------------------------------------------------------------------------------------- PEFT folder
def save_peft_folder(
    backbone: nn.Module,
    folder: str | Path,
    *,
    name: str = ADAPTER_NAME,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``folder/adapter_config.json`` and ``folder/adapter_model.safetensors`` (``PeftModel.save_pretrained``'s
    layout and keys). ``state``: adapter weights to write instead of the live ones (e.g. the EMA's)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(backbone, name) if state is None else state
    tensors = {PEFT_KEY_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(folder / PEFT_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / PEFT_CONFIG_FILE, config_to_json(peft_config_of(backbone, name)) + "\n")
    return folder


def load_peft_folder(folder: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(peft config, adapter weights with :func:`adapter_state_dict`'s keys) of a PEFT folder; safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise AdapterError(
                f"{needed}: missing; a PEFT adapter folder holds {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE}"
            )
    config = config_from_json(config_file.read_text(encoding="utf-8"), config_file)
    try:
        raw = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights_file}: not a readable safetensors file: {err}") from err
    return config, {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in raw.items()}


def count_parameters(module: nn.Module, name_filter: Any = None) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if name_filter is None or name_filter(n))


# --------------------------------------------------------------------------------------------- checkpoints
#: Where a training checkpoint records its adapter (type, node, peft config JSON, base fingerprint).
CHECKPOINT_KEY = "adapter"
#: peft config fields that say nothing about the adapter's shape or math.
_VOLATILE = {
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "task_type",
    "auto_mapping",
}


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


@torch.no_grad()
def weights_fingerprint(backbone: nn.Module) -> float:
    """A cheap float summary of the base weights (sum of per-tensor means of |θ| over :func:`base_state_dict`),
    so a resumed adapter run, whose checkpoint holds no base, finds out when it rebuilt another base.
    Sharded (DTensor) tensors reduce across ranks: call it on every rank."""
    total = 0.0
    for value in base_state_dict(backbone).values():
        if not torch.is_floating_point(value):
            continue
        # (not a DTensor: an FSDP2 shard is a tensor subclass too, and has no sharding rule for dequantize)
        if hasattr(value, "dequantize") and hasattr(value, "__tensor_flatten__") and not is_dtensor(value):
            value = value.dequantize()  # a torchao-quantised frozen base (models/frozen_base.py) has no abs()
        m = value.detach().float().abs().mean()
        total += float(m.full_tensor() if hasattr(m, "full_tensor") else m)
    return total


def _config_dict(text: str) -> dict[str, Any]:
    return {k: v for k, v in json.loads(text).items() if k not in _VOLATILE}


def check_checkpoint(
    checkpoint: Mapping[str, Any],
    node: Mapping[str, Any] | None,
    backbone: nn.Module,
    base_fingerprint: float | None,
) -> None:
    """Refuse to resume a checkpoint into a stage whose adapter (or base) differs from the one it was trained with.

    Raises:
        AdapterError: full fine-tune vs adapter, another adapter config, another base, or adapter tensors missing.
    """
    record = checkpoint.get(CHECKPOINT_KEY)
    if record is None and node is None:
        return
    if record is None:
        raise AdapterError(
            f"this checkpoint is a full fine-tune's and the run has adapter={adapter_type(node)}: resume it with "
            "adapter=none, or start an adapter run from it with stage.init_from=<that run> (no ckpt_path)"
        )
    if node is None:
        raise AdapterError(
            f"this checkpoint holds only the weights of an adapter={record['type']} run: resume it with the same "
            f"adapter= options (its node: {record.get('node')})"
        )
    saved, current = (
        _config_dict(record["peft_config"]),
        _config_dict(config_to_json(peft_config_of(backbone))),
    )
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        key = diff[0]
        raise AdapterError(
            f"the checkpoint's adapter differs from this run's in {diff}: {key}={saved.get(key)!r} there, "
            f"{current.get(key)!r} here; resume with the checkpoint's adapter options"
        )
    want = record.get("base_fingerprint")
    if (
        want is not None
        and base_fingerprint is not None
        and abs(want - base_fingerprint) > 1e-6 * max(1.0, abs(want))
    ):
        raise AdapterError(
            f"the base rebuilt for this adapter run (fingerprint {base_fingerprint:.8g}) is not the one the checkpoint "
            f"was trained on ({want:.8g}): resume with the same stage.init_from / backbone.pretrained_path"
        )
    state = checkpoint.get("state_dict") or {}
    if state and not any(is_dtensor(v) for v in state.values()):
        trainable = [f"backbone.{n}" for n, p in backbone.named_parameters() if p.requires_grad]
        missing = [k for k in trainable if k not in state]
        if missing:
            raise AdapterError(
                f"the checkpoint lacks {len(missing)} trainable adapter tensors, e.g. {missing[:3]}"
            )


# --------------------------------------------------------------------------------------------- policy views
class AdapterView(nn.Module):
    """Another policy on the *same* backbone: adapter ``adapter`` active instead of the trained one (None: all
    adapters off, the base model), ``weights`` (trainable tensors outside the adapter, i.e. FireEdit modules)
    swapped in, eval mode. No second backbone: the DPO reference (adapter off, initial FireEdit weights) and the
    NFT old policy (the ``nft_old`` adapter, the old FireEdit weights) of an adapter run.

    Attributes other than ``forward`` come from the backbone (``using_regions``, ``exact_velocity``, ...), so
    samplers take the view where they take an :class:`EditBackbone`. Call it under ``torch.no_grad``.
    """

    def __init__(self, backbone: nn.Module, adapter: str | None, weights: Mapping[str, torch.Tensor]):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.weights = dict(weights)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("backbone"), name)

    def to(self, *args: Any, **kwargs: Any) -> AdapterView:
        """Moves the swapped-in tensors only: the backbone is the trained policy's, placed by the trainer."""
        self.weights = {n: w.to(*args, **kwargs) for n, w in self.weights.items()}
        return self

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        backbone = self.backbone
        modes = [(m, m.training) for m in backbone.modules()]
        switch = (
            adapters_disabled(backbone) if self.adapter is None else active_adapter(backbone, self.adapter)
        )
        backbone.eval()
        try:
            with switch, swapped_weights(backbone, self.weights):
                return backbone(*args, **kwargs)
        finally:
            for m, mode in modes:
                m.training = mode


def non_adapter_trainables(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the backbone's trainable tensors that are no adapter weight (FireEdit modules)."""
    skip = set(adapter_parameter_names(backbone))
    return {
        n: p.detach().float().clone()
        for n, p in backbone.named_parameters()
        if p.requires_grad and n not in skip
    }


def renamed_adapter_parameter(name: str, source: str, target: str) -> str:
    """``….lora_A.<source>.weight`` → ``….lora_A.<target>.weight`` (``….lokr_w1.<source>`` likewise)."""
    if f".{source}." in name:
        return name.replace(f".{source}.", f".{target}.", 1)
    if name.endswith(f".{source}"):
        return name[: -len(source)] + target
    raise KeyError(f"{name} is not a parameter of adapter {source!r}")


@contextlib.contextmanager
def unwrapped(transformer: nn.Module) -> Iterator[nn.Module]:
    """The transformer with its base layers in place of the peft layers for the block (no copy, no merge): what
    ``save_pretrained`` must see to write a plain diffusers folder of the base. The peft layers come back after."""
    swaps = []
    for module_name, layer in list(tuner_layers(transformer)):
        parent_name, _, child = module_name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        swaps.append((parent, child, layer))
    for parent, child, layer in swaps:
        setattr(parent, child, layer.get_base_layer())
    try:
        yield transformer
    finally:
        for parent, child, layer in swaps:
            setattr(parent, child, layer)


@torch.no_grad()
def merged_state(backbone: nn.Module, name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The plain-key backbone state with adapter ``name`` merged, as new tensors: ``W + ΔW`` per adapted Linear
    (peft's ``get_delta_weight``, what its ``merge`` adds), the backbone untouched. DoRA / LoRA biases merge
    otherwise: for those, peft's ``merge`` then ``unmerge`` (which round the base weights in the last bit)."""
    config = peft_config_of(backbone, name)
    layers = list(tuner_layers(backbone.transformer))
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        for _, layer in layers:
            layer.merge(adapter_names=[name])
        try:
            return {k: v.detach().clone() for k, v in base_state_dict(backbone).items()}
        finally:
            for _, layer in layers:
                layer.unmerge()
    state = {k: v.detach().clone() for k, v in base_state_dict(backbone).items()}
    for prefix, layer in layers:
        key = f"transformer.{prefix}.weight"
        state[key] = state[key] + layer.get_delta_weight(name).to(state[key].dtype)
    return state
