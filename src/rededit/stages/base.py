"""``BaseStage``: what every training stage shares (docs/architecture.md rule 2).

It owns the backbone (built in :meth:`configure_model`, so FSDP/DeepSpeed can wrap it first), the frozen
VAE and text encoder, the rectified-flow path (§3.3), the timestep sampler and curriculum (§3.3, §3.8),
the loss weighting (§3.8), optimizer param groups (Table 1: AdamW, weight decay without norms/biases,
warm-up) and ``init_from`` chaining. Stages override :meth:`compute_loss` (and add frozen copies).

Rectified flow (§3.3): ``x_t = (1 − σ) x_0 + σ ε``, velocity target ``v = ε − x_0``; the per-sample loss is
``w(σ) · mean((v̂ − v)²)`` with ``w`` the §3.8 weighting, normalised to mean 1 under uniform σ.

Randomness: noise and σ derive from (seed, epoch, data step, rank) — the data step comes with the batch
from the bucket sampler, so gradient accumulation never repeats noise and a resumed run draws exactly
what the uninterrupted run would have drawn. Validation draws each sample's σ and noise from (seed, sample
id) alone, without the curriculum, and weights regions with the starting α: a sample's ``val/loss`` term is
the same function of the weights at every validation, on any batching or world size.

Condition dropout (``text_drop_prob``, ``ref_drop_prob``; :func:`condition_drops`) is drawn the same way, from
(seed, epoch, data step, rank), in training only: a dropped text becomes the embedding of the CFG negative
prompt through the same template and condition images, i.e. exactly the negative branch diffusers' Qwen-Image
pipelines (and :meth:`BaseStage.generate`) compute at inference, so true CFG has a learned unconditional branch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from rededit.flow.path import interpolate
from rededit.flow.sampler import euler_sample
from rededit.flow.weighting import loss_weight, region_weights
from rededit.models import adapters, frozen_base
from rededit.models.backbone import EditBackbone
from rededit.models.edit_gate import mask_loss, mask_targets
from rededit.models.fireedit import normalize_boxes
from rededit.models.text_encoder import pad_embeddings
from rededit.parallel import ParallelPlan, load_full_state, meta_init, parallelize_backbone
from rededit.parallel.stage_support import check_stage_strategy, strategy_kind
from rededit.stages.checkpoints import adapter_backbone_from_checkpoint, load_backbone_state
from rededit.utils.logging import get_logger
from rededit.utils.module_tree import hidden_from_tree
from rededit.utils.seeding import derive_seed, torch_generator

# Weighting schemes that ``stage.weighting.relative`` may replace (both mean "plain x0 error" for the ratio).
RELATIVE_SCHEMES = ("uniform", "x0_mse")

log = get_logger(__name__)

# Distinct streams per (epoch, data step): the sampler's step restarts each epoch.
STEPS_PER_EPOCH_STRIDE = 10_000_000


#: diffusers' empty negative prompt: QwenImageEditPlusPipeline / QwenImagePipeline run true CFG only when given a
#: negative prompt and document " " as the empty one (the Qwen-Image model cards pass it too).
DEFAULT_NEGATIVE_PROMPT = " "


def condition_drops(
    seed: int, micro_step: int, rank: int, batch_size: int, *, text_prob: float, ref_prob: float
) -> tuple[torch.Tensor, bool]:
    """Condition dropout of one training batch: which samples lose their text (``[B]`` bool, each with
    probability ``text_prob``) and whether the batch loses its reference images (probability ``ref_prob``;
    per batch, since every sample of a batch has the same reference positions). Drawn from (seed, epoch ×
    stride + data step, rank) like the noise, so a resumed run drops exactly what the uninterrupted run did."""
    text = torch.zeros(batch_size, dtype=torch.bool)
    if text_prob > 0:
        gen = torch_generator(seed, "text_drop", micro_step, rank)
        text = torch.rand(batch_size, generator=gen, dtype=torch.float64) < text_prob
    refs = False
    if ref_prob > 0:
        gen = torch_generator(seed, "ref_drop", micro_step, rank)
        refs = bool(torch.rand((), generator=gen, dtype=torch.float64) < ref_prob)
    return text, refs


def lr_factor(step: int, *, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up over ``warmup`` steps, then constant
    (``decay="none"``) or a cosine from 1 to ``min_ratio`` at step ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "cosine" and total > warmup:
        progress = min(1.0, (step - warmup) / (total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class BaseStage(L.LightningModule):
    """Shared flow-matching stage.

    Args:
        backbone: factory ``(latent_channels=...) -> EditBackbone`` (a Hydra ``_partial_``).
        vae: frozen :class:`~rededit.models.vae.LatentVAE` (not saved in checkpoints; rebuilt from config).
        text_encoder: frozen :class:`~rededit.models.text_encoder.TextEncoder`; used when a batch has no
            ``text_emb`` (the datamodule may already have encoded it, from the cache or online).
        timesteps: a :class:`~rededit.flow.timesteps.TimestepSampler` (uniform / logit-normal / stratified).
        curriculum: optional :class:`~rededit.flow.curriculum.ProgressiveTimestepCurriculum` (§3.3).
        weighting: ``{scheme, mean, std}`` for :func:`~rededit.flow.weighting.loss_weight` (§3.8), plus an
            optional ``region_weight`` α ≥ 0 (default 0, off): per-pixel weights ``1 + α·edit_mask``, renormalised
            to mean 1 per sample (:func:`~rededit.flow.weighting.region_weights`), for samples with a mask;
            ``region_weight_final`` (default: the same α) anneals α along a cosine to that value at
            ``trainer.max_steps`` (learn *what* to edit early, preservation late); and ``mask_loss`` λ ≥ 0
            (default 0, off): λ × the localisation loss (G2) of :mod:`rededit.models.edit_gate` between the
            backbone's edit-gate logits and the edit mask, added to each sample's loss (needs ``backbone.edit_gate``);
            ``gate_split`` (default false): samples with a usable mask train the ungated prediction on their
            edited pixels only (G3 of :mod:`rededit.models.edit_gate`) instead of the composite, so the gate
            (trained by (G2), needs ``mask_loss`` > 0) alone decides where; α is then unused for them;
            ``relative`` (default false): each sample's loss is its x0-space error over the error of returning
            Picture 1 (zeros for T2I) under the same pixel weights — the per-sample edit ratio the demo report
            scores — so a small object edit pulls as hard as a whole-image repaint (:meth:`relative_mse`).
        optimizer: factory ``(param_groups) -> Optimizer`` (``_partial_`` AdamW of Table 1).
        weight_decay: decay of weight matrices (norms, biases and embeddings get none).
        warmup_steps: linear LR warm-up (Table 1: 0 for Pretrain/CT, 500 for SFT/DPO).
        lr_decay: ``"none"`` (constant after warm-up; Table 1) or ``"cosine"``: from the peak to
            ``min_lr_ratio`` × peak at ``trainer.max_steps`` (short CPU runs end far better annealed).
        min_lr_ratio: floor of the cosine decay.
        init_from: previous stage's checkpoint (file or run folder): backbone weights only (§3, Fig. 8).
        init_from_ema: take the EMA weights of ``init_from`` when it has them.
        seed: base of every random draw.
        num_tbins: σ bins for ``train/loss_tbin{k}``.
        sample_steps / cfg_scale: inference settings for :meth:`generate`.
        negative_prompt: text of the CFG negative branch and of dropped texts (default " ", diffusers'
            documented empty negative prompt; encoded through the same template and condition images).
        text_drop_prob: probability that a training sample's text is replaced by the negative prompt's
            embedding (condition dropout for CFG; FireRed's trainer drops 5 %). Applies to the flow-matching
            loss (:meth:`flow_loss`: Pretrain/CT/SFT), never to validation.
        ref_drop_prob: probability that a training batch loses its reference images and becomes text-to-image
            (its texts re-encoded with the T2I template when the encoder sees images); default 0.
        compile_backbone: ``torch.compile`` the transformer in place (state-dict keys unchanged).
        preserve_base: ``{except_tasks: [...], weight: 1.0}`` or None (off): with an adapter, rows of every task
            *not* listed train toward the base's own prediction (the adapter switched off, same ``x_t``, σ and
            conditions) instead of their ground truth, their loss multiplied by ``weight``, so the adapter learns the listed (new) tasks and keeps the base's
            behaviour on the rest; the base's prediction costs one extra no-grad forward per batch. In the spirit
            of ai-toolkit's "differential output preservation" and DreamBooth's prior preservation, with the
            regularisation rows' targets taken from the base instead of from their ground truth.
        adapter: the ``adapter`` node (conf/adapter/, :mod:`rededit.models.adapters`): ``type: none`` (or None)
            trains every weight; ``lora`` / ``lokr`` / ``loha`` inject a PEFT adapter after ``init_from`` loaded
            the base, so only the adapter (and FireEdit modules) trains, and checkpoints and the EMA hold only
            those weights (docs/adapters.md).
    """

    # Whether the stage trains with :meth:`flow_loss` (what ``preserve_base`` acts on); DPO and NFT have their own.
    trains_flow_loss = True

    def __init__(
        self,
        *,
        backbone: Callable[..., EditBackbone],
        vae: nn.Module,
        text_encoder: nn.Module | None = None,
        timesteps: Any,
        curriculum: Any | None = None,
        weighting: Mapping[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer],
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_decay: str = "none",
        min_lr_ratio: float = 0.1,
        init_from: str | None = None,
        init_from_ema: bool = True,
        seed: int = 0,
        num_tbins: int = 4,
        sample_steps: int = 8,
        cfg_scale: float = 1.0,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        text_drop_prob: float = 0.0,
        ref_drop_prob: float = 0.0,
        compile_backbone: bool = False,
        adapter: Mapping[str, Any] | None = None,
        preserve_base: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.adapter = None if not adapters.is_enabled(adapter) else adapters.plain(adapter)
        # adapter.base_dtype / adapter.quantize (models/frozen_base.py), checked before anything is built
        self._frozen_base = frozen_base.options(adapters.plain(adapter))
        self.preserve_except: frozenset[str] | None = None
        self.preserve_weight = 1.0
        if preserve_base is not None:
            unknown = set(preserve_base) - {"except_tasks", "weight"}
            if unknown or self.adapter is None or not self.trains_flow_loss:
                raise ValueError(
                    "stage.preserve_base takes {except_tasks: [...]}, needs an adapter (the base is the adapter-off "
                    f"model) and a flow-matching stage ({type(self).__name__}); got {dict(preserve_base)} with adapter={adapter and dict(adapter).get('type')}"
                )
            self.preserve_except = frozenset(str(t) for t in preserve_base.get("except_tasks") or ())
            self.preserve_weight = float(preserve_base.get("weight", 1.0))
        self._base_fingerprint: float | None = None
        self.backbone_factory = backbone
        self.backbone: EditBackbone | None = None
        self._vae = hidden_from_tree(vae)
        self._text_encoder = hidden_from_tree(text_encoder)
        self.timesteps = timesteps
        self.curriculum = curriculum
        self.weighting = dict(weighting or {"scheme": "uniform"})
        self.region_weight = float(self.weighting.pop("region_weight", 0.0) or 0.0)
        final = self.weighting.pop("region_weight_final", None)
        self.region_weight_final = self.region_weight if final is None else float(final)
        if self.region_weight < 0 or self.region_weight_final < 0:
            raise ValueError(
                f"stage.weighting.region_weight(_final) must be >= 0, got {self.region_weight}, {self.region_weight_final}"
            )
        self.mask_loss_weight = float(self.weighting.pop("mask_loss", 0.0) or 0.0)
        if self.mask_loss_weight < 0:
            raise ValueError(f"stage.weighting.mask_loss must be >= 0, got {self.mask_loss_weight}")
        self.gate_split = bool(self.weighting.pop("gate_split", False))
        self.relative = bool(self.weighting.pop("relative", False))
        if self.relative and (
            self.gate_split
            or self.preserve_except is not None
            or self.weighting.get("scheme", "uniform") not in RELATIVE_SCHEMES
        ):
            raise ValueError(
                "stage.weighting.relative is an x0-space ratio: it replaces w(σ) (scheme must be one of "
                f"{RELATIVE_SCHEMES}) and is not defined with gate_split or preserve_base"
            )
        if self.gate_split and self.mask_loss_weight <= 0:
            raise ValueError(
                "stage.weighting.gate_split needs stage.weighting.mask_loss > 0 (the gate learns where from it)"
            )
        self.optimizer_factory = optimizer
        self.weight_decay = float(weight_decay)
        self.warmup_steps = int(warmup_steps)
        if lr_decay not in ("none", "cosine"):
            raise ValueError(f"stage.lr_decay must be 'none' or 'cosine', got {lr_decay!r}")
        self.lr_decay = lr_decay
        self.min_lr_ratio = float(min_lr_ratio)
        self.init_from = init_from
        self.init_from_ema = init_from_ema
        self.seed = int(seed)
        self.num_tbins = int(num_tbins)
        self.sample_steps = int(sample_steps)
        self.cfg_scale = float(cfg_scale)
        self.negative_prompt = negative_prompt
        for name, value in (("text_drop_prob", text_drop_prob), ("ref_drop_prob", ref_drop_prob)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"stage.{name} must be in [0, 1], got {value}")
        self.text_drop_prob = float(text_drop_prob)
        self.ref_drop_prob = float(ref_drop_prob)
        self._negative_memo: dict[str, torch.Tensor] = {}
        self.compile_backbone = bool(compile_backbone)
        self.skipped_samples = 0

    # ------------------------------------------------------------------ frozen parts
    @property
    def vae(self) -> nn.Module:
        return self._vae[0]

    @property
    def text_encoder(self) -> nn.Module | None:
        return self._text_encoder[0]

    def _move_frozen(self) -> None:
        for part in (self.vae, self.text_encoder):
            if part is not None:
                part.to(self.device)

    # ------------------------------------------------------------------ model
    def parallel_plan(self) -> Any | None:
        """The strategy's :class:`~rededit.parallel.ParallelPlan` under FSDP2/HSDP (``ModelParallelStrategy``),
        else None (DDP / single device / FSDP1 / DeepSpeed wrap the module themselves)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, ModelParallelStrategy):
            return None
        return getattr(strategy, "plan", None) or ParallelPlan()

    def parallel_mesh(self) -> Any:
        mesh = self.device_mesh
        # Our FSDP2Strategy mesh is ("shard",) or ("replicate", "shard"); Lightning's own is (data, tensor).
        return mesh if "shard" in (mesh.mesh_dim_names or ()) else mesh["data_parallel"]

    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        plan = self.parallel_plan()
        self._deferred_init_from = None
        if plan is not None and plan.meta_init:
            if not self.init_from and self._trainer.ckpt_path is None:
                raise ValueError(
                    "strategy.parallelize.meta_init=true builds the backbone without weights: set stage.init_from "
                    "or ckpt_path (or meta_init=false for a fresh random backbone)"
                )
            self.backbone = meta_init(self.backbone_factory, latent_channels=self.vae.latent_channels)
            with torch.device(self._trainer.strategy.root_device):
                self.backbone.rebuild_rope()  # plain tensors: Lightning's to_empty would leave them on meta
        else:
            self.backbone = self.backbone_factory(latent_channels=self.vae.latent_channels)
        frozen = self.backbone.freeze_unused_text_tail()
        n_params = sum(p.numel() for p in self.backbone.parameters())
        blocks = self.backbone.transformer.transformer_blocks
        n_ckpt = len(blocks) if getattr(self.backbone.transformer, "gradient_checkpointing", False) else 0
        if plan is not None:
            if self.init_from and not plan.meta_init:
                # Full weights on every rank first, then shard (meta_init avoids the full copy).
                self.load_backbone_from(self.init_from, use_ema=self.init_from_ema)
            elif self.init_from:
                self._deferred_init_from = self.init_from  # after Lightning materialises the shards
            self._apply_adapter(plan)  # before sharding: the adapter tensors are sharded with their layers
            self.adapter_applied()  # a stage's extra adapters (NFT's old policy) are sharded with them too
            parallelize_backbone(self.backbone, self.parallel_mesh(), plan)
        elif self.init_from:
            self.load_backbone_from(self.init_from, use_ema=self.init_from_ema)
        if plan is None:
            self._apply_adapter(plan)  # after the base weights: a full-model init_from loads into the base
            self.adapter_applied()
        if self.compile_backbone:
            self.backbone.transformer.compile()  # in place: parameter names and checkpoints are unchanged
        precision = self._trainer.precision if self._trainer is not None else "n/a"
        log.info(
            "backbone: %.2fM params (%d frozen text-tail tensors), param dtype %s, trainer precision %s, "
            "prediction=%s, zero_cond_t=%s, source_residual=%s, gradient checkpointing on %d/%d blocks, "
            "torch.compile %s",
            n_params / 1e6,
            len(frozen),
            next(self.backbone.parameters()).dtype,
            precision,
            self.backbone.prediction,
            getattr(self.backbone, "zero_cond_t", None),
            getattr(self.backbone, "source_residual", False),
            n_ckpt,
            len(blocks),
            "on" if self.compile_backbone else "off",
        )

    def _apply_adapter(self, plan: Any) -> None:
        """Inject ``stage.adapter`` into the loaded base (no-op for full fine-tuning) and record the base's
        fingerprint, which a resumed run checks (its checkpoint holds no base weights)."""
        if self.adapter is None:
            return
        if plan is not None and plan.meta_init:
            raise ValueError(
                f"adapter={self.adapter['type']} with strategy.parallelize.meta_init=true is not supported yet: "
                "the base must be loaded before the adapter is injected (set meta_init=false)"
            )
        self._base_fingerprint = adapters.weights_fingerprint(self.backbone)
        adapters.apply_adapter(self.backbone, self.adapter)
        dtype, scheme = self._frozen_base
        if dtype is not None or scheme is not None:
            if plan is not None:
                raise ValueError(
                    "adapter.base_dtype / adapter.quantize are single-device options (untested under FSDP2/HSDP)"
                )
            # After the fingerprint and the injection: checkpoints and exports describe the full-precision base.
            frozen_base.reduce_frozen_base(self.backbone, dtype=dtype, quantize=scheme)
        # Checkpoints hold only trainable weights (on_save_checkpoint); on_load_checkpoint checks they are all there.
        self.strict_loading = False
        n_train = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.backbone.parameters())
        log.info(
            "adapter=%s (rank %s, alpha %s%s): %.3fM trainable of %.2fM backbone params",
            self.adapter["type"],
            self.adapter.get("rank"),
            self.adapter.get("alpha"),
            f", from {self.adapter['init_from']}" if self.adapter.get("init_from") else "",
            n_train / 1e6,
            n_all / 1e6,
        )

    def adapter_applied(self) -> None:
        """Called right after the adapter is injected and before FSDP2 shards the backbone (a no-op without an
        adapter or here): stages add adapters of their own (NFT's old policy) so that they are sharded too."""

    def frozen_copies(self) -> list[str]:
        """The frozen models this stage builds as copies of the backbone (none here; DPO's reference, NFT's old
        policy and KL reference without an adapter): what :meth:`setup` checks against the strategy."""
        return []

    def setup(self, stage: str) -> None:
        """Refuse, before any weight is built, a strategy under which this stage's frozen models or its adapter
        cannot be held (:mod:`rededit.parallel.stage_support`: FSDP1 / DeepSpeed ZeRO-3 deep copies, adapters
        outside single device / DDP / FSDP2 / HSDP)."""
        if self._trainer is None:
            return
        check_stage_strategy(
            strategy_kind(self.trainer.strategy),
            self.stage_name(),
            frozen_copies=self.frozen_copies(),
            adapter=None if self.adapter is None else self.adapter["type"],
        )

    def stage_name(self) -> str:
        """The stage's name in messages (``dpo``, ``nft``, ``sft``, ...)."""
        return type(self).__name__.removesuffix("Module").lower()

    def export_backbone(self, cfg: Any) -> nn.Module:
        """The backbone an export writes: this one; for a cast / quantised frozen base (``adapter.base_dtype`` /
        ``adapter.quantize``) the source's full-precision base rebuilt on the CPU from ``cfg`` (checked against the
        recorded fingerprint) with this run's trainable tensors, so the export holds the original base."""
        if not frozen_base.is_reduced(self.backbone):
            return self.backbone
        trainable = {n: p.detach().cpu() for n, p in self.backbone.named_parameters() if p.requires_grad}
        record = {"node": self.adapter, "base_fingerprint": self._base_fingerprint}
        return adapter_backbone_from_checkpoint(cfg, record, trainable, source="this run's frozen base")

    def _load_deferred_init_from(self) -> None:
        """Meta-init under FSDP2: rank 0 reads ``init_from`` and broadcasts it into every rank's shards."""
        if not getattr(self, "_deferred_init_from", None):
            return

        state = None
        if self.global_rank == 0:
            state, source = load_backbone_state(self._deferred_init_from, use_ema=self.init_from_ema)
            log.info("initialised sharded backbone from %s (%s)", self._deferred_init_from, source)
        load_full_state(self.backbone, state, broadcast_from_rank0=True)
        self._deferred_init_from = None

    def load_backbone_from(self, path: str | Path, *, use_ema: bool = True) -> None:
        """Weights-only chaining from a previous stage (``stage.init_from``): a ``.ckpt`` file, a run folder
        (its ``checkpoints/last.ckpt``) or an export folder (``backbone.safetensors``)."""
        state, source = load_backbone_state(path, use_ema=use_ema)
        self.backbone.load_state_dict(state, strict=True)
        log.info("initialised backbone from %s (%s weights)", path, source)

    # ------------------------------------------------------------------ batch → latents / text
    @torch.no_grad()
    def encode_images(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Target ``[B, C, h, w]`` and reference latents (list of ``[B, C, h_k, w_k]``)."""
        vae = self.vae
        target = vae.encode(batch["target"].to(self.device))
        refs = [vae.encode(r.to(self.device)) for r in batch["references"]]
        return target.float(), [r.float() for r in refs]

    def text_condition(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``text_emb [B, L, D]`` and ``text_mask [B, L]``: from the batch, else encoded here."""
        if "text_emb" in batch:
            return batch["text_emb"].to(self.device), batch["text_mask"].to(self.device)
        if self.text_encoder is None:
            raise ValueError("the batch has no text_emb and the stage has no text_encoder")
        images = None
        if getattr(self.text_encoder, "uses_images", False):
            images = [[r[i] for r in batch["references"]] for i in range(len(batch["texts"]))]
        emb, mask = self.text_encoder.encode(list(batch["texts"]), images)
        return emb.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ condition dropout
    def _micro_step(self, batch: Mapping[str, Any]) -> int:
        return int(batch["epoch"]) * STEPS_PER_EPOCH_STRIDE + int(batch["step"])

    def drop_conditions(
        self,
        batch: Mapping[str, Any],
        refs: list[torch.Tensor],
        text_emb: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Condition dropout of a training batch (:func:`condition_drops`).

        A dropped text becomes the embedding of :attr:`negative_prompt` with the sample's own reference images,
        through the same template: what QwenImageEditPlusPipeline encodes as the negative branch of true CFG
        for those images (QwenImagePipeline's for a sample without references), and what :meth:`generate`
        uses. A batch that drops its references keeps its texts, re-encoded without images (the T2I template)
        when the encoder sees images.

        Returns:
            ``(refs, text_emb, text_mask, dropped)`` with ``dropped`` the ``[B]`` bool of dropped texts.
        """
        b = text_emb.shape[0]
        drop_text, drop_refs = condition_drops(
            self.seed,
            self._micro_step(batch),
            self.global_rank,
            b,
            text_prob=self.text_drop_prob,
            ref_prob=self.ref_drop_prob if refs else 0.0,
        )
        if self._trainer is not None:
            if self.text_drop_prob > 0:
                self.log("train/text_drop_frac", drop_text.float().mean(), on_step=True, batch_size=b)
            if self.ref_drop_prob > 0 and refs:  # batches that have references to drop
                self.log("train/ref_drop", float(drop_refs), on_step=True, batch_size=b)
        if not drop_refs and not bool(drop_text.any()):
            return refs, text_emb, text_mask, drop_text
        enc = self.text_encoder
        if enc is None:
            raise ValueError(
                "stage.text_drop_prob / ref_drop_prob need the stage's text_encoder (it encodes the drops)"
            )
        uses_images = bool(getattr(enc, "uses_images", False))
        seqs = [e[m] for e, m in zip(text_emb, text_mask)]
        # Texts whose embedding saw the dropped references are re-encoded without them; dropped texts become
        # the negative prompt's embedding (with the sample's references unless those are dropped too).
        redo = [i for i in range(b) if not drop_text[i]] if drop_refs and uses_images else []
        neg = [i for i in range(b) if drop_text[i]]
        if uses_images:
            images = (
                [[] for _ in range(b)]
                if drop_refs
                else [[r[i] for r in batch["references"]] for i in range(b)]
            )
            rows = redo + neg
            texts = [batch["texts"][i] for i in redo] + [self.negative_prompt] * len(neg)
            for i, e in zip(rows, enc.encode_sequences(texts, [images[i] for i in rows])):
                seqs[i] = e
        else:
            if self.negative_prompt not in self._negative_memo:
                self._negative_memo[self.negative_prompt] = enc.encode_sequences([self.negative_prompt])[0]
            for i in neg:
                seqs[i] = self._negative_memo[self.negative_prompt]
        seqs = [e.to(text_emb.device, text_emb.dtype) for e in seqs]
        length = enc.max_length if getattr(enc, "pad_to_max", False) else None
        text_emb, text_mask = pad_embeddings(seqs, length, text_emb.shape[-1])
        return ([] if drop_refs else refs), text_emb, text_mask.to(text_emb.device), drop_text

    # ------------------------------------------------------------------ randomness
    def _draw(self, batch: Mapping[str, Any], x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ ``[B]``, ε ``[B, C, h, w]``) from (seed, epoch, data step, rank); in eval mode (validation)
        from (seed, sample id) only (:meth:`_draw_fixed`)."""
        if not self.training:
            return self._draw_fixed(batch, x0)
        micro_step = self._micro_step(batch)
        rank, world = self.global_rank, self.trainer.world_size if self._trainer is not None else 1
        seq_len = (x0.shape[-2] // self.backbone.patch_size) * (x0.shape[-1] // self.backbone.patch_size)
        sigma = self.timesteps.sample(
            x0.shape[0], step=micro_step, rank=rank, world_size=world, seed=self.seed, seq_len=seq_len
        )
        if self.curriculum is not None:
            # The bias is a function of the optimizer step (restored on resume); record it so the
            # curriculum's checkpointed state says where it is.
            self.curriculum.set_step(self.global_step)
            sigma = self.curriculum.apply(sigma, self.global_step)
        gen = torch_generator(self.seed, "noise", micro_step, rank)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device)
        return sigma.to(x0.device), eps

    def _draw_fixed(self, batch: Mapping[str, Any], x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation's (σ, ε): per sample, from (seed, sample id); σ from the stage's timestep distribution
        (shift included, curriculum not), so ``val/loss`` and ``val/loss_tbin*`` compare across steps."""
        seq_len = (x0.shape[-2] // self.backbone.patch_size) * (x0.shape[-1] // self.backbone.patch_size)
        sigmas, noise = [], []
        for sample_id in batch["ids"]:
            step = derive_seed("validation", str(sample_id)) % (1 << 31)
            sigmas.append(self.timesteps.sample(1, step=step, seed=self.seed, seq_len=seq_len))
            gen = torch_generator(self.seed, "validation_noise", str(sample_id))
            noise.append(torch.randn(x0.shape[1:], generator=gen, dtype=torch.float32))
        return torch.cat(sigmas).to(x0.device), torch.stack(noise).to(x0.device)

    # ------------------------------------------------------------------ loss
    def flow_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample rectified-flow loss ``[B]`` (weighted by §3.8 ``w(σ)``, plus ``mask_loss`` × (G2)) and its
        ingredients."""
        x0, refs = self.encode_images(batch)
        text_emb, text_mask = self.text_condition(batch)
        dropped = torch.zeros(x0.shape[0], dtype=torch.bool)
        if self.training and (self.text_drop_prob > 0 or self.ref_drop_prob > 0):
            refs, text_emb, text_mask, dropped = self.drop_conditions(batch, refs, text_emb, text_mask)
        sigma, eps = self._draw(batch, x0)
        x_t = interpolate(x0, eps, sigma)
        regions = self.backbone.batch_regions(batch)
        # Before the trained forward: the backbone keeps its last forward's gate logits for the mask loss.
        v_base = self._base_velocity(batch, x_t, refs, sigma, text_emb, text_mask, regions)
        v_hat = self.backbone(x_t, refs, sigma, text_emb, text_mask, regions=regions)
        # The backbone's own target: ε − x0, damped below σ_min in x0-prediction mode (see EditBackbone).
        v = self.backbone.velocity_target(x0, eps, sigma)
        if v_base is not None:
            v = torch.where(v_base[1].to(v.device).view(-1, 1, 1, 1), v_base[0].float(), v)
        err = (v_hat.float() - v).pow(2)
        alpha = self.region_weight_now()
        pixel_w = region_weights(batch, alpha, err.shape[-2:]).to(err.device) if alpha > 0 else None
        if pixel_w is not None:
            err = err * pixel_w
        mse = err.flatten(1).mean(1)
        w = loss_weight(sigma, **self.weighting).to(mse.device)
        if v_base is not None and self.preserve_weight != 1.0:
            w = torch.where(v_base[1].to(w.device), w * self.preserve_weight, w)
        loss = self.relative_mse(x0, x_t, v_hat, sigma, refs, pixel_w) if self.relative else w * mse
        parts = {"sigma": sigma, "mse": mse.detach(), "x0": x0, "x_t": x_t, "v_hat": v_hat, "refs": refs}
        parts["text_dropped"] = dropped
        if self.mask_loss_weight > 0:
            use = self._mask_usable(batch, refs, dropped)
            gate_term = self._gate_mask_loss(batch, use, parts)
            if self.gate_split and bool(use.any()):
                mse = torch.where(use.to(mse.device), self._split_mse(batch, x_t, v, sigma), mse)
                parts["mse"] = mse.detach()
                loss = w * mse  # gate_split excludes relative (checked at init)
            return loss + self.mask_loss_weight * gate_term, parts
        return loss, parts

    def _base_velocity(
        self,
        batch: Mapping[str, Any],
        x_t: torch.Tensor,
        refs: Sequence[torch.Tensor],
        sigma: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None,
        regions: Any,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``stage.preserve_base``: (the adapter-off backbone's velocity ``[B, C, h, w]``, rows it is the target of
        ``[B]`` bool), or None when preservation is off or no row of the batch is preserved."""
        if self.preserve_except is None:
            return None
        keep = torch.tensor([task not in self.preserve_except for task in batch["tasks"]], dtype=torch.bool)
        if not bool(keep.any()):
            return None
        with torch.no_grad(), adapters.adapters_disabled(self.backbone):
            v_base = self.backbone(x_t, refs, sigma, text_emb, text_mask, regions=regions)
        return v_base, keep

    def relative_mse(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        v_hat: torch.Tensor,
        sigma: torch.Tensor,
        refs: Sequence[torch.Tensor],
        pixel_w: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per sample ``[B]``: ``Σ w·(x̂0 − x0)² / max(Σ w·(z_ref1 − x0)², f)`` (``stage.weighting.relative``).

        ``z_ref1`` is Picture 1 on the target grid as the backbone received it (zeros for T2I rows or a dropped
        Picture 1: the identity of a generator is "predict nothing"), ``w`` the region weights (1 without α).
        The denominator is a constant (no gradient); ``f`` = 5 % of the batch's mean identity error keeps a
        row whose edit barely changes Picture 1 from taking the whole step. A ratio is the same in x0 and
        velocity space, so w(σ) does not apply; which σ are trained is the timestep sampler's choice.
        """
        x0_hat = self.backbone.predicted_x0(x_t, v_hat.float(), sigma)
        base = (
            self.backbone.residual_base(refs[0], tuple(x0.shape[-2:])).float()
            if refs
            else torch.zeros_like(x0)
        )
        weight = 1.0 if pixel_w is None else pixel_w
        num = ((x0_hat - x0).pow(2) * weight).flatten(1).mean(1)
        den = ((base - x0).pow(2) * weight).flatten(1).mean(1).detach()
        return num / den.clamp_min(0.05 * den.mean().clamp_min(1e-12))

    def _split_mse(
        self, batch: Mapping[str, Any], x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """(G3) per sample ``[B]``: the ungated prediction's squared error on the edited pixels (mask-weighted
        mean), in the same velocity space as the plain loss."""
        x0_edit = self.backbone.last_ungated_x0
        if x0_edit is None or not self.backbone.edit_gate.gate:
            raise ValueError(
                "stage.weighting.gate_split needs backbone.edit_gate with its gate on and a Picture 1"
            )
        v_edit = self.backbone.velocity_from_x0(x_t.to(x0_edit.dtype), x0_edit, sigma.to(x0_edit.dtype))
        m = mask_targets(batch["edit_mask"].to(v.device), tuple(v.shape[-2:]))  # [B, 1, h, w]
        err = (v_edit.float() - v).pow(2).mean(1, keepdim=True)  # mean over channels
        return (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-6)

    @staticmethod
    def _mask_usable(
        batch: Mapping[str, Any], refs: list[torch.Tensor], dropped: torch.Tensor
    ) -> torch.Tensor:
        """``[B]`` bool: samples with a real edit mask whose instruction and Picture 1 the backbone saw (without
        them *where* is unknowable)."""
        b = dropped.shape[0]
        has = torch.as_tensor(batch.get("has_edit_mask", torch.zeros(b, dtype=torch.bool)), dtype=torch.bool)
        return has.cpu() & ~dropped.cpu() & torch.tensor(bool(refs))

    def _gate_mask_loss(self, batch: Mapping[str, Any], use: torch.Tensor, parts: dict) -> torch.Tensor:
        """Localisation loss (G2) ``[B]`` of the last backbone forward's gate logits ``[B, P, h, w]`` (``P`` = 1, or
        pixels per latent site with ``pixel_head.gate``) on the samples ``use`` (:meth:`_mask_usable`)."""
        logits = getattr(self.backbone, "last_gate_logits", None)
        if getattr(self.backbone, "edit_gate", None) is None or logits is None:
            raise ValueError(
                "stage.weighting.mask_loss > 0 needs backbone.edit_gate (true, or {gate: false})"
            )
        per_sample = mask_loss(logits, batch["edit_mask"], use)
        parts["mask_loss"] = per_sample.detach()
        if self._trainer is not None and self.training and bool(use.any()):
            self.log("train/mask_loss", per_sample.sum() / use.sum(), on_step=True, batch_size=int(use.sum()))
        return per_sample

    def region_weight_now(self) -> float:
        """α at this optimizer step: ``region_weight``, annealed (cosine) to ``region_weight_final`` at max_steps."""
        a0, a1 = self.region_weight, self.region_weight_final
        if a0 == a1 or not self.training or self._trainer is None or int(self.trainer.max_steps) <= 0:
            return a0  # validation: the starting α at every step (val/loss stays comparable)
        progress = min(1.0, self.global_step / int(self.trainer.max_steps))
        return a1 + (a0 - a1) * 0.5 * (1 + math.cos(math.pi * progress))

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of a batch; stages override this (DPO, NFT, consistency loss)."""
        per_sample, parts = self.flow_loss(batch)
        return per_sample.mean(), parts

    def _tbins(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.detach().clamp(0, 1 - 1e-6) * self.num_tbins).long()

    def _log_tbins(self, split: str, sigma: torch.Tensor, mse: torch.Tensor) -> None:
        bins = self._tbins(sigma)
        for k in range(self.num_tbins):
            sel = bins == k
            if sel.any():
                self.log(
                    f"{split}/loss_tbin{k}",
                    mse[sel].mean(),
                    on_step=split == "train",
                    on_epoch=True,
                    batch_size=int(sel.sum()),
                )

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self) -> None:
        self._move_frozen()

    def on_validation_start(self) -> None:
        self._move_frozen()

    def on_predict_start(self) -> None:
        self._move_frozen()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.compute_loss(batch)
        bs = len(batch["ids"])
        self.skipped_samples += len(batch.get("skipped", ()))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/batch_size", float(bs), on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/skipped_samples", float(self.skipped_samples), on_step=True, batch_size=bs)
        if self.curriculum is not None:
            self.log("train/curriculum_bias", self.curriculum.bias_at(self.global_step), batch_size=bs)
        self._log_tbins("train", parts["sigma"], parts["mse"])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums: torch.Tensor | None = None

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.compute_loss(batch)
        # Sums and counts of val/loss and each σ bin, reduced over ranks once at the end of validation: a bin
        # may be empty on a rank (Lightning's sync_dist needs every rank to log every key, and its mean
        # truncates the integer sample counts).
        n, k = len(batch["ids"]), self.num_tbins
        bins, mse = self._tbins(parts["sigma"]), parts["mse"].detach().float()
        sums = torch.zeros(2 + 2 * k, device=mse.device)
        sums[0], sums[1] = loss.detach().float() * n, n
        for j in range(k):
            sel = bins == j
            sums[2 + j], sums[2 + k + j] = mse[sel].sum(), sel.sum()
        self._val_sums = sums if getattr(self, "_val_sums", None) is None else self._val_sums + sums
        return loss

    def on_validation_epoch_end(self) -> None:
        """``val/loss`` and ``val/loss_tbin*``: sample-weighted means over every rank's validation batches."""
        k = self.num_tbins
        sums = getattr(self, "_val_sums", None)
        sums = torch.zeros(2 + 2 * k, device=self.device) if sums is None else sums
        if self._trainer is not None:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        # Identical on every rank after the reduction: sync_dist's mean changes nothing (and keeps Lightning quiet).
        if sums[1] > 0:
            self.log("val/loss", sums[0] / sums[1], prog_bar=True, sync_dist=True)
        for j in range(k):
            if sums[2 + k + j] > 0:
                self.log(f"val/loss_tbin{j}", sums[2 + j] / sums[2 + k + j], sync_dist=True)
        self._val_sums = None

    def configure_optimizers(self) -> Any:
        self._load_deferred_init_from()  # runs after materialisation, before a resumed checkpoint loads
        groups = self.backbone.trainable_parameter_groups(self.weight_decay)
        optimizer = self.optimizer_factory(groups)
        if self.warmup_steps <= 0 and self.lr_decay == "none":
            return optimizer
        total = int(self.trainer.max_steps) if self._trainer is not None else -1
        if self.lr_decay != "none" and total <= 0:
            raise ValueError(
                f"stage.lr_decay={self.lr_decay!r} needs trainer.max_steps > 0 (the decay's length)"
            )
        factor = functools.partial(
            lr_factor, warmup=self.warmup_steps, total=total, decay=self.lr_decay, min_ratio=self.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.curriculum is not None:
            checkpoint["timestep_curriculum"] = self.curriculum.state_dict()
        checkpoint["skipped_samples"] = self.skipped_samples
        if self.adapter is not None:
            self._save_adapter_checkpoint(checkpoint)

    def _save_adapter_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """An adapter run's checkpoint: only the trainable backbone tensors (adapter, FireEdit) and what rebuilds
        the rest (the adapter config, the base's fingerprint; the base comes from init_from / pretrained_path)."""
        checkpoint[adapters.CHECKPOINT_KEY] = {
            "type": self.adapter["type"],
            "node": self.adapter,
            "peft_config": adapters.config_to_json(adapters.peft_config_of(self.backbone)),
            "base_fingerprint": self._base_fingerprint,
        }
        state = checkpoint.get("state_dict")
        if not state:
            return
        # Sharded (DCP) state dicts too: FSDP2Strategy.load_checkpoint then loads only the tensors a folder has.
        trainable = {f"backbone.{n}" for n, p in self.backbone.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in state.items() if not k.startswith("backbone.") or k in trainable
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()  # weights load right after this hook; the backbone must exist
        adapters.check_checkpoint(checkpoint, self.adapter, self.backbone, self._base_fingerprint)
        if self.curriculum is not None and "timestep_curriculum" in checkpoint:
            self.curriculum.load_state_dict(checkpoint["timestep_curriculum"])
        self.skipped_samples = int(checkpoint.get("skipped_samples", 0))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        references: list[torch.Tensor],
        texts: list[str],
        *,
        height: int,
        width: int,
        seed: int | Sequence[int] = 0,
        steps: int | None = None,
        cfg_scale: float | None = None,
        negative_prompt: str | None = None,
        object_boxes: list | None = None,
        condition_images: Sequence[Sequence[Any]] | None = None,
    ) -> torch.Tensor:
        """Edit (or generate, with no references) a batch: images ``[B, 3, height, width]`` in [-1, 1].

        Args:
            references: per position ``[B, 3, H_k, W_k]`` in [-1, 1]; Picture 1 is ``references[0]``.
            texts: ``B`` instructions.
            seed: one seed for the batch's noise, or ``B`` seeds, one per sample (then a sample's edit does
                not depend on which other samples share its batch: :mod:`rededit.inference.edit_loop`).
            object_boxes: per sample ``[O, 4]`` boxes in output pixels or None (backbone region tokens only).
            condition_images: per sample, the pictures a VL text encoder sees (PIL images or ``[3, H, W]``
                tensors, resized by the encoder as QwenImageEditPlusPipeline resizes its condition images);
                default: the references themselves. Pass the pictures as the user gave them to see what the
                pipeline's VL encoder sees (it resizes the originals, not the VAE-sized references).
        """
        self._move_frozen()
        was_training = self.backbone.training
        self.backbone.eval()
        b = len(texts)
        vae = self.vae
        refs = [vae.encode(r.to(self.device)).float() for r in references]
        enc = self.text_encoder
        images = None
        if getattr(enc, "uses_images", False):
            if condition_images is not None and len(condition_images) != b:
                raise ValueError(f"generate: {len(condition_images)} condition-image lists for {b} samples")
            images = (
                [list(c) for c in condition_images]
                if condition_images is not None
                else [[r[i] for r in references] for i in range(b)]
            )
        emb, mask = enc.encode(texts, images)
        cfg = self.cfg_scale if cfg_scale is None else cfg_scale
        neg_emb = neg_mask = None
        if cfg > 1:
            neg = [self.negative_prompt if negative_prompt is None else negative_prompt] * b
            neg_emb, neg_mask = enc.encode(neg, images)
            neg_emb, neg_mask = neg_emb.to(self.device), neg_mask.to(self.device)
        f = vae.downsample
        shape = (vae.latent_channels, height // f, width // f)
        if isinstance(seed, int):
            noise = torch.randn((b, *shape), generator=torch_generator(seed, "generate"))
        else:
            if len(seed) != b:
                raise ValueError(f"generate: {len(seed)} seeds for {b} samples")
            noise = torch.cat(
                [torch.randn((1, *shape), generator=torch_generator(s, "generate")) for s in seed]
            )
        noise = noise.to(self.device)
        regions = normalize_boxes(object_boxes, (height, width))
        with self.backbone.using_regions(regions if self.backbone.region_tokens is not None else None):
            x0 = euler_sample(
                self.backbone,
                noise=noise,
                references=refs,
                text_emb=emb.to(self.device),
                text_mask=mask.to(self.device),
                neg_text_emb=neg_emb,
                neg_text_mask=neg_mask,
                steps=steps or self.sample_steps,
                cfg_scale=cfg,
            )
        self.backbone.train(was_training)
        return vae.decode(x0).clamp(-1, 1)
