"""FSDP2 / HSDP for the editor backbone: the ONE place that applies ``fully_shard`` (docs/architecture.md rule 3).

Report §3.2: parameters, gradients and optimizer state are sharded (FSDP), activations are recomputed
(gradient checkpointing), matmuls run in BF16, and at scale the sharding moves to Hybrid Sharded Data
Parallel — shard inside a node, replicate across nodes.

Mesh (:func:`build_mesh`): a world of ``W`` ranks is either a 1-D mesh ``("shard",)`` of size ``W`` (FSDP2:
every parameter is split ``W`` ways) or a 2-D mesh ``("replicate", "shard")`` of shape ``[W / S, S]`` (HSDP:
each of the ``W / S`` replica groups holds a full copy split ``S`` ways; gradients are reduce-scattered
inside a group and all-reduced across groups). ``S`` defaults to one node's devices.

Wrapping (:func:`parallelize_backbone`): each ``transformer_blocks[i]`` is its own FSDP2 unit (all-gather
before its forward, free after, so at most ~one block's full weights live at a time), then the
``EditBackbone`` root (embeddings, norm_out, proj_out). Parameter names and state-dict keys are unchanged
(``fully_shard`` swaps parameters for ``DTensor`` in place), so checkpoints and EMA keep their keys.
Activation checkpointing uses diffusers' own per-block mechanism (``EditBackbone.set_gradient_checkpointing``)
for the same reason: ``checkpoint_wrapper`` would rename every key.

Mixed precision: ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` — master weights and optimizer state
stay fp32 (sharded), the all-gathered compute copy is ``param_dtype`` (bf16), gradients reduce in
``reduce_dtype`` (fp32). Use it with ``trainer.precision=32-true``: the policy is the mixed precision.

Meta-device / rank-0 init (:func:`meta_init`, :func:`materialize`, :func:`load_full_state`): a 20B backbone
is built on the ``meta`` device (no storage), sharded, materialised shard-by-shard with ``to_empty`` and
then filled from one full state dict that only rank 0 reads and broadcasts. The RoPE tables are plain
tensor attributes that ``to_empty`` does not touch (docs/architecture.md), so :func:`materialize` rebuilds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from rededit.utils.logging import get_logger

log = get_logger(__name__)
M = TypeVar("M", bound=nn.Module)

_DTYPES = {
    None: None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def _dtype(name: str | torch.dtype | None, what: str) -> torch.dtype | None:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"{what}={name!r}: use one of {sorted(k for k in _DTYPES if k)} or null")
    return _DTYPES[name]


@dataclass
class ParallelPlan:
    """How :func:`parallelize_backbone` shards the backbone (the ``parallelize:`` node of ``conf/strategy``).

    Args:
        shard_size: HSDP shard-group size ``S`` (ranks that split one replica). ``None``: FSDP2 over all
            ranks when ``hsdp`` is false, one node's devices when it is true.
        hsdp: use the 2-D ``replicate × shard`` mesh.
        activation_checkpointing: recompute every transformer block in backward.
        param_dtype: compute dtype of the all-gathered weights (``bf16``; ``null`` = keep fp32).
        reduce_dtype: dtype of the gradient reduce-scatter / all-reduce.
        reshard_after_forward: free each block's full weights after its forward (ZeRO-3 style; ``false``
            keeps them until backward: more memory, one all-gather less per block).
        cpu_offload: keep the sharded parameters, gradients and optimizer state in host memory.
        meta_init: build the backbone on the ``meta`` device (needs ``stage.init_from`` or a resume to
            fill the weights; for production-size backbones).
    """

    shard_size: int | None = None
    hsdp: bool = False
    activation_checkpointing: bool = False
    param_dtype: str | None = None
    reduce_dtype: str | None = "fp32"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    meta_init: bool = False

    def __post_init__(self) -> None:
        _dtype(self.param_dtype, "parallelize.param_dtype")
        _dtype(self.reduce_dtype, "parallelize.reduce_dtype")
        if self.shard_size is not None and int(self.shard_size) < 1:
            raise ValueError(f"parallelize.shard_size must be >= 1 or null, got {self.shard_size}")

    def fsdp_kwargs(self, *, frozen: bool = False) -> dict[str, Any]:
        """Keyword arguments of ``fully_shard`` (mesh excluded)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        kwargs: dict[str, Any] = {
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=_dtype(self.param_dtype, "param_dtype"),
                reduce_dtype=None if frozen else _dtype(self.reduce_dtype, "reduce_dtype"),
            ),
            # A frozen copy only runs forwards: always free its gathered weights right after.
            "reshard_after_forward": True if frozen else self.reshard_after_forward,
        }
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        return kwargs


def mesh_shape(
    world_size: int, shard_size: int | None, *, hsdp: bool, devices_per_node: int
) -> tuple[int, int]:
    """``(replicate, shard)`` sizes of the mesh for ``world_size`` ranks (``replicate == 1``: plain FSDP2)."""
    if not hsdp:
        shard = world_size if shard_size is None else int(shard_size)
    else:
        shard = int(shard_size) if shard_size is not None else int(devices_per_node)
    if shard < 1 or world_size % shard:
        raise ValueError(
            f"shard size {shard} does not divide the world size {world_size}: set strategy.parallelize.shard_size "
            "to a divisor of trainer.devices × trainer.num_nodes"
        )
    return world_size // shard, shard


def build_mesh(
    world_size: int,
    shard_size: int | None = None,
    *,
    hsdp: bool = False,
    devices_per_node: int | None = None,
    device_type: str = "cpu",
) -> Any:
    """1-D ``("shard",)`` mesh (FSDP2) or 2-D ``("replicate", "shard")`` mesh (HSDP); needs an initialised
    process group of ``world_size`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    replicate, shard = mesh_shape(
        world_size, shard_size, hsdp=hsdp, devices_per_node=devices_per_node or world_size
    )
    if replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "shard"))


def block_classes() -> set[type[nn.Module]]:
    """The transformer-block class(es) that are FSDP1 wrap units / activation-checkpointing units
    (``conf/strategy/fsdp1_hybrid.yaml``: Lightning's ``FSDPStrategy`` takes a set of module classes)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    return {QwenImageTransformerBlock}


def _blocks(module: nn.Module) -> list[nn.Module]:
    transformer = getattr(module, "transformer", module)
    blocks = getattr(transformer, "transformer_blocks", None)
    return list(blocks) if blocks is not None else []


def parallelize_backbone(backbone: M, mesh: Any, plan: ParallelPlan | None = None) -> M:
    """Shard a (trainable) ``EditBackbone`` in place: ``fully_shard`` per transformer block, then the root.

    Args:
        backbone: an :class:`~rededit.models.backbone.EditBackbone` (or any module with
            ``.transformer.transformer_blocks``), on CPU/GPU or ``meta``.
        mesh: 1-D or 2-D (``replicate × shard``) ``DeviceMesh`` from :func:`build_mesh`.
        plan: sharding options (default: fp32, reshard after forward, no checkpointing).

    Returns:
        the same module, its parameters now ``DTensor`` shards ``[N / S, ...]`` of the full ``[N, ...]``.
    """
    from torch.distributed.fsdp import fully_shard

    plan = plan or ParallelPlan()
    if plan.activation_checkpointing and hasattr(backbone, "set_gradient_checkpointing"):
        backbone.set_gradient_checkpointing(True)
    kwargs = plan.fsdp_kwargs()
    blocks = _blocks(backbone)
    for block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(backbone, mesh=mesh, **kwargs)
    log.info(
        "FSDP2: sharded %d transformer blocks + root over mesh %s (param dtype %s, reduce %s, AC %s, offload %s)",
        len(blocks),
        tuple(mesh.shape),
        plan.param_dtype or "fp32",
        plan.reduce_dtype or "param dtype",
        plan.activation_checkpointing,
        plan.cpu_offload,
    )
    return backbone


def parallelize_frozen(module: M, mesh: Any, plan: ParallelPlan | None = None) -> M:
    """Shard an extra *frozen* copy (DPO reference policy, NFT old policy) like the trainable backbone.

    The copy is put in eval mode with ``requires_grad=False`` everywhere, sharded per transformer block
    with ``reshard_after_forward=True`` (its full weights exist only during its own block's forward) and
    the same ``param_dtype``; it never reduces gradients. Call it inside ``configure_model`` *after*
    :func:`parallelize_backbone`, on a copy built the same way as the backbone (a ``deepcopy`` of the
    still-unsharded backbone, or the factory on ``meta`` + :func:`load_full_state` later). Run its forwards
    under ``torch.no_grad()``; several forwards per step are fine (each all-gathers and frees per block).
    Keep it out of the LightningModule's module tree (``rededit.utils.module_tree.hidden_from_tree``) so it is neither
    checkpointed nor touched by the optimizer; to refresh it (NFT's old policy), copy the trainable
    shards into it shard-by-shard: ``for p, q in zip(frozen.parameters(), backbone.parameters()):
    p.to_local().copy_(q.to_local())`` — both use the same mesh and placements, so no communication.
    """
    from torch.distributed.fsdp import fully_shard

    plan = plan or ParallelPlan()
    module.requires_grad_(False)
    module.eval()
    kwargs = plan.fsdp_kwargs(frozen=True)
    for block in _blocks(module):
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(module, mesh=mesh, **kwargs)
    return module


def frozen_copy(
    factory: Callable[..., M],
    mesh: Any,
    plan: ParallelPlan | None,
    state: Mapping[str, torch.Tensor] | None,
    *,
    device: str | torch.device,
    **factory_kwargs: Any,
) -> M:
    """A sharded frozen copy (DPO reference, NFT old policy) filled from a full state dict.

    Built on ``meta`` (no full weights on any rank), sharded by :func:`parallelize_frozen`, materialised on
    ``device`` and loaded with :func:`load_full_state` (only rank 0 needs ``state``). A collective: call it on
    every rank after the process group exists (e.g. in ``configure_optimizers`` or ``on_fit_start``).
    """
    module = meta_init(factory, **factory_kwargs)
    if hasattr(module, "freeze_unused_text_tail"):
        module.freeze_unused_text_tail()
    parallelize_frozen(module, mesh, plan)
    materialize(module, device)
    load_full_state(module, state, broadcast_from_rank0=True)
    return module


@torch.no_grad()
def copy_shards_(dst: nn.Module, src: nn.Module) -> None:
    """``dst ← src`` shard by shard (no communication): both sharded on the same mesh with the same
    placements (or both unsharded). Refreshes an NFT old policy from the trained backbone."""
    dst_params, src_params = dict(dst.named_parameters()), dict(src.named_parameters())
    if dst_params.keys() != src_params.keys():
        raise ValueError("copy_shards_: the two modules have different parameters")
    for name, p in dst_params.items():
        q = src_params[name]
        if getattr(p, "placements", None) != getattr(q, "placements", None):
            raise ValueError(f"copy_shards_: {name} is sharded differently in the two modules")
        local = p.to_local() if hasattr(p, "to_local") else p
        local.copy_(q.to_local() if hasattr(q, "to_local") else q)


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` holds FSDP2 ``DTensor`` parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


# --------------------------------------------------------------------------------------------------- init
@contextlib.contextmanager
def _device(device: str | torch.device) -> Iterator[None]:
    with torch.device(device):
        yield


def meta_init(factory: Callable[..., M], *args: Any, **kwargs: Any) -> M:
    """``factory(*args, **kwargs)`` on the ``meta`` device: the module's shapes without any storage."""
    with _device("meta"):
        return factory(*args, **kwargs)


def materialize(module: M, device: str | torch.device) -> M:
    """Allocate (uninitialised) storage for a meta-initialised module — after sharding only the local shards —
    and rebuild the non-parameter RoPE tables (``EditBackbone.rebuild_rope``) on ``device``."""
    module.to_empty(device=device)
    for sub in module.modules():
        if hasattr(sub, "rebuild_rope"):
            with _device(device):
                sub.rebuild_rope()
    return module


def load_full_state(
    module: nn.Module, state: Mapping[str, torch.Tensor] | None, *, broadcast_from_rank0: bool = True
) -> None:
    """Fill ``module`` (sharded or not) from one full state dict.

    Sharded: ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=...)`` — with the broadcast
    only rank 0 needs ``state`` (others pass ``None`` or ``{}``), every rank keeps just its shard, so the full
    weights are never materialised on every rank. Unsharded: a strict ``load_state_dict``.
    """
    if not is_sharded(module):
        if state is None:
            raise ValueError("load_full_state: an unsharded module needs the state dict on this rank")
        module.load_state_dict(dict(state), strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0, strict=True)
    set_model_state_dict(module, dict(state or {}), options=opts)


def full_state_dict(module: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Gathered full state dict on CPU (a collective when sharded; ``rank0_only``: empty on other ranks)."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(module, options=opts)
    return {k: v.detach().cpu() for k, v in state.items()}
