"""The frozen base of an adapter run in a lower precision (issue 20, "memory options for one-GPU users").

Under an adapter (:mod:`rededit.models.adapters`) the transformer's own weights never change, so they need neither
fp32 master copies nor gradients: they can be stored in bf16 (2 bytes per weight) or quantised weight-only to int8
or fp8 (1 byte per weight plus one scale per output row) while the adapter stays fp32 and gets all the gradients.
For a LoRA-adapted Linear ``W`` (:mod:`rededit.models.adapters`)::

    y = deq(Q(W)) x + (α / r) · B A x         Q: per-row absmax int8 / float8-e4m3 (torchao), A, B fp32

Options (the ``adapter`` node):

* ``base_dtype``: ``null`` (keep) | ``bfloat16`` | ``float16``: every frozen parameter of ``transformer`` (not the
  adapter, not the FireEdit modules outside it) is cast. Activations then run in that dtype; peft casts each
  adapter's input to fp32 and its output back.
* ``quantize``: ``null`` | ``int8_weight_only`` | ``float8_weight_only``: torchao's ``Int8WeightOnlyConfig`` /
  ``Float8WeightOnlyConfig`` on the frozen ``Linear`` layers inside ``transformer_blocks`` (the adapters' base
  layers and untargeted ones). The embedders, the time embedding and the output head stay in ``base_dtype``: they
  hold < 1 % of the 20B model's weights, and their error would reach every token (or the prediction itself).

torchao is an optional dependency (``pip install rededit[memory]``); ``quantize`` without it is an error naming
the extra. The weights are quantised *after* the base was loaded and the adapter injected, so checkpoints,
``stage.init_from`` and the recorded base fingerprint are those of the full-precision base; an export or a
consolidation rebuilds the base from its source (the files hold the original base, not a dequantised one).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rededit.models.vae import as_dtype
from rededit.utils.logging import get_logger

log = get_logger(__name__)

QUANTIZE_SCHEMES = ("int8_weight_only", "float8_weight_only")
BASE_DTYPES = ("float32", "bfloat16", "float16")
#: Set on a backbone whose frozen base was cast or quantised: ``{"base_dtype": ..., "quantize": ...}``.
MARKER = "_reduced_base"


class FrozenBaseError(ValueError):
    """A bad ``adapter.base_dtype`` / ``adapter.quantize`` setting."""


def options(node: Mapping[str, Any] | None) -> tuple[torch.dtype | None, str | None]:
    """``(base dtype or None, quantisation scheme or None)`` of an ``adapter`` node, checked."""
    node = dict(node or {})
    dtype_name, scheme = node.get("base_dtype"), node.get("quantize")
    try:
        dtype = as_dtype(dtype_name)
    except ValueError:
        dtype = None
    if dtype_name is not None and str(dtype).removeprefix("torch.") not in BASE_DTYPES:
        raise FrozenBaseError(f"adapter.base_dtype must be null or one of {BASE_DTYPES}, got {dtype_name!r}")
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        raise FrozenBaseError(f"adapter.quantize must be null or one of {QUANTIZE_SCHEMES}, got {scheme!r}")
    if (dtype_name is not None or scheme is not None) and str(node.get("type", "none")) == "none":
        raise FrozenBaseError(
            "adapter.base_dtype / adapter.quantize reduce the *frozen* base of an adapter run; with adapter=none "
            "every weight trains (use trainer.precision for full fine-tuning)"
        )
    return dtype, scheme


def torchao_config(scheme: str) -> Any:
    """torchao's weight-only config object of ``scheme``."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as err:
        raise FrozenBaseError(
            f"adapter.quantize={scheme} needs torchao: pip install 'rededit[memory]' (torchao==0.18.0)"
        ) from err
    return Int8WeightOnlyConfig() if scheme == "int8_weight_only" else Float8WeightOnlyConfig()


def quantizable(module: nn.Module, fqn: str) -> bool:
    """torchao's ``filter_fn``: a frozen ``nn.Linear`` inside ``transformer_blocks`` (adapter weights train:
    never quantised)."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("transformer_blocks.")
        and not any(p.requires_grad for p in module.parameters(recurse=False))
    )


@torch.no_grad()
def reduce_frozen_base(
    backbone: nn.Module, *, dtype: torch.dtype | None = None, quantize: str | None = None
) -> dict[str, int]:
    """Cast the frozen parameters of ``backbone.transformer`` to ``dtype``, then quantise its frozen block
    ``Linear`` layers with ``quantize`` (call after the adapter was injected: requires_grad marks what trains).

    Returns:
        ``{"cast": tensors cast, "quantized": Linear layers quantised}``.
    """
    transformer = backbone.transformer
    cast = 0
    if dtype is not None:
        for p in transformer.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += 1
    quantized = 0
    if quantize is not None:
        from torchao.quantization import quantize_

        config = torchao_config(quantize)
        names = [n for n, m in transformer.named_modules() if quantizable(m, n)]
        quantize_(transformer, config, filter_fn=quantizable)
        for name in names:
            module = transformer.get_submodule(name)
            module.forward = types.MethodType(_quantized_linear_forward, module)
        quantized = len(names)
    setattr(backbone, MARKER, {"base_dtype": None if dtype is None else str(dtype), "quantize": quantize})
    log.info(
        "frozen base: %d tensors cast to %s, %d block Linear layers quantised (%s)",
        cast,
        dtype,
        quantized,
        quantize,
    )
    return {"cast": cast, "quantized": quantized}


class _DequantizedLinear(torch.autograd.Function):
    """``y = x deq(Q(W))ᵀ + b`` for a frozen quantised ``W`` that keeps only ``Q(W)`` for the backward.

    torchao's weight-only ``linear`` dequantises ``W`` and lets autograd save that full-precision copy for
    ``∂L/∂x = ∂L/∂y · deq(Q(W))``: one dequantised weight per layer alive from the forward to the backward, which
    undoes the saving in training (measured: every quantised Linear saved its ``[in, out]`` fp32 weight). Here the
    backward dequantises again (QLoRA's recipe: the 4/8-bit weight is all that is kept); ``W`` gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the module's own (quantised, frozen) parameter: a reference, not a saved copy
        return F.linear(x, weight.dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ ctx.weight.dequantize().to(grad.dtype), None, None


def _quantized_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A quantised frozen Linear's forward: torchao's kernel when no gradient flows to ``x`` (inference, the
    layers before the first adapter), :class:`_DequantizedLinear` otherwise."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _DequantizedLinear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def is_reduced(backbone: nn.Module) -> bool:
    """Whether :func:`reduce_frozen_base` changed this backbone (its weights are no longer the source's)."""
    return getattr(backbone, MARKER, None) is not None


def is_quantized(t: torch.Tensor) -> bool:
    """A torchao tensor subclass (quantised weight or 8-bit optimizer state)."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: ``numel × element size``, or, for a tensor subclass (torchao's ``Int8Tensor``,
    ``Float8Tensor``, ``OptimState8bit``), the sum over its inner tensors (codes, scales, zero points, qmap).
    Works on the meta device (what :mod:`rededit.models.memory` counts)."""
    if is_quantized(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
