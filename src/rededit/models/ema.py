"""Exponential moving average of a backbone's trainable weights, as plain PyTorch (report §3.5, §3.8).

    θ_ema ← d_n · θ_ema + (1 − d_n) · θ,     d_n = min(decay, (1 + n) / (10 + n))  (warm-up on)

with ``n`` the number of updates so far (the warm-up keeps early averages from being dominated by the
random initialisation). The shadow is fp32 and holds *this process's local* tensors: under DDP a full copy,
under FSDP2 the rank's shards (DTensor arithmetic stays local), so the same math runs on both.

Two users: the trainer callback :class:`rededit.callbacks.ema.EMA` (hooks, checkpoints, sharded resume) and
DiffusionNFT's old policy (:class:`rededit.stages.nft.OldPolicyEMA`, another decay schedule). ``module``
below is anything with a ``.backbone`` (the training stage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class EMAWeights:
    """The EMA shadow of ``module.backbone``'s trainable parameters.

    Args:
        decay: target decay ``d`` in [0, 1).
        warmup: use ``d_n = min(d, (1 + n)/(10 + n))``.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        # Optimizer step of the last update; 0 = none yet (under gradient accumulation the first
        # micro-batches end at global_step 0, before any optimizer step: they must not count as an update).
        self.last_step = 0
        self._backup: dict[str, torch.Tensor] | None = None

    def decay_at(self, n: int) -> float:
        """``d_n`` for the ``n``-th update (0-based)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @staticmethod
    def _params(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in module.backbone.named_parameters() if p.requires_grad)

    def _init_shadow(self, module: torch.nn.Module) -> None:
        self.shadow = {n: p.detach().float().clone() for n, p in self._params(module)}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One EMA step from the module's current weights."""
        d = self.decay_at(self.num_updates)
        for name, p in self._params(module):
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    # ------------------------------------------------------------------ swapping
    @torch.no_grad()
    def swap_in(self, module: torch.nn.Module) -> None:
        if self._backup is not None:
            return
        self._backup = {}
        for name, p in self._params(module):
            self._backup[name] = p.detach().clone()
            p.copy_(self.shadow[name].to(p.dtype))

    @torch.no_grad()
    def swap_out(self, module: torch.nn.Module) -> None:
        if self._backup is None:
            return
        for name, p in self._params(module):
            p.copy_(self._backup[name])
        self._backup = None

    @contextlib.contextmanager
    def averaged(self, module: torch.nn.Module) -> Iterator[None]:
        """``with ema.averaged(stage): ...`` runs the block with EMA weights, then restores the raw ones."""
        self.swap_in(module)
        try:
            yield
        finally:
            self.swap_out(module)

    def ema_state_dict(self, module: torch.nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """Full backbone state dict with the EMA weights in place of the trainable raw ones.

        Under FSDP2 this gathers every shard (a collective: call it on every rank). ``rank0_only``: tensors
        are gathered one at a time and copied to CPU memory on rank 0 only (other ranks get ``{}``), so no
        rank ever holds a full model on its device (the export of a 20B model).
        """
        keep = not rank0_only or _rank() == 0
        state: dict[str, torch.Tensor] = {}
        for k, raw in module.backbone.state_dict().items():
            value = self.shadow.get(k, raw)
            full = value.full_tensor() if is_dtensor(value) else value  # one all-gather per tensor
            if keep:
                device = "cpu" if rank0_only else full.device
                state[k] = full.detach().to(device=device, dtype=raw.dtype, copy=True)
            del full
        return state

    @property
    def sharded(self) -> bool:
        return any(is_dtensor(v) for v in self.shadow.values())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Decay, counters and the full (gathered: a collective under FSDP2) shadow on the CPU."""
        full = {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in self.shadow.items()}
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "shadow": {k: v.detach().cpu() for k, v in full.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.last_step = int(state.get("last_step", 0))
        self.shadow = {k: v.clone().float() for k, v in state["shadow"].items()}
