"""Image embedders for near-duplicate search and pair similarity (report §2.2.1 Levels 1–3).

The report embeds images with CLIP and an internal model. No CLIP/SigLIP weights ship on PyPI and no hub
is reachable, so every learned embedder takes a local checkpoint:

* :class:`PixelEmbedder` — deterministic, weight-free: the image downsampled to ``size x size``, mean
  removed, L2-normalised. Catches resized / recompressed / slightly shifted copies; the default in tests.
* :class:`TorchEmbedder` — any ``torch.nn.Module`` (a Hydra ``_target_``) whose weights are loaded from a
  local ``.safetensors`` file; ``[B, 3, S, S]`` in, ``[B, D]`` out.
* :class:`CLIPEmbedder` — ``transformers`` CLIP / SigLIP vision tower from a local folder
  (``from_pretrained(path, local_files_only=True)``); tests build it from a tiny random config.

All return ``[B, D]`` float32 rows of unit L2 norm, so inner product = cosine similarity (FAISS ``IP``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def describe_callable(obj: Any) -> str:
    """A stable text for a module / factory / Hydra partial, for the config hash (``repr`` of a function
    holds its memory address, which would make every run look like a new configuration)."""
    import functools

    if isinstance(obj, functools.partial):
        args = ", ".join(
            [*(repr(a) for a in obj.args), *(f"{k}={v!r}" for k, v in sorted(obj.keywords.items()))]
        )
        return f"{describe_callable(obj.func)}({args})"
    target = obj if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__")) else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ImageEmbedder(abc.ABC):
    """``embed(images) -> [B, D]`` unit-norm float32; ``images`` are ``[H, W, 3]`` uint8 arrays."""

    def setup(self) -> None:  # noqa: B027 (optional hook: load weights once per worker)
        """Load weights (called once per worker by the owning stage)."""

    @abc.abstractmethod
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def config(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items() if not k.startswith("_")
        }


class PixelEmbedder(ImageEmbedder):
    """Downsampled pixels as an embedding: ``[B, size*size*3]`` (or ``size*size`` for ``grayscale``)."""

    def __init__(self, size: int = 16, grayscale: bool = False):
        self.size = int(size)
        self.grayscale = bool(grayscale)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for img in images:
            pil = Image.fromarray(img).convert("L" if self.grayscale else "RGB")
            small = np.asarray(pil.resize((self.size, self.size), Image.BOX), dtype=np.float32).reshape(-1)
            out.append(
                small - small.mean()
            )  # brightness-invariant: a global exposure shift stays a duplicate
        return _l2n(np.stack(out)) if out else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        return self.size * self.size * (1 if self.grayscale else 3)


def images_to_tensor(images: Sequence[np.ndarray], size: int, mean=None, std=None):
    """``[B, 3, size, size]`` float tensor in [0, 1] (then normalised by ``mean``/``std`` when given)."""
    import torch

    arr = np.stack(
        [np.asarray(Image.fromarray(i).convert("RGB").resize((size, size), Image.BICUBIC)) for i in images]
    )
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    if mean is not None:
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x


def load_safetensors_module(model: Any, checkpoint_path: str | Path | None, device: str = "cpu"):
    """Build ``model`` (a module, or a zero-arg factory / Hydra partial) and load a local safetensors file.

    Raises:
        FileNotFoundError: ``checkpoint_path`` does not exist.
        RuntimeError: the state dict does not match the module (missing / unexpected keys are named).
    """
    import torch

    module = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
    if checkpoint_path is not None:
        from safetensors.torch import load_file

        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        module.load_state_dict(load_file(str(path)), strict=True)
    return module.to(device).eval()


class TorchEmbedder(ImageEmbedder):
    """A torch module from a local safetensors checkpoint; output ``[B, D]`` is L2-normalised.

    Args:
        model: the module, or a factory (Hydra ``_partial_: true``) building it.
        checkpoint_path: local ``.safetensors`` state dict (None keeps the module's own weights).
        input_size: square input side ``S``.
        mean, std: per-channel normalisation (ImageNet/CLIP statistics for such backbones; None = [0, 1]).
        batch_size: images per forward.
    """

    def __init__(
        self,
        model: Callable[[], Any] | Any,
        checkpoint_path: str | Path | None = None,
        input_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 32,
        device: str = "cpu",
    ):
        self._model_factory = model
        self.model = describe_callable(model)
        self.checkpoint_path = str(checkpoint_path) if checkpoint_path is not None else None
        self.input_size = int(input_size)
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.batch_size = int(batch_size)
        self.device = device
        self._module = None

    def setup(self) -> None:
        if self._module is None:
            self._module = load_safetensors_module(self._model_factory, self.checkpoint_path, self.device)

    def _forward(self, x):
        return self._module(x)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        self.setup()
        outs = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = images_to_tensor(images[i : i + self.batch_size], self.input_size, self.mean, self.std)
                y = self._forward(x.to(self.device))
                outs.append(y.reshape(y.shape[0], -1).float().cpu().numpy())
        return _l2n(np.concatenate(outs)) if outs else np.zeros((0, 1), np.float32)

    def __getstate__(self):  # workers rebuild the module in setup(); never pickle weights
        state = dict(self.__dict__)
        state["_module"] = None
        return state


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPEmbedder(TorchEmbedder):
    """CLIP / SigLIP image features (``get_image_features``) from a local ``transformers`` folder."""

    def __init__(
        self,
        path: str | Path,
        input_size: int = 224,
        batch_size: int = 32,
        device: str = "cpu",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        super().__init__(
            model=None,
            checkpoint_path=None,
            input_size=input_size,
            mean=mean,
            std=std,
            batch_size=batch_size,
            device=device,
        )
        self.model = "CLIP"
        self.path = str(path)

    def setup(self) -> None:
        if self._module is None:
            from transformers import AutoModel

            if not Path(self.path).is_dir():
                raise FileNotFoundError(
                    f"CLIP model folder not found: {self.path} (no hub access: use a local copy)"
                )
            self._module = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()

    def _forward(self, x):
        out = self._module.get_image_features(pixel_values=x)
        return out if not hasattr(out, "pooler_output") else out.pooler_output
