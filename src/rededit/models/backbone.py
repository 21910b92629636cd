"""The editing backbone: diffusers' ``QwenImageTransformer2DModel`` wrapped for flow-matching training (§3.1).

Sequence layout (mirrors ``QwenImageEditPlusPipeline``)::

    image stream = [ target tokens (noisy, frame 0) | ref 1 tokens (clean, frame 1) | ... | ref K (frame K) ]
    text stream  = [ text tokens (masked per sample) ]

3-D unified RoPE: all image frames share centred spatial coordinates and differ by the frame index
(``img_shapes``, see :mod:`rededit.models.packing`). Distinct time conditioning of clean references
(§3.1) is diffusers' ``zero_cond_t`` option: the transformer embeds both ``σ`` and ``0``; the adaLN
modulation of target tokens uses ``emb(σ)`` and that of reference tokens ``emb(0)`` ("clean"), while the
text stream and the output norm keep ``emb(σ)``. It adds no parameters, so it can be switched on for a
checkpoint trained without it (as Qwen-Image-Edit-2511 does).

Pretrained folders (issue 19): a published editor's ``transformer/config.json`` says what it was trained with,
and it wins. ``zero_cond_t=None`` (the ``qwen_image`` presets) takes the folder's value (Qwen-Image and
Qwen-Image-Edit-2509 have no such key: off; Qwen-Image-Edit-2511 has ``"zero_cond_t": true``); ``True``/``False``
overrides it, with a warning naming both values. ``expected_config`` (the variant presets
``conf/backbone/qwen_image_*.yaml``, ``firered_edit_1_0.yaml``) is checked against the folder's config file
(absent keys read as diffusers' defaults) *before* any weight is read, and a mismatch is an error naming the key,
the file and both values. When the transformer sits in a diffusers pipeline folder (``<folder>/transformer``
with ``<folder>/model_index.json``), :attr:`EditBackbone.pipeline_folder` names that folder and
:attr:`EditBackbone.scheduler_config` holds its ``scheduler/scheduler_config.json``, which the Euler sampler
(:mod:`rededit.flow.sampler`) uses instead of its Qwen-Image constants.

Timestep scale: the transformer's sinusoidal projection multiplies its input by 1000 and the diffusers
pipelines pass ``scheduler_t / 1000 = σ``; we therefore pass ``σ ∈ [0, 1]`` directly.

Source residual (optional, ``source_residual=True``, x0-prediction only): the network predicts the
*change* ``x̂0 − z_ref1`` and the source latent of Picture 1 (resized to the target's latent grid when the
shapes differ, zero for T2I) is added back. References still enter as tokens, so multi-reference editing
is unchanged; the residual only makes "leave unedited pixels alone" the zero-output default, which a
2.6M-parameter CPU model otherwise spends most of its budget learning (docs/demo-design.md). Off by
default and off in the ``qwen_image`` preset (Qwen-Image-Edit has no such path).

Text masking: ``text_mask`` is passed as ``encoder_hidden_states_mask``; diffusers 0.42.1 turns it into a
key mask of the joint attention and places text RoPE positions by index (padding only at the end does not
move valid tokens), so a sample's prediction is independent of how much padding its batch needs
(tested: bs=1 unpadded vs bs=3 padded agree to 1e-5 in fp32).

FireEdit options (optional, off by default, :mod:`rededit.models.fireedit`): ``region_tokens`` (boxes → extra
tokens of the text stream), ``tati`` (σ-conditioned gate on the text stream) and ``hvca`` (cross-attention
from target tokens to a pyramid of Picture 1 features after every k-th block). Each is ``false`` (nothing
is built: state dict and outputs are those of the plain backbone), ``true`` (defaults) or a dict of the
module's options. ``tati`` and ``hvca`` are zero-initialised, so switching them on equals "off" at init.
Their weights live outside ``transformer`` (keys ``region_tokens.*``, ``tati.*``, ``hvca.*``).

Edit gate (optional, ``edit_gate``, off by default, :mod:`rededit.models.edit_gate`; x0-prediction with source
residual only): a per-latent-pixel gate on the predicted change, ``x̂0 = z_ref1 + sigmoid(g) ⊙ Δ``, with ``g``
from a linear head on the transformer's final image hidden states; ``{gate: false}`` builds the head for the
stage's localisation loss only. Off builds nothing; weights under ``edit_gate.*``, exported like FireEdit's.

Pixel head (optional, ``pixel_head``, off by default, :mod:`rededit.models.pixel_head`; x0-prediction with source
residual only): a per-pixel decoder that adds to the change a term computed from each token's final hidden state
and the pixel's own value in Picture 1 (and in ``x_t`` with ``noisy``), so a change can follow an outline inside a
token; with ``gate`` it also adds a per-pixel term to the edit gate's logit. Off builds nothing; weights under
``pixel_head.*``, zero-initialised output (the init still returns Picture 1).

Source input (optional, ``source_in``, off by default, :mod:`rededit.models.source_in`; needs ``source_residual``):
Picture 1's token at the same place added to each target token's input embedding (channel-concat conditioning as a
sum after ``img_in``), zero-initialised; for editors trained from scratch (a published checkpoint has no such
weight). Weights under ``source_in.*``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rededit.models.block_swap import BlockSwap
from rededit.models.edit_gate import EditGate, capture_output
from rededit.models.fireedit import (
    HVCA_KEY,
    HybridVisualCrossAttention,
    RegionTokens,
    TimeAwareTargetInjection,
    append_tokens,
    normalize_boxes,
)
from rededit.models.packing import img_shapes_for, pack_latents, unpack_latents
from rededit.models.pixel_head import PixelHead
from rededit.models.source_in import SourceIn
from rededit.models.vae import as_dtype
from rededit.utils.logging import get_logger
from rededit.utils.offline import require_local_folder

log = get_logger(__name__)

Prediction = Literal["v", "x0"]


def _option(value: Any, name: str) -> dict[str, Any] | None:
    """``false``/``None`` → None (off); ``true`` → ``{}`` (defaults); a mapping → its options."""
    value = _plain(value)
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f"backbone.{name} must be true, false or a dict of options, got {value!r}")


def _plain(value: Any) -> Any:
    """OmegaConf containers → plain Python (diffusers' config serialisation needs JSON-able values)."""
    if isinstance(value, Mapping) or type(value).__name__ == "DictConfig":
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def pipeline_folder_of(pretrained_path: str | Path, subfolder: str | None) -> Path | None:
    """The diffusers pipeline folder a transformer folder belongs to, or None.

    ``(F, "transformer")`` → ``F``; ``(F/transformer, None)`` → ``F`` (an export's bare transformer folder);
    either only when ``F/model_index.json`` exists.
    """
    path = Path(pretrained_path)
    if subfolder:
        root = path
    elif path.name == "transformer":
        root = path.parent
    else:
        return None
    return root if (root / "model_index.json").is_file() else None


def read_scheduler_config(pipeline_folder: str | Path | None) -> dict[str, Any] | None:
    """``<pipeline_folder>/scheduler/scheduler_config.json`` as a dict, or None when there is none."""
    if pipeline_folder is None:
        return None
    path = Path(pipeline_folder) / SCHEDULER_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def folder_transformer_config(
    pretrained_path: str | Path, subfolder: str | None
) -> tuple[dict[str, Any], Path]:
    """The transformer config a folder holds, with diffusers' defaults for absent keys, and its file.

    Read without loading weights, so a wrong folder fails before tens of GB are read.
    """
    from diffusers import QwenImageTransformer2DModel

    file = Path(pretrained_path) / (subfolder or "") / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: no transformer config (backbone.pretrained_path, subfolder={subfolder})"
        )
    found = json.loads(file.read_text(encoding="utf-8"))
    params = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    config = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    config.update({k: v for k, v in found.items() if not k.startswith("_")})
    return _plain(config), file


def check_expected_config(
    config: Mapping[str, Any], expected: Mapping[str, Any] | None, source: Any, variant: str | None = None
) -> None:
    """Raise ``ValueError`` naming the key, ``source`` (the folder's config file) and both values when ``config``
    differs from ``expected`` anywhere."""
    for key, want in _plain(expected or {}).items():
        have = _plain(config.get(key))
        if have != want:
            who = f"the preset backbone={variant}" if variant else "backbone.expected_config"
            raise ValueError(
                f"backbone.expected_config.{key}: {who} expects {key}={want!r} but {source} has {key}={have!r}; "
                "pick the preset of the variant this folder holds (conf/backbone/), or another folder"
            )


class EditBackbone(nn.Module):
    """Velocity predictor ``v̂(x_t, σ, refs, text)`` over a ``QwenImageTransformer2DModel``.

    Args:
        transformer_config: ``QwenImageTransformer2DModel`` kwargs for a fresh model (tiny/small presets).
        pretrained_path: local folder for ``from_pretrained`` (exclusive with ``transformer_config``).
        subfolder: subfolder of ``pretrained_path`` (``"transformer"`` for a pipeline folder; ``None`` for a
            bare transformer folder).
        torch_dtype: dtype to load/cast the transformer in (``None``: keep).
        latent_channels: if given (the stage passes ``vae.latent_channels``), fills missing
            ``in_channels``/``out_channels`` in ``transformer_config`` as ``C·p²`` / ``C`` and otherwise
            checks that the preset agrees with the VAE.
        zero_cond_t: condition reference tokens on ``σ = 0`` (see module doc). ``None``: the loaded folder's
            config decides (off for a fresh transformer); ``True``/``False`` overrides the folder (logged).
        prediction: ``"v"`` (default; what Qwen-Image is trained for) or ``"x0"``: the network output is read
            as ``x̂0`` and converted to ``v = (x_t − x̂0) / max(σ, x0_sigma_min)`` (docs/demo-design.md: helps
            tiny CPU models whose token width exceeds the hidden width).
        x0_sigma_min: ``σ_min`` of the x0 conversion. Let ``σ_c = max(σ, σ_min)``; the output is
            ``v̂ = (x_t − x̂0)/σ_c``. Without the floor ``v̂`` and a v-space loss blow up as ``1/σ`` near clean
            data. The conversion is exact for ``σ ≥ σ_min``; below it ``v̂`` is the true velocity scaled by
            ``σ/σ_c``, so (i) the training target must be scaled the same way, use
            :meth:`velocity_target` (then ``‖v̂ − v_c‖² = ‖x̂0 − x0‖²/σ_c²``, minimised at ``x̂0 = x0``), and
            (ii) :meth:`predicted_x0` / :meth:`exact_velocity` undo it (the Euler sampler uses the latter, so
            its final step lands exactly on ``x̂0``). In ``"v"`` mode all three are the plain formulas.
        gradient_checkpointing: recompute each transformer block in backward (diffusers' mechanism).
        source_residual: x0-prediction relative to Picture 1's latent (see module doc).
        zero_init_output: for a fresh transformer, zero the final projection (``proj_out``) as DiT does
            (adaLN-Zero style), so training starts from a constant prediction — with ``source_residual``
            that is exactly "return Picture 1 unchanged". Ignored when loading pretrained weights.
        expected_config: config values the transformer must have; with ``pretrained_path`` checked against the
            folder's ``config.json`` before loading (the ``qwen_image`` presets list the 20B architecture and, per
            variant, ``zero_cond_t``, so a wrong folder fails loudly).
        variant: the preset's name (``qwen_image_edit_2511``, ...), for messages, logs and the export's model card.
        region_tokens: FireEdit region tokens (:class:`~rededit.models.fireedit.RegionTokens` options:
            ``pool_size``, ``num_freqs``, ``max_regions``); boxes come through ``forward(regions=...)``.
        tati: Time-Aware Target Injection (:class:`~rededit.models.fireedit.TimeAwareTargetInjection`
            options: ``hidden_dim``, ``freq_dim``).
        hvca: Hybrid Visual Cross Attention (:class:`~rededit.models.fireedit.HybridVisualCrossAttention`
            options: ``every``, ``scales``, ``num_heads``).
        edit_gate: the edit gate (:class:`~rededit.models.edit_gate.EditGate` options: ``gate``, ``init_bias``);
            the last forward's logits ``[B, 1, h, w]`` are :attr:`last_gate_logits` (the stage's mask loss).
        pixel_head: the per-pixel change decoder (:class:`~rededit.models.pixel_head.PixelHead` options:
            ``pixels``, ``features``, ``hidden``, ``noisy``, ``gate``); x0-prediction with ``source_residual``
            only (``gate`` also needs ``edit_gate``); the logits are then per pixel, ``[B, pixels, h, w]``.
        source_in: add Picture 1's packed token to each target token's input embedding
            (:class:`~rededit.models.source_in.SourceIn`); needs ``source_residual``.
        block_swap: keep the frozen weights of the last ``block_swap`` transformer blocks on the CPU and stream
            them to the device per forward with prefetch (:mod:`rededit.models.block_swap`; 0: off). Saves memory
            in training only with ``gradient_checkpointing``; streams frozen weights only (an adapter run's base).
    """

    def __init__(
        self,
        transformer_config: Mapping[str, Any] | None = None,
        pretrained_path: str | None = None,
        subfolder: str | None = "transformer",
        torch_dtype: str | torch.dtype | None = None,
        patch_size: int = 2,
        latent_channels: int | None = None,
        zero_cond_t: bool | None = None,
        prediction: Prediction = "v",
        x0_sigma_min: float = 0.05,
        gradient_checkpointing: bool = False,
        expected_config: Mapping[str, Any] | None = None,
        source_residual: bool = False,
        zero_init_output: bool = False,
        region_tokens: bool | Mapping[str, Any] = False,
        tati: bool | Mapping[str, Any] = False,
        hvca: bool | Mapping[str, Any] = False,
        variant: str | None = None,
        edit_gate: bool | Mapping[str, Any] = False,
        block_swap: int = 0,
        pixel_head: bool | Mapping[str, Any] = False,
        source_in: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import QwenImageTransformer2DModel

        if (transformer_config is None) == (pretrained_path is None):
            raise ValueError("EditBackbone needs exactly one of `transformer_config` or `pretrained_path`")
        dtype = as_dtype(torch_dtype)
        self.variant = variant
        self.pipeline_folder: Path | None = None
        self.scheduler_config: dict[str, Any] | None = None
        if pretrained_path is not None:
            require_local_folder(pretrained_path, "backbone.pretrained_path")
            found, config_file = folder_transformer_config(pretrained_path, subfolder)
            check_expected_config(found, expected_config, config_file, variant)
            self.pipeline_folder = pipeline_folder_of(pretrained_path, subfolder)
            self.scheduler_config = read_scheduler_config(self.pipeline_folder)
            kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
            if subfolder:
                kwargs["subfolder"] = subfolder
            self.transformer = QwenImageTransformer2DModel.from_pretrained(pretrained_path, **kwargs)
            log.info("loaded QwenImageTransformer2DModel from %s (subfolder=%s)", pretrained_path, subfolder)
        else:
            cfg = _plain(transformer_config)
            cfg.setdefault("patch_size", patch_size)
            if latent_channels is not None:
                cfg.setdefault("in_channels", latent_channels * patch_size**2)
                cfg.setdefault("out_channels", latent_channels)
            cfg["zero_cond_t"] = bool(zero_cond_t)  # None (unset) = off for a fresh transformer
            self.transformer = QwenImageTransformer2DModel(**cfg)
            if zero_init_output:
                # diffusers initialises proj_out randomly; its gradient does not depend on its own weights,
                # so a zero start still trains (DiT, Peebles & Xie 2023, zero-initialises the same layer).
                nn.init.zeros_(self.transformer.proj_out.weight)
                nn.init.zeros_(self.transformer.proj_out.bias)
            if dtype is not None:
                self.transformer.to(dtype)

        tcfg = self.transformer.config
        if pretrained_path is None:
            check_expected_config(dict(tcfg), expected_config, "the transformer_config", variant)
        else:
            folder_value = bool(tcfg.get("zero_cond_t", False))
            if zero_cond_t is None:
                zero_cond_t = folder_value  # the folder's config wins
            elif bool(zero_cond_t) != folder_value:
                log.warning(
                    "backbone.zero_cond_t=%s overrides zero_cond_t=%s of %s (the export records %s)",
                    bool(zero_cond_t),
                    folder_value,
                    pretrained_path,
                    bool(zero_cond_t),
                )
        if tcfg.patch_size != patch_size:
            raise ValueError(
                f"packing patch_size={patch_size} but the transformer has patch_size={tcfg.patch_size}"
            )
        self.patch_size = patch_size
        self.latent_channels = tcfg.in_channels // patch_size**2
        if tcfg.in_channels % patch_size**2 or self.transformer.out_channels != self.latent_channels:
            raise ValueError(
                f"transformer in_channels={tcfg.in_channels}, out_channels={self.transformer.out_channels} do not "
                f"describe C·{patch_size}² → C latents"
            )
        if latent_channels is not None and latent_channels != self.latent_channels:
            raise ValueError(
                f"the VAE gives {latent_channels} latent channels but the backbone preset expects "
                f"{self.latent_channels} (in_channels={tcfg.in_channels}); align conf/vae and conf/backbone"
            )
        if prediction not in ("v", "x0"):
            raise ValueError(f"prediction must be 'v' or 'x0', got {prediction!r}")
        if x0_sigma_min <= 0:
            raise ValueError("x0_sigma_min must be > 0")
        if source_residual and prediction != "x0":
            raise ValueError("source_residual needs prediction='x0' (the residual is on the predicted x0)")
        self.prediction: Prediction = prediction
        self.x0_sigma_min = float(x0_sigma_min)
        self.source_residual = bool(source_residual)
        self._build_fireedit(region_tokens, tati, hvca, dtype)
        self._build_edit_gate(edit_gate, dtype)
        self._build_pixel_head(pixel_head, dtype)
        self._build_source_in(source_in, dtype)
        self.set_zero_cond_t(zero_cond_t)
        self.set_gradient_checkpointing(gradient_checkpointing)
        self.block_swap = BlockSwap(self.transformer, int(block_swap)) if block_swap else None

    def _build_fireedit(self, region_tokens: Any, tati: Any, hvca: Any, dtype: torch.dtype | None) -> None:
        """Create only the FireEdit parts that are on (none: no parameter, no hook, no cost)."""
        tcfg = self.transformer.config
        text_dim = int(tcfg.joint_attention_dim)
        opts = _option(region_tokens, "region_tokens")
        self.region_tokens = None if opts is None else RegionTokens(self.latent_channels, text_dim, **opts)
        opts = _option(tati, "tati")
        self.tati = None if opts is None else TimeAwareTargetInjection(text_dim, **opts)
        opts = _option(hvca, "hvca")
        self.hvca = None
        if opts is not None:
            opts.setdefault("num_heads", int(tcfg.num_attention_heads))
            blocks = self.transformer.transformer_blocks
            self.hvca = HybridVisualCrossAttention(self.transformer.inner_dim, len(blocks), **opts)
            self.hvca.attach(blocks)
        for part in (self.region_tokens, self.tati, self.hvca):
            if part is not None and dtype is not None:
                part.to(dtype)
        self._context_regions: list[torch.Tensor | None] | None = None

    def _build_edit_gate(self, edit_gate: Any, dtype: torch.dtype | None) -> None:
        """Create the edit gate when asked (off: no parameter, no hook)."""
        opts = _option(edit_gate, "edit_gate")
        self.edit_gate = None
        self.last_gate_logits: torch.Tensor | None = None
        self.last_ungated_x0: torch.Tensor | None = None  # z_ref1 + Δ [B, C, h, w] (the stage's split loss)
        if opts is None:
            return
        if not self.source_residual:
            raise ValueError(
                "backbone.edit_gate needs prediction='x0' and source_residual=true (it gates the change)"
            )
        self.edit_gate = EditGate(self.transformer.inner_dim, self.patch_size, **opts)
        if dtype is not None:
            self.edit_gate.to(dtype)

    def _build_pixel_head(self, pixel_head: Any, dtype: torch.dtype | None) -> None:
        """Create the pixel head when asked (off: no parameter, no hook)."""
        opts = _option(pixel_head, "pixel_head")
        self.pixel_head = None
        if opts is None:
            return
        if not self.source_residual:
            raise ValueError(
                "backbone.pixel_head needs prediction='x0' and source_residual=true (it decodes the change)"
            )
        if opts.get("gate") and self.edit_gate is None:
            raise ValueError(
                "backbone.pixel_head.gate needs backbone.edit_gate (it refines the gate per pixel)"
            )
        self.pixel_head = PixelHead(self.transformer.inner_dim, self.patch_size, self.latent_channels, **opts)
        if dtype is not None:
            self.pixel_head.to(dtype)

    def _build_source_in(self, source_in: bool, dtype: torch.dtype | None) -> None:
        """Create the source input when asked (off: no parameter, no hook)."""
        self.source_in = None
        if not source_in:
            return
        if not self.source_residual:
            raise ValueError(
                "backbone.source_in needs source_residual=true (it reads Picture 1 the same way)"
            )
        self.source_in = SourceIn(self.transformer.config.in_channels, self.transformer.inner_dim)
        if dtype is not None:
            self.source_in.to(dtype)

    @property
    def fireedit(self) -> dict[str, bool]:
        """Which FireEdit options are on."""
        return {
            "region_tokens": self.region_tokens is not None,
            "tati": self.tati is not None,
            "hvca": self.hvca is not None,
        }

    def batch_regions(self, batch: Mapping[str, Any]) -> list[torch.Tensor | None] | None:
        """``regions`` for :meth:`forward` from a training batch: its ``object_boxes`` (target pixels) normalised
        by the target's size; None when region tokens are off or the batch has no boxes."""
        if self.region_tokens is None or batch.get("object_boxes") is None:
            return None
        return normalize_boxes(batch["object_boxes"], tuple(batch["target"].shape[-2:]))

    @contextlib.contextmanager
    def using_regions(self, regions: Sequence[torch.Tensor | None] | None) -> Iterator[None]:
        """Default ``regions`` (``[0, 1]`` boxes) for every forward in the block (samplers call the backbone
        without them; both CFG branches see the same image regions)."""
        previous, self._context_regions = self._context_regions, None if regions is None else list(regions)
        try:
            yield
        finally:
            self._context_regions = previous

    # ----------------------------------------------------------------------------------------- switches
    def set_zero_cond_t(self, enabled: bool) -> None:
        """Toggle reference time conditioning at σ = 0 (no parameters involved, so exact on any checkpoint)."""
        enabled = bool(enabled)
        self.zero_cond_t = enabled
        self.transformer.zero_cond_t = enabled
        for block in self.transformer.transformer_blocks:
            block.zero_cond_t = enabled
        self.transformer.register_to_config(zero_cond_t=enabled)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()
        self.gradient_checkpointing = bool(enabled)

    def rebuild_rope(self) -> None:
        """Recreate the RoPE tables (plain tensor attributes, not buffers) after meta-device init + ``to_empty``.

        docs/architecture.md: they stay on ``meta`` otherwise (``Cannot copy out of meta tensor``).
        """
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope

        cls = QwenEmbedLayer3DRope if self.transformer.config.use_layer3d_rope else QwenEmbedRope
        self.transformer.pos_embed = cls(
            theta=10000, axes_dim=list(self.transformer.config.axes_dims_rope), scale_rope=True
        )

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        noisy_target: torch.Tensor,
        references: Sequence[torch.Tensor],
        sigma: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None,
        regions: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity ``v = ε − x0`` of the target (eq. of §3.3 rectified flow).

        Args:
            noisy_target: ``x_t`` ``[B, C, h, w]``.
            references: K clean reference latents ``[B, C, h_k, w_k]`` (K may be 0).
            sigma: noise level ``[B]`` (or scalar) in ``[0, 1]``.
            text_emb: ``[B, L, D_txt]``.
            text_mask: ``[B, L]`` bool, True on valid tokens (``None``: all valid).
            regions: per sample ``[O_i, 4]`` boxes (x0, y0, x1, y1) in ``[0, 1]`` of the image, or None; used by
                region tokens only (ignored when they are off). Default: those of :meth:`using_regions`.

        Returns:
            velocity ``[B, C, h, w]`` (float dtype of the transformer output).
        """
        if noisy_target.ndim != 4 or noisy_target.shape[1] != self.latent_channels:
            raise ValueError(
                f"noisy_target must be [B, {self.latent_channels}, h, w], got {tuple(noisy_target.shape)}"
            )
        b, _, h, w = noisy_target.shape
        for k, ref in enumerate(references):
            if ref.ndim != 4 or ref.shape[:2] != noisy_target.shape[:2]:
                raise ValueError(
                    f"reference {k} must be [B={b}, C={self.latent_channels}, h, w], got {tuple(ref.shape)}"
                )
        if text_emb.shape[0] != b or (
            text_mask is not None and tuple(text_mask.shape) != tuple(text_emb.shape[:2])
        ):
            raise ValueError("text_emb must be [B, L, D] and text_mask [B, L] with the latents' batch size")

        p = self.patch_size
        param_dtype = self.transformer.img_in.weight.dtype
        target_tokens = pack_latents(noisy_target, p)
        n_target = target_tokens.shape[1]
        hidden = torch.cat([target_tokens, *(pack_latents(r, p) for r in references)], dim=1)
        img_shapes = img_shapes_for((h, w), [tuple(r.shape[-2:]) for r in references], b, p)

        sigma = torch.as_tensor(sigma, device=noisy_target.device)
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma.reshape(b)
        mask = None if text_mask is None else text_mask.to(device=noisy_target.device, dtype=torch.bool)
        text_emb = text_emb.to(param_dtype)
        regions = self._context_regions if regions is None else regions
        if self.region_tokens is not None and regions is not None:
            source = references[0] if references else None
            extra = self.region_tokens(source, regions, b)
            if extra is not None:
                if mask is None:
                    mask = torch.ones(text_emb.shape[:2], dtype=torch.bool, device=text_emb.device)
                text_emb, mask = append_tokens(text_emb, mask, extra[0].to(text_emb.device), extra[1])
        if self.tati is not None:
            text_emb = self.tati(text_emb, sigma)
        attention_kwargs = None
        if self.hvca is not None and references:
            # Passed through the blocks' arguments, so checkpointed blocks recompute with the same context.
            ctx = self.hvca.context(self.transformer.img_in, references[0], (h, w), p)
            attention_kwargs = {HVCA_KEY: ctx}
        # Picture 1 on the target's latent grid: the residual's base, the pixel head's and the source input's
        # input (all need the residual mode), computed once.
        base = None
        if self.source_residual and references:
            base = self.residual_base(references[0], (h, w))
        gate = self.edit_gate
        # The gate and the pixel head read the final image hidden states (norm_out's output = proj_out's input).
        heads = gate is not None or self.pixel_head is not None
        capture = capture_output(self.transformer.norm_out) if heads else contextlib.nullcontext()
        source = (
            self.source_in.added_to(self.transformer.img_in, pack_latents(base.to(param_dtype), p))
            if self.source_in is not None and base is not None
            else contextlib.nullcontext()
        )
        with capture as final, source:
            out = self.transformer(
                hidden_states=hidden.to(param_dtype),
                encoder_hidden_states=text_emb,
                encoder_hidden_states_mask=mask,
                timestep=sigma.to(param_dtype),
                img_shapes=img_shapes,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
        # Target tokens come first in the image stream; reference outputs are discarded (as the pipeline does).
        pred = unpack_latents(out[:, :n_target], h, w, p)
        if base is not None:
            base = base.to(pred.dtype)
        pixel_logits = None
        if self.pixel_head is not None:
            change, pixel_logits = self.pixel_head(final[-1][:, :n_target], base, noisy_target, sigma)
            pred = pred + change.to(pred.dtype)
        if gate is not None:
            self.last_gate_logits = gate.logits(final[-1][:, :n_target], h, w)
            if pixel_logits is not None:  # per-pixel gate: the site's logit + the pixel's own term
                self.last_gate_logits = self.last_gate_logits + pixel_logits.to(self.last_gate_logits.dtype)
            self.last_ungated_x0 = None  # set below when there is a Picture 1
        if base is not None:
            if gate is not None:
                self.last_ungated_x0 = pred + base
                pred = gate.composite(pred, self.last_gate_logits)
            pred = pred + base
        if self.prediction == "x0":
            pred = self.velocity_from_x0(noisy_target.to(pred.dtype), pred, sigma.to(pred.dtype))
        return pred

    @staticmethod
    def residual_base(source: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Picture 1's latent ``[B, C, h, w]`` on the target's latent grid (bilinear when shapes differ)."""
        if tuple(source.shape[-2:]) == tuple(hw):
            return source
        return torch.nn.functional.interpolate(source, size=hw, mode="bilinear", align_corners=False)

    def velocity_from_x0(self, x_t: torch.Tensor, x0_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``v̂ = (x_t − x̂0) / max(σ, σ_min)`` with ``σ`` ``[B]`` broadcast over ``[B, C, h, w]``."""
        return (x_t - x0_hat) / self._bcast(self.effective_sigma(sigma), x_t)

    def effective_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """``σ_c``: ``σ`` in ``"v"`` mode, ``max(σ, σ_min)`` in ``"x0"`` mode (``[B]``)."""
        sigma = torch.as_tensor(sigma)
        return sigma.clamp_min(self.x0_sigma_min) if self.prediction == "x0" else sigma

    def velocity_target(self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Training target matching this backbone's output: ``(ε − x0)·σ/σ_c`` ``[B, C, h, w]``.

        Equals ``ε − x0`` in ``"v"`` mode and in ``"x0"`` mode for ``σ ≥ σ_min``.
        """
        v = eps - x0
        if self.prediction == "v":
            return v
        sigma = torch.as_tensor(sigma, device=v.device, dtype=v.dtype)
        return v * self._bcast(sigma / self.effective_sigma(sigma), v)

    def predicted_x0(self, x_t: torch.Tensor, v_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x̂0 = x_t − σ_c·v̂`` (exact inverse of :meth:`forward` in both modes)."""
        sigma = torch.as_tensor(sigma, device=x_t.device, dtype=x_t.dtype)
        return x_t - self._bcast(self.effective_sigma(sigma), x_t) * v_hat

    def exact_velocity(self, v_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``(x_t − x̂0)/σ = v̂·σ_c/σ`` for ``σ > 0`` (the ODE velocity; identity in ``"v"`` mode)."""
        if self.prediction == "v":
            return v_hat
        sigma = torch.as_tensor(sigma, device=v_hat.device, dtype=v_hat.dtype)
        if (sigma <= 0).any():
            raise ValueError("exact_velocity needs σ > 0 (the ODE never evaluates the model at σ = 0)")
        return v_hat * self._bcast(self.effective_sigma(sigma) / sigma, v_hat)

    @staticmethod
    def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(device=x.device, dtype=x.dtype)
        return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma

    # ------------------------------------------------------------------------------- parameters / optim
    def unused_text_tail_names(self) -> list[str]:
        """Parameters of the last block whose outputs only feed the (discarded) final text stream.

        After the last block the text hidden state is dropped, so in that block: the text query projection
        (``attn.add_q_proj``, ``attn.norm_added_q``) only produces text-row attention outputs, which only
        feed ``attn.to_add_out``, whose output and the text MLP (``txt_mlp``) only update the text stream.
        ``txt_norm1/2`` have no affine parameters. ``txt_mod`` is *not* listed: its shift/scale for norm1
        modulate the text keys/values that the image tokens attend to. ``to_add_out`` and ``txt_mlp`` get
        ``grad=None`` (DDP "unused parameters", FSDP2 optimizer-state reload errors, docs/architecture.md); the
        query projection gets exact zeros. Freezing all of them changes no output.
        """
        last = len(self.transformer.transformer_blocks) - 1
        prefixes = (
            f"transformer_blocks.{last}.attn.add_q_proj.",
            f"transformer_blocks.{last}.attn.norm_added_q.",
            f"transformer_blocks.{last}.attn.to_add_out.",
            f"transformer_blocks.{last}.txt_mlp.",
        )
        return [n for n, _ in self.transformer.named_parameters() if n.startswith(prefixes)]

    def freeze_unused_text_tail(self) -> list[str]:
        """Freeze :meth:`unused_text_tail_names` (kept in the state dict, left out of the optimizer).

        Returns:
            the frozen parameter names (relative to ``self.transformer``).
        """
        names = set(self.unused_text_tail_names())
        for name, param in self.transformer.named_parameters():
            if name in names:
                param.requires_grad_(False)
        return sorted(names)

    def trainable_parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay on weight matrices; none on biases, norm scales and embedding tables.

        Only ``requires_grad`` parameters are included (call :meth:`freeze_unused_text_tail` first).
        """
        no_decay_modules = (nn.LayerNorm, nn.GroupNorm, nn.Embedding)
        try:
            from diffusers.models.normalization import RMSNorm

            no_decay_modules = (*no_decay_modules, RMSNorm)
        except ImportError:  # pragma: no cover - diffusers always ships RMSNorm
            pass
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        seen: set[int] = set()
        for module in self.modules():
            for pname, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                # "*_embedding": FireEdit's learned type / scale embeddings (tables, like nn.Embedding)
                if (
                    isinstance(module, no_decay_modules)
                    or pname.endswith(("bias", "embedding"))
                    or param.ndim < 2
                ):
                    no_decay.append(param)
                else:
                    decay.append(param)
        groups = [{"params": decay, "weight_decay": float(weight_decay)}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)
