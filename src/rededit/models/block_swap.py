"""Block swap: keep the frozen weights of N transformer blocks in CPU memory and stream each block's weights to the
compute device just before its forward, prefetching the next one (issue 20; the feature of musubi-tuner's
``--blocks_to_swap`` and DiffSynth-Studio's VRAM management that fits 20B LoRA training on a 24 GB card).

Memory: the device holds the resident blocks, the adapter and at most two streamed blocks at a time (the one
running and the one being prefetched), instead of all N streamed blocks: ``N − 2`` blocks' frozen weights less,
≈ 0.65 GB per Qwen-Image block in bf16 (60 blocks, 20B weights).

How (forward hooks on diffusers' blocks; diffusers is not modified):

* the *last* N blocks of ``transformer.transformer_blocks`` are streamed; their frozen parameters (``requires_grad``
  false: the base under an adapter, a quantised base included) stay on the CPU (pinned when CUDA is there), also
  through ``module.to(device)``: the blocks' ``_apply`` converts dtypes of those tensors but keeps them on the host
  (so Lightning's ``model.to(cuda)`` never puts the whole model on the device). Trainable tensors (the adapter)
  and buffers follow ``to()`` as usual and stay resident;
* a forward pre-hook on block ``i`` swaps device copies of its frozen tensors into the block's ``_parameters``
  (the prefetched copy when there is one, else a synchronous copy), then starts the copy of the next streamed block
  on a side CUDA stream (event-synchronised, ``record_stream`` for the allocator); the forward hook puts the CPU
  tensors back. Autograd keeps the device copies a backward needs alive by reference and frees them after it, so
  no copy is ever written back and no stale weight can be read;
* under gradient checkpointing (diffusers' non-reentrant checkpoint) the forward keeps no block weights and the
  backward recomputes each block, which runs the hooks again in reverse order: the streamed weights are fetched
  again (prefetching block ``i − 1``), so training memory holds ≈ two streamed blocks at any time. Without
  checkpointing the forward must keep every block's weights for the backward: swap then saves memory in inference
  only (:class:`BlockSwap` logs a warning).

Full fine-tuning has nothing to stream (every block weight trains and the optimizer needs it on the device): the
blocks' trainable tensors are never streamed. Single device only (FSDP2 shards instead; refused on DTensors).
On a CPU-only machine the same code runs with the CPU as both sides (``device="cpu"`` copies each tensor), which the
tests use to check outputs and gradients against the unswapped model; the CUDA stream path needs a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rededit.utils.logging import get_logger

log = get_logger(__name__)


def _frozen_slots(block: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """``(module, name, parameter)`` of every frozen parameter inside ``block`` (its own ``_parameters`` slots)."""
    for module in block.modules():
        for name, p in module._parameters.items():
            if p is not None and not p.requires_grad:
                yield module, name, p


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (a checkpoint's recompute)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - private API of torch's engine (used by FSDP the same way)
        return False


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind ``t`` (a torchao subclass holds codes and scales)."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names for x in _inner(getattr(t, n))]


class BlockSwap:
    """Stream the frozen weights of the last ``num_swap`` blocks of ``transformer`` (see the module docstring).

    Args:
        transformer: a diffusers transformer with ``transformer_blocks``.
        num_swap: how many blocks (the last ones) stream; ``0 < num_swap <= len(blocks)``.
        device: the compute device; ``None``: the device of each block's input (``"cpu"`` in the CPU tests, where
            a real copy is made so the streaming path runs).
        pin_memory: pin the host copies (``"auto"``: when CUDA is available); makes the prefetch asynchronous.
        prefetch: copy the next streamed block while the current one runs.
    """

    def __init__(
        self,
        transformer: nn.Module,
        num_swap: int,
        *,
        device: str | torch.device | None = None,
        pin_memory: bool | str = "auto",
        prefetch: bool = True,
    ) -> None:
        blocks = transformer.transformer_blocks
        if not 0 < int(num_swap) <= len(blocks):
            raise ValueError(
                f"backbone.block_swap must be in [0, {len(blocks)}] (the number of blocks), got {num_swap}"
            )
        self.blocks = blocks
        self.swapped = set(range(len(blocks) - int(num_swap), len(blocks)))
        self.device = None if device is None else torch.device(device)
        self.pin = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.prefetch = bool(prefetch)
        self._last: int | None = None
        self._pending: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self._restore: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {}
        self._stream: Any = None
        self._warned = False
        self._callback_queued = False
        self.copies = 0  # block copies made (tests: each streamed block is fetched once per forward)
        # Bound methods and partials, not closures: a deepcopy of the backbone (DPO's full-model reference) then
        # gets hooks bound to a copied BlockSwap over the copied blocks.
        self.handles = [transformer.register_forward_pre_hook(self._start)]
        for i, block in enumerate(blocks):
            pre = functools.partial(self._pre, i)
            self.handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(block.register_forward_hook(functools.partial(self._post, i)))
            if i in self.swapped:
                block._apply = functools.partial(self._apply_block, block)
        self.offload()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(
            _stream=None, _pending={}, _restore={}, _callback_queued=False
        )  # per-forward state and the CUDA stream stay behind
        return state

    # ------------------------------------------------------------------------------------------- host side
    @torch.no_grad()
    def offload(self) -> None:
        """Put the streamed blocks' frozen tensors on the CPU (pinned when asked); call after they changed
        (an adapter injected, a quantised base), the stage does after both."""
        for i in sorted(self.swapped):
            for _, _, p in _frozen_slots(self.blocks[i]):
                if p.device.type == "meta":
                    continue  # a meta-built backbone (rededit-memory): nothing to place
                host = p.data if p.device.type == "cpu" else p.data.to("cpu")
                if self.pin and not host.is_pinned() and type(host) is torch.Tensor:
                    host = host.pin_memory()
                if host is not p.data:
                    p.data = host
        self._pending.clear()

    def _apply_block(self, block: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        """``block._apply``: ``fn`` (``to()``, ``half()``, ...) on the trainable tensors and buffers, only its dtype
        on the frozen ones, which stay on the host."""
        held = list(_frozen_slots(block))
        for m, n, _ in held:
            m._parameters[n] = None  # Module._apply skips None slots (the order of _parameters is kept)
        try:
            type(block)._apply(block, fn, recurse)
        finally:
            for m, n, p in held:
                m._parameters[n] = p
        with torch.no_grad():
            for _, _, p in held:
                want = fn(torch.empty(0, dtype=p.dtype)).dtype  # the dtype fn asks for, on a 0-size probe
                if want != p.dtype and type(p.data) is torch.Tensor:
                    p.data = p.data.to(want)
        self.offload()
        return block

    # --------------------------------------------------------------------------------------------- hooks
    def _start(self, module: nn.Module, args: Any) -> None:
        self._last = (
            None  # a new transformer forward: blocks run 0 → L-1 (a checkpoint's recompute runs L-1 → 0)
        )
        self.restore()
        if (
            module.training
            and torch.is_grad_enabled()
            and not getattr(module, "gradient_checkpointing", False)
        ):
            self.warn_without_checkpointing()

    def _device_of(self, args: Any, kwargs: dict[str, Any]) -> torch.device:
        if self.device is not None:
            return self.device
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value.device
        raise ValueError("block swap: a block was called without a tensor input; set its device explicitly")

    def _pre(self, i: int, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        device = self._device_of(args, kwargs)
        step = 1 if self._last is None or i > self._last else -1
        self._last = i
        # A checkpoint's recompute stops as soon as it has the tensors the backward needs, before the block returns
        # (torch's non-reentrant early stop): its forward hook never runs. Those blocks are put back here (and at the
        # end of the backward); the copies live on where autograd saved them.
        self.restore(keep=i)
        if step < 0 and not self._callback_queued and _in_backward():
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
            self._callback_queued = True
        if i in self.swapped:
            self._materialise(i, device)
        if self.prefetch and (i + step) in self.swapped and (i + step) not in self._pending:
            self._pending[i + step] = self._fetch(i + step, device)

    def _post(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        for m, name, host in self._restore.pop(i, []):
            m._parameters[name] = host  # the device copy lives on only where autograd saved it

    def restore(self, keep: int | None = None) -> None:
        """Put the host tensors back into every materialised block but ``keep``."""
        for j in [j for j in self._restore if j != keep]:
            self._post(j, self.blocks[j], (), None)

    def _after_backward(self) -> None:
        self._callback_queued = False
        self.restore()
        self._pending.clear()

    # --------------------------------------------------------------------------------------------- copies
    def _fetch(self, i: int, device: torch.device) -> tuple[list[torch.Tensor], Any]:
        """Device copies of block ``i``'s frozen tensors (+ a CUDA event when copied on the side stream)."""
        host = [p for _, _, p in _frozen_slots(self.blocks[i])]
        for p in host:
            if type(p).__name__ == "DTensor":
                raise ValueError(
                    "backbone.block_swap does not work with FSDP2 (sharded weights): set it to 0"
                )
        self.copies += 1
        if device.type != "cuda":
            # copy=True: on a CPU-only machine the streamed tensors are still fresh copies (the tested path)
            return [p.detach().to(device, copy=True) for p in host], None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._stream):
            out = [p.detach().to(device, non_blocking=True) for p in host]
            event = torch.cuda.Event()
            event.record(self._stream)
        return out, event

    def _materialise(self, i: int, device: torch.device) -> None:
        tensors, event = self._pending.pop(i, None) or self._fetch(i, device)
        if event is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            for t in tensors:
                for x in _inner(t):
                    x.record_stream(current)  # allocated on the copy stream, used on the compute stream
        slots = list(_frozen_slots(self.blocks[i]))
        if len(slots) != len(tensors):
            raise RuntimeError(f"block swap: block {i}'s frozen tensors changed between prefetch and use")
        restore = []
        for (m, name, host), t in zip(slots, tensors):
            m._parameters[name] = nn.Parameter(t, requires_grad=False)
            restore.append((m, name, host))
        self._restore[i] = restore

    def warn_without_checkpointing(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "backbone.block_swap without gradient_checkpointing: training keeps every streamed block's weights "
                "for the backward (no memory saved); it saves memory in inference, or set "
                "backbone.gradient_checkpointing=true"
            )

    def remove(self) -> None:
        """Remove the hooks and the ``_apply`` overrides (the weights stay where they are)."""
        for h in self.handles:
            h.remove()
        for i in self.swapped:
            with contextlib.suppress(AttributeError):
                del self.blocks[i]._apply
