"""Bytes per GPU of a training step, counted on a backbone built on the ``meta`` device (no weights loaded).

What :func:`rededit.stages.memory.estimate` (``rededit-memory``) adds up for one device:

* **parameters**: every tensor's bytes (:func:`~rededit.models.frozen_base.tensor_nbytes`: a quantised weight counts
  its codes, scales and zero points), the frozen weights of block-swapped blocks on the host instead (at most two
  streamed blocks are on the device at a time), sharded tensors as FSDP2 shards them (``ceil(dim0 / W)`` rows);
* **gradients**: one tensor of the parameter's dtype per trainable parameter (the adapter under an adapter);
* **optimizer state**: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype plus a 4-byte step per
  tensor; 8-bit AdamW :func:`rededit.utils.adamw8bit.state_bytes`;
* **activations**: the unique storages autograd saves for the backward in one forward of the backbone on ``meta``
  tensors of the step's shapes (``saved_tensors_hooks``), parameters excluded. Attention is counted as the fused
  kernels the GPU and the CPU run save it (q, k, v, the output and one log-sum-exp per query row), not as the math
  fallback ``meta`` tensors would dispatch to (that one keeps the ``[B, H, N, N]`` probabilities). With gradient
  checkpointing (one checkpoint per block, non-reentrant): what is saved outside the blocks, plus every block's
  inputs (what a checkpoint keeps), plus the largest block's saved tensors (its recompute in the backward).

The first three are exact (tested against the real tensors of the tiny configs); the activation count is a lower
bound of the measured peak (temporaries of the backward are not saved tensors): see docs/adapters.md for the factor
measured on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from rededit.models.frozen_base import tensor_nbytes
from rededit.utils.adamw8bit import state_bytes as adamw8bit_state_bytes

OPTIMIZERS = ("adamw", "adamw8bit")


def shard_numel(shape: Iterable[int], world: int) -> int:
    """Values of one FSDP2 shard of a tensor of ``shape`` over ``world`` ranks (dim 0 split, padded)."""
    shape = list(shape)
    if world <= 1 or not shape:
        return math.prod(shape)
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def _sharded_bytes(t: torch.Tensor, world: int) -> int:
    full = tensor_nbytes(t)
    if world <= 1 or t.numel() == 0:
        return full
    return math.ceil(full * shard_numel(t.shape, world) / t.numel())


def unique_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def streamed_parameters(backbone: nn.Module) -> set[int]:
    """ids of the frozen parameters block swap keeps on the host (all but two streamed blocks' worth)."""
    swap = getattr(backbone, "block_swap", None)
    if swap is None:
        return set()
    blocks = sorted(swap.swapped)
    per_block = [
        [p for p in backbone.transformer.transformer_blocks[i].parameters() if not p.requires_grad]
        for i in blocks
    ]
    # The device holds the running block and the prefetched one: the two largest streamed blocks' worth.
    per_block.sort(key=lambda ps: sum(tensor_nbytes(p) for p in ps), reverse=True)
    return {id(p) for ps in per_block[2:] for p in ps}


@dataclass
class Counts:
    """Bytes per device (``host``: parameters kept on the CPU by block swap)."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int = 0
    host: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations


def parameter_bytes(backbone: nn.Module, world: int = 1) -> tuple[int, int]:
    """(device bytes, host bytes) of the backbone's parameters, sharded over ``world`` ranks."""
    host_ids = streamed_parameters(backbone)
    device = host = 0
    for _, p in unique_parameters(backbone):
        if id(p) in host_ids:
            host += tensor_nbytes(p)
        else:
            device += _sharded_bytes(p, world)
    return device, host


def gradient_bytes(backbone: nn.Module, world: int = 1) -> int:
    return sum(
        shard_numel(p.shape, world) * p.element_size()
        for _, p in unique_parameters(backbone)
        if p.requires_grad
    )


def optimizer_bytes(
    backbone: nn.Module, optimizer: str = "adamw", world: int = 1, block_size: int = 256
) -> int:
    """AdamW / 8-bit AdamW state of the trainable parameters (after the first step)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    total = 0
    for _, p in unique_parameters(backbone):
        if not p.requires_grad:
            continue
        n = shard_numel(p.shape, world)
        if optimizer == "adamw8bit":
            total += adamw8bit_state_bytes(n, block_size)
        else:
            total += 2 * n * p.element_size() + 4
    return total


# ------------------------------------------------------------------------------------------------- activations
class _FusedAttention(torch.autograd.Function):
    """Stands for a fused attention kernel on ``meta`` tensors: output ``[B, H, N, d]``, saves q, k, v, the output
    and a ``[B, H, N]`` log-sum-exp (what flash / memory-efficient attention and torch's CPU flash kernel keep)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover - never run
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _CountFusedAttention(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            kwargs = dict(kwargs or {})
            names = ("query", "key", "value")
            q, k, v = (*args[:3], *(kwargs[n] for n in names[len(args[:3]) :]))
            return _FusedAttention.apply(q, k, v)
        return func(*args, **(kwargs or {}))


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def activation_bytes(
    backbone: nn.Module, inputs: tuple, *, checkpointing: bool
) -> tuple[int, dict[str, int]]:
    """Saved-for-backward bytes of one ``backbone(*inputs)`` (see the module docstring), and its parts.

    Args:
        backbone: an :class:`~rededit.models.backbone.EditBackbone` (any device; ``meta`` costs nothing).
        inputs: its forward arguments ``(x_t [B, C, h, w], refs, σ [B], text [B, L, D], mask [B, L])``.
        checkpointing: count as under per-block gradient checkpointing.
    """
    params = {id(p) for p in backbone.parameters()}
    blocks = backbone.transformer.transformer_blocks
    current: list[int | None] = [None]
    saved: dict[int | None, dict[int, int]] = {}
    block_inputs: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params and type(t) in (torch.Tensor, nn.Parameter):
            saved.setdefault(current[0], {})[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    def enter(i: int, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        current[0] = i
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                block_inputs[_storage_key(value)] = value.untyped_storage().nbytes()

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        current[0] = None

    was = bool(getattr(backbone.transformer, "gradient_checkpointing", False))
    if was:
        backbone.transformer.disable_gradient_checkpointing()  # count each block's saved tensors
    handles = []
    for i, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(lambda m, a, k, i=i: enter(i, m, a, k), with_kwargs=True)
        )
        handles.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _CountFusedAttention():
            backbone(*inputs)
    finally:
        for h in handles:
            h.remove()
        if was:
            backbone.transformer.enable_gradient_checkpointing()
    outside = sum(saved.get(None, {}).values())
    per_block = [sum(saved.get(i, {}).values()) for i in range(len(blocks))]
    if not checkpointing:
        every = {k: v for part in saved.values() for k, v in part.items()}
        total = sum(every.values())
    else:
        kept = dict(saved.get(None, {}))
        kept.update(block_inputs)
        total = sum(kept.values()) + max(per_block, default=0)
    parts = {
        "outside_blocks": outside,
        "per_block_max": max(per_block, default=0),
        "blocks_total": sum(per_block),
        "block_inputs": sum(block_inputs.values()),
    }
    return total, parts
