"""Memory per GPU of a training config, estimated without loading a weight (``rededit-memory``, issue 20).

The stage's backbone is built as :meth:`BaseStage.configure_model` builds it (the ``backbone`` preset, the frozen
text tail, the adapter, the frozen base's dtype / quantisation, block swap), on the ``meta`` device: a 20B
transformer costs nothing. A ``backbone.pretrained_path`` folder contributes only its ``transformer/config.json``; a
preset whose folder is absent (``backbone=qwen_image`` without weights) uses its ``expected_config`` (the 20B
architecture). The bytes are counted by :mod:`rededit.models.memory_estimate` for one step of ``memory.batch_size``
samples of ``memory.image_tokens`` visual tokens (target + references, default ``data.token_budget``) and
``memory.text_tokens`` text tokens.

Precision: ``trainer.precision`` ``*-true`` casts the parameters (and so gradients and AdamW state); ``*-mixed``
keeps fp32 parameters and counts activations in the autocast dtype (the model's activations cast, an approximation
of autocast, which keeps norms and softmax statistics in fp32). FSDP2 / HSDP shard parameters, gradients and
optimizer state over ``strategy.parallelize.shard_size`` (or every device); DDP replicates them. Not counted: the
frozen VAE and text encoder (encoded in the data loader or elsewhere), DPO's / NFT's extra policies beyond the note
in :func:`estimate`, the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from rededit.models import adapters, frozen_base, memory_estimate
from rededit.models.backbone import folder_transformer_config


@dataclass
class Estimate:
    """Bytes per device of one training step; ``host``: weights kept on the CPU by block swap."""

    counts: memory_estimate.Counts
    world_size: int
    shard_size: int
    optimizer: str
    precision: str
    shapes: dict[str, Any]
    notes: list[str]

    def table(self) -> str:
        c = self.counts
        rows = [
            ("parameters", c.parameters),
            ("gradients", c.gradients),
            ("optimizer state", c.optimizer_state),
            ("activations", c.activations),
            ("total per GPU", c.total),
        ]
        if c.host:
            rows.append(("host (block swap)", c.host))
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {gib(v):>10.3f} GiB  {v:>16,d} B" for name, v in rows]
        head = (
            f"optimizer={self.optimizer} precision={self.precision} world_size={self.world_size} "
            f"shard_size={self.shard_size} step={self.shapes}"
        )
        return "\n".join([head, *lines, *(f"note: {n}" for n in self.notes)])


def gib(n: int) -> float:
    return n / 2**30


def _plain_node(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def transformer_config(backbone_node: Any) -> dict[str, Any]:
    """The transformer's config for a meta build: the preset's ``transformer_config``, else the folder's config
    file, else the preset's ``expected_config`` (a ``qwen_image`` preset without its weights)."""
    node = _plain_node(backbone_node)
    if node.get("transformer_config"):
        return dict(node["transformer_config"])
    path = node.get("pretrained_path")
    if path not in (None, "???") and Path(str(path)).is_dir():
        config, _ = folder_transformer_config(path, node.get("subfolder"))
        return {k: v for k, v in config.items() if k not in ("self",)}
    if node.get("expected_config"):
        return {k: v for k, v in node["expected_config"].items() if k != "patch_size"}
    raise ValueError(
        "rededit-memory needs the transformer's shape: backbone.transformer_config, a backbone.pretrained_path "
        "folder, or a preset with expected_config"
    )


def build_meta_backbone(cfg: DictConfig) -> torch.nn.Module:
    """The stage's backbone on ``meta``: preset, frozen text tail, adapter, reduced frozen base (as configure_model)."""
    from hydra.utils import instantiate

    node = _plain_node(cfg.backbone)
    tc = transformer_config(node)
    node.update(transformer_config=tc, pretrained_path=None, expected_config=None)
    patch = int(node.get("patch_size", 2))
    channels = int(tc["in_channels"]) // patch**2 if tc.get("in_channels") else None
    with torch.device("meta"):
        backbone = instantiate(node)(latent_channels=channels)
        backbone.rebuild_rope()
        backbone.freeze_unused_text_tail()
        adapter = adapters.plain(cfg.get("adapter"))
        if adapters.is_enabled(adapter):
            adapters.apply_adapter(backbone, {**adapter, "init_from": None})
            dtype, scheme = frozen_base.options(adapter)
            if dtype is not None or scheme is not None:
                frozen_base.reduce_frozen_base(backbone, dtype=dtype, quantize=scheme)
    return backbone


def optimizer_kind(cfg: DictConfig) -> str:
    target = str(OmegaConf.select(cfg, "optimizer._target_", default=""))
    return "adamw8bit" if target.endswith("AdamW8bit") else "adamw"


def shard_world(cfg: DictConfig) -> tuple[int, int]:
    """(devices in the run, ranks a tensor is sharded over): FSDP2/HSDP shard, everything else replicates."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)
    devices = int(devices) if isinstance(devices, int) and devices > 0 else 1
    world = devices * nodes
    override = OmegaConf.select(cfg, "memory.world_size", default=None)
    if override:
        world = int(override)
    name = str(OmegaConf.select(cfg, "strategy.name", default="auto"))
    if name not in ("fsdp2", "hsdp"):
        return world, 1
    shard = OmegaConf.select(cfg, "strategy.parallelize.shard_size", default=None)
    return world, int(shard) if shard else world


def step_inputs(
    cfg: DictConfig, backbone: torch.nn.Module, dtype: torch.dtype
) -> tuple[tuple, dict[str, Any]]:
    """Meta tensors of one step: ``memory.batch_size`` samples, target + ``memory.references`` equal-size
    references sharing ``memory.image_tokens`` visual tokens, ``memory.text_tokens`` text tokens."""
    b = int(OmegaConf.select(cfg, "memory.batch_size", default=1) or 1)
    refs = int(OmegaConf.select(cfg, "memory.references", default=1))
    tokens = OmegaConf.select(cfg, "memory.image_tokens", default=None) or OmegaConf.select(
        cfg, "data.token_budget", default=4096
    )
    text = OmegaConf.select(cfg, "memory.text_tokens", default=None) or OmegaConf.select(
        cfg, "text_encoder.max_length", default=256
    )
    per_image = max(1, int(tokens) // (b * (1 + refs)))
    side = max(1, math.isqrt(per_image))  # square images of side² patch tokens
    p = backbone.patch_size
    c = backbone.latent_channels
    dim = int(backbone.transformer.config.joint_attention_dim)
    kw = {"device": "meta", "dtype": dtype}
    hw = (side * p, side * p)
    inputs = (
        torch.empty(b, c, *hw, **kw),
        [torch.empty(b, c, *hw, **kw) for _ in range(refs)],
        torch.empty(b, device="meta"),
        torch.empty(b, int(text), dim, **kw),
        torch.ones(b, int(text), dtype=torch.bool, device="meta"),
    )
    shapes = {
        "batch": b,
        "references": refs,
        "image_tokens": b * (1 + refs) * side * side,
        "text_tokens": int(text),
    }
    return inputs, shapes


def estimate(cfg: DictConfig) -> Estimate:
    """Bytes per device of one training step of ``cfg`` (a composed ``conf/train.yaml``)."""
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    half = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
    backbone = build_meta_backbone(cfg)
    notes = []
    if half is not None and precision.endswith("-true"):
        backbone.to(half)  # Lightning's *-true precision casts the module (trainable tensors included)
    world, shard = shard_world(cfg)
    optimizer = optimizer_kind(cfg)
    block_size = int(OmegaConf.select(cfg, "optimizer.block_size", default=256) or 256)
    params, host = memory_estimate.parameter_bytes(backbone, shard)
    counts = memory_estimate.Counts(
        parameters=params,
        gradients=memory_estimate.gradient_bytes(backbone, shard),
        optimizer_state=memory_estimate.optimizer_bytes(backbone, optimizer, shard, block_size),
        host=host,
    )
    act_dtype = (
        half if half is not None else next(p.dtype for p in backbone.parameters() if p.is_floating_point())
    )
    probe = backbone
    if half is not None and precision.endswith("-mixed"):
        import copy

        probe = copy.deepcopy(backbone).to(half)  # meta: free
        notes.append(f"{precision}: activations counted in {half} (autocast keeps some in fp32)")
    inputs, shapes = step_inputs(cfg, probe, act_dtype)
    checkpointing = bool(getattr(backbone.transformer, "gradient_checkpointing", False))
    counts.activations, counts.details = memory_estimate.activation_bytes(
        probe.train(), inputs, checkpointing=checkpointing
    )
    counts.details["gradient_checkpointing"] = checkpointing
    stage = str(OmegaConf.select(cfg, "stage._target_", default=""))
    if stage.endswith("DPOModule") and not adapters.is_enabled(cfg.get("adapter")):
        counts.parameters += params  # the frozen reference: a second backbone (an adapter run has none)
        notes.append("DPO: + one frozen reference backbone")
    elif stage.endswith("NFTModule"):
        notes.append("NFT: the old policy / KL reference copies are not counted")
    return Estimate(counts, world, shard, optimizer, precision, shapes, notes)


def with_memory_defaults(cfg: DictConfig) -> DictConfig:
    """``cfg`` with a ``memory`` node (batch_size, references, image_tokens, text_tokens, world_size)."""
    with open_dict(cfg):
        node = cfg.get("memory") or {}
        cfg.memory = {
            "batch_size": 1,
            "references": 1,
            "image_tokens": None,
            "text_tokens": None,
            "world_size": None,
            **_plain_node(node),
        }
    return cfg
