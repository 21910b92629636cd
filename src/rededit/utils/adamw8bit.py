"""8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") for full fine-tuning.

AdamW keeps two fp32 moments per trainable weight (8 bytes, twice the fp32 weight itself). torchao's ``AdamW8bit``
stores each moment as uint8 codes of a dynamic (non-linear) quantisation map with one fp32 absmax scale per block of
``block_size`` values::

    m ≈ qmap[codes] · scale_block        bytes per moment ≈ numel · (1 + 4 / block_size) + 4 · 256 (the map)

i.e. ≈ 2.03 bytes per weight for both moments instead of 8 (≈ 4× smaller). Like bitsandbytes, torchao quantises only
tensors with ≥ 4096 values whose size is a multiple of ``block_size``; the others keep fp32 moments. The update is
AdamW's (decoupled weight decay, bias correction) on the dequantised moments, re-quantised after each step.

torchao compiles its per-tensor step with ``torch.compile``; on a CPU that costs seconds per distinct tensor shape
(measured ≈ 6 s per shape on the 2-core box, ≈ 40 s before the tiny model's first step), so ``compile="auto"``
compiles on CUDA only and runs the same step eagerly on the CPU (identical math).

Checkpoints: the live state is torchao's ``OptimState8bit`` tensor subclass, which Lightning's resume cannot read
(its ``map_location`` callable is refused for wrapper subclasses) and which would make a checkpoint rebuild a class
from the file. ``state_dict()`` therefore writes each 8-bit moment as plain tensors (``{"optim_state_8bit": True,
"codes": uint8, "scale": fp32, "qmap": fp32, "signed": bool}``) and ``load_state_dict`` rebuilds the subclass: the
file is plain tensors that ``torch.load(weights_only=True)`` reads, and a resume continues bit for bit.

torchao is an optional dependency: ``pip install 'rededit[memory]'`` (``optimizer=adamw8bit``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

#: torchao's (and bitsandbytes') rule: tensors smaller than this keep fp32 moments.
MIN_QUANT_SIZE = 4096


def quantized_state(numel: int, block_size: int) -> bool:
    """Whether a tensor of ``numel`` values gets 8-bit moments (torchao's ``_new_buffer`` rule)."""
    return numel >= MIN_QUANT_SIZE and numel % block_size == 0


def state_bytes(numel: int, block_size: int = 256) -> int:
    """Bytes of AdamW8bit's state for one tensor of ``numel`` fp32 values: two moments (uint8 codes, one fp32 scale
    per block, a 256-entry fp32 map each; or fp32 moments below :data:`MIN_QUANT_SIZE`) and the fp32 step."""
    if quantized_state(numel, block_size):
        moment = numel + 4 * (numel // block_size) + 4 * 256
    else:
        moment = 4 * numel
    return 2 * moment + 4


def AdamW8bit(
    params: Iterable[Any],
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    block_size: int = 256,
    compile: bool | str = "auto",
) -> torch.optim.Optimizer:
    """torchao's ``AdamW8bit`` over ``params`` (param groups as for ``torch.optim.AdamW``).

    Args:
        compile: ``"auto"`` (compile the step when the parameters are on CUDA), ``True`` or ``False`` (eager).
    """
    try:
        from torchao.optim import AdamW8bit as _TorchaoAdamW8bit
    except ImportError as err:
        raise ImportError("optimizer=adamw8bit needs torchao: pip install 'rededit[memory]'") from err

    class EagerCapableAdamW8bit(_TorchaoAdamW8bit):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.register_state_dict_post_hook(_plain_state)
            self.register_load_state_dict_pre_hook(_subclass_state)

        def step(self, closure: Any = None) -> Any:
            if _compiles(self, compile):
                return super().step(closure)
            # force_eager makes torchao's torch.compile(single_param_adam) a plain call: the same ops, no compile
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return EagerCapableAdamW8bit(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size
    )


#: Marks an 8-bit moment written as plain tensors in a state dict.
PLAIN_KEY = "optim_state_8bit"


def _plain_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` post-hook: 8-bit moments as plain tensors (the inner dicts are the live state: copied)."""
    state = {}
    for index, entry in state_dict["state"].items():
        entry = dict(entry)
        for key, value in entry.items():
            if type(value).__name__ == "OptimState8bit":
                entry[key] = {
                    PLAIN_KEY: True,
                    "codes": value.codes,
                    "scale": value.scale,
                    "qmap": value.qmap,
                    "signed": bool(value.signed),
                }
        state[index] = entry
    return {**state_dict, "state": state}


def _subclass_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``load_state_dict`` pre-hook: rebuild torchao's ``OptimState8bit`` from :func:`_plain_state`'s entries."""
    from torchao.optim.subclass_8bit import OptimState8bit

    state = {}
    for index, entry in state_dict["state"].items():
        entry = dict(entry)
        for key, value in entry.items():
            if isinstance(value, dict) and value.get(PLAIN_KEY):
                codes, scale, qmap = value["codes"], value["scale"], value["qmap"]
                if codes.dtype != torch.uint8 or scale.ndim != 1 or qmap.dtype != torch.float32:
                    raise ValueError(
                        f"optimizer state {index}.{key}: not an 8-bit AdamW moment (codes/scale/qmap)"
                    )
                entry[key] = OptimState8bit(codes, scale, qmap, bool(value["signed"]))
        state[index] = entry
    return {**state_dict, "state": state}


def _compiles(optimizer: torch.optim.Optimizer, compile: bool | str) -> bool:
    if compile != "auto":
        return bool(compile)
    return any(p.is_cuda for g in optimizer.param_groups for p in g["params"])
