"""DPO stage (report §3.6.1): flow-matching Diffusion-DPO with Positive Sample Reinforcement, eq. (2).

Each batch row is a preference pair for one condition (references + instruction): the manifest's target
is the preferred edit ``x_w`` and its ``rejected`` column the dispreferred ``x_l`` (built offline by
``rededit-data make-pairs``, the Mix-Policy recipe). Win and lose share ε and σ (one ``_draw`` of the
base stage, so the pair differs only in its image), and policy and reference see the same ``x_t``::

    x_t^w = (1 − σ) x_w + σ ε      x_t^l = (1 − σ) x_l + σ ε
    L^θ_w = w(σ)·mean((v_θ(x_t^w) − v_w)²),  likewise L^θ_l, L^ref_w, L^ref_l          (each [B])
    loss  = mean_B dpo_loss(L^θ_w, L^θ_l, L^ref_w, L^ref_l, β, ω, λ)                    (eq. 2)

Win and lose go through the backbone as one ``[2B, ...]`` batch (same bucket, same shapes).

The frozen reference is a copy of the backbone's *initial* weights (after ``init_from``), built in
:meth:`configure_model` right after the backbone and kept out of the module tree (like the VAE), so it is
neither trained, nor saved in checkpoints, nor wrapped by the strategy. On resume, ``configure_model``
rebuilds it from ``init_from`` before the checkpoint's policy weights are loaded; a fingerprint stored in
the checkpoint catches a reference that changed in between.

Under FSDP2/HSDP (``strategy=fsdp2|hsdp``) the backbone is sharded and must not be deep-copied: the reference
is built collectively in :meth:`configure_optimizers` — after a meta-initialised backbone got its ``init_from``
weights and *before* a resumed checkpoint is loaded (Lightning's ``ModelParallelStrategy`` restores after
setup), so it holds the init weights, never the resumed ones — as a frozen twin sharded the same way
(:func:`sharded_frozen_twin`: meta init → ``parallelize_frozen`` → ``copy_shards_``, no communication). Its
forwards run under ``no_grad``, on every rank together (each all-gathers per block): rows that need an
online negative on *any* rank make every rank run the reference sampler.

With an adapter (``adapter=lora|lokr|loha``, issue 20) there is no copy at all: the reference is the same
backbone with its adapter disabled (:class:`~rededit.models.adapters.AdapterView`; FireEdit modules, which train
outside the adapter, swap their initial weights in for its forwards), i.e. exactly the base the adapter was
injected into. This saves one backbone's parameters per device (the 20B transformer in bf16: ≈41 GB). Under
FSDP2/HSDP the view runs on the sharded backbone (its forwards all-gather per block like the policy's, on every
rank together) and its FireEdit copies are the initial shards.

FSDP1-hybrid and DeepSpeed ZeRO-3 cannot hold the deep-copied reference (an unsharded copy on every rank; a copy
of partitioned placeholders): that combination is refused at start-up (:mod:`rededit.parallel.stage_support`).

Rows without a ``rejected`` image: ``missing_rejected="error"`` refuses them; ``"reference_sample"`` takes
the reference policy's own sample of the condition as the negative (the self-sampling half of Mix-Policy,
with no judge filtering) and logs the fraction as ``dpo/online_negative_frac``.

Logged every step (``dpo/``): ``win_diff``, ``lose_diff`` (the "double degradation" of §3.6.1 shows as both
rising together), ``ref_loss_w``, ``ref_loss_l``, ``implicit_acc``, ``reward_margin``, plus ``loss_w`` /
``loss_l`` (the policy's own errors) and the SFT term.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from rededit.flow.path import interpolate
from rededit.flow.sampler import euler_sample
from rededit.flow.weighting import loss_weight
from rededit.losses.dpo import dpo_loss, dpo_stats
from rededit.models import adapters
from rededit.parallel import copy_shards_, materialize, meta_init, parallelize_frozen
from rededit.parallel.parallelize import is_sharded
from rededit.stages.base import STEPS_PER_EPOCH_STRIDE, BaseStage
from rededit.utils.logging import get_logger
from rededit.utils.module_tree import hidden_from_tree
from rededit.utils.seeding import torch_generator

log = get_logger(__name__)

MISSING_REJECTED = ("error", "reference_sample")


@torch.no_grad()
def backbone_fingerprint(module: torch.nn.Module) -> float:
    """A cheap float summary of a module's weights (sum of per-tensor means of |θ|), to detect a changed copy.

    Sharded (FSDP2) parameters reduce across ranks (``full_tensor`` of the partial mean): call it on every rank.
    """
    total = 0.0
    for p in module.parameters():
        m = p.detach().float().abs().mean()
        total += float(m.full_tensor() if hasattr(m, "full_tensor") else m)
    return total


def sharded_frozen_twin(stage: BaseStage, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen copy of ``stage.backbone``'s *current* weights, sharded exactly like it (FSDP2 / HSDP).

    Built like :func:`rededit.parallel.frozen_copy` (factory on ``meta`` → ``parallelize_frozen`` →
    materialise), but filled with :func:`rededit.parallel.copy_shards_` from the trained backbone's own
    shards: same mesh, same placements, so no gather / broadcast and no full copy on any rank. A collective
    only in that every rank must call it (``fully_shard`` builds per-mesh state). Used for the DPO reference
    and the NFT old policy (``dtype=float32``: the EMA lerp writes into it in place).
    """
    plan = stage.parallel_plan()
    twin = meta_init(stage.backbone_factory, latent_channels=stage.vae.latent_channels)
    if dtype is not None:
        twin = twin.to(dtype)
    twin.freeze_unused_text_tail()  # same requires_grad pattern as the backbone (the EMA shadow's names)
    parallelize_frozen(twin, stage.parallel_mesh(), plan)
    # CPU offload keeps the sharded parameters in host memory, like the backbone's.
    materialize(twin, "cpu" if plan.cpu_offload else stage.device)
    copy_shards_(twin, stage.backbone)
    return twin


class DPOModule(BaseStage):
    """Diffusion-DPO with ω / λ (eq. 2) on top of :class:`BaseStage`.

    Args:
        beta: β of eq. (2) (scales the whole difference; see :mod:`rededit.losses.dpo` for the relation to
            Diffusion-DPO's β·T and its code's 0.5).
        omega: ω ≥ 1, weight of the Win Diff (1 = standard Diffusion-DPO).
        lam: λ ≥ 0, SFT regulariser on the winners.
        missing_rejected: ``error`` | ``reference_sample`` for rows without a ``rejected`` image.
        negative_steps: Euler steps of an online reference sample (``reference_sample`` only).
        **kwargs: :class:`BaseStage` arguments.
    """

    trains_flow_loss = False  # its own loss: stage.preserve_base does not apply

    def __init__(
        self,
        *,
        beta: float = 2500.0,
        omega: float = 1.0,
        lam: float = 0.0,
        missing_rejected: str = "error",
        negative_steps: int = 8,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if missing_rejected not in MISSING_REJECTED:
            raise ValueError(
                f"stage.missing_rejected must be one of {MISSING_REJECTED}, got {missing_rejected!r}"
            )
        if beta <= 0 or omega <= 0 or lam < 0:
            raise ValueError(f"DPO needs beta > 0, omega > 0, lam >= 0; got {beta}, {omega}, {lam}")
        self.beta = float(beta)
        self.omega = float(omega)
        self.lam = float(lam)
        self.missing_rejected = missing_rejected
        self.negative_steps = int(negative_steps)
        self._reference = hidden_from_tree(None)
        self._reference_fingerprint: float | None = None

    # ------------------------------------------------------------------ reference
    @property
    def reference(self) -> torch.nn.Module | None:
        return self._reference[0]

    def frozen_copies(self) -> list[str]:
        return [] if self.adapter is not None else ["DPO reference"]

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference is not None:
            return
        if not self.init_from:
            log.warning(
                "DPO without stage.init_from: the reference is the random initial backbone (fine for tests; "
                "a real run starts from the SFT checkpoint)"
            )
        if self.adapter is not None:
            # The base is the reference: no copy (its FireEdit modules keep their initial weights aside).
            view = adapters.AdapterView(self.backbone, None, adapters.non_adapter_trainables(self.backbone))
            self._set_reference(view)
            return
        if self.parallel_plan() is not None:
            return  # sharded backbone: the reference is built collectively in configure_optimizers
        self._set_reference(copy.deepcopy(self.backbone).eval().requires_grad_(False))

    def _set_reference(self, ref: torch.nn.Module) -> None:
        self._reference[0] = ref
        if isinstance(ref, adapters.AdapterView):  # the base and initial FireEdit weights, not the adapter
            self._reference_fingerprint = adapters.weights_fingerprint(self.backbone)
        else:
            self._reference_fingerprint = backbone_fingerprint(ref)

    def configure_optimizers(self) -> Any:
        out = super().configure_optimizers()  # first fills a meta-initialised backbone from init_from
        if self.reference is None and self.parallel_plan() is not None:
            # Before Lightning restores a resumed checkpoint: the backbone still holds the init weights.
            self._set_reference(sharded_frozen_twin(self))
            log.info("DPO: sharded reference built from the initial backbone (FSDP2/HSDP)")
        return out

    def _move_frozen(self) -> None:
        super()._move_frozen()
        if self.reference is not None and not is_sharded(self.reference):
            self.reference.to(self.device)

    # ------------------------------------------------------------------ negatives
    @torch.no_grad()
    def _reference_negatives(
        self, batch: Mapping[str, Any], x_w: torch.Tensor, refs: list[torch.Tensor], text_emb, text_mask
    ) -> torch.Tensor:
        """The reference policy's own edits of the batch's conditions, latents ``[B, C, h, w]``."""
        micro_step = int(batch["epoch"]) * STEPS_PER_EPOCH_STRIDE + int(batch["step"])
        gen = torch_generator(self.seed, "dpo-negative", micro_step, self.global_rank)
        noise = torch.randn(x_w.shape, generator=gen, dtype=torch.float32).to(x_w.device)
        with self.reference.using_regions(
            self.reference.batch_regions(batch)
        ):  # region tokens, as in training
            return euler_sample(
                self.reference,
                noise=noise,
                references=refs,
                text_emb=text_emb,
                text_mask=text_mask,
                steps=self.negative_steps,
            )

    @torch.no_grad()
    def encode_rejected(
        self, batch: Mapping[str, Any], x_w: torch.Tensor, refs: list[torch.Tensor], text_emb, text_mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Lose latents ``[B, C, h, w]`` and a ``[B]`` bool of rows whose negative was sampled online."""
        b = x_w.shape[0]
        has = batch.get("has_rejected")
        has = torch.zeros(b, dtype=torch.bool) if has is None else torch.as_tensor(has, dtype=torch.bool)
        x_l = torch.zeros_like(x_w)
        if has.any():
            enc = self.vae.encode(batch["rejected"].to(self.device)).float()
            if enc.shape != x_w.shape:
                raise ValueError(
                    f"rejected latents {tuple(enc.shape)} do not match the target's {tuple(x_w.shape)}: the "
                    "dataset must serve `rejected` at the target's bucket size"
                )
            x_l = torch.where(has.to(x_w.device).view(-1, 1, 1, 1), enc, x_l)
        missing = ~has
        sample = bool(missing.any())
        if is_sharded(self.reference) and self.missing_rejected != "error":
            # The sharded reference's forwards are collectives: sample on every rank if any rank needs it.
            sample = self.trainer.strategy.reduce_boolean_decision(sample, all=False)
        if missing.any() and self.missing_rejected == "error":
            ids = [i for i, m in zip(batch["ids"], missing.tolist()) if m]
            raise ValueError(
                f"DPO rows without a `rejected` image: {ids[:5]}; build pairs with `rededit-data "
                "make-pairs` or set stage.missing_rejected=reference_sample"
            )
        if sample:
            online = self._reference_negatives(batch, x_w, refs, text_emb, text_mask)
            x_l = torch.where(missing.to(x_w.device).view(-1, 1, 1, 1), online, x_l)
        return x_l, missing

    # ------------------------------------------------------------------ loss
    def pair_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample errors ``[B]`` of policy and reference on win and lose (shared ε, σ, x_t)."""
        if self.reference is None:
            raise RuntimeError(
                "DPO has no reference policy: under FSDP2/HSDP it is built in configure_optimizers, i.e. only "
                "by trainer.fit (validate a DPO checkpoint with stage=sft, or call configure_model off-strategy)"
            )
        x_w, refs = self.encode_images(batch)
        text_emb, text_mask = self.text_condition(batch)
        x_l, online = self.encode_rejected(batch, x_w, refs, text_emb, text_mask)
        sigma, eps = self._draw(batch, x_w)
        b = x_w.shape[0]
        x0 = torch.cat([x_w, x_l])
        eps2, sigma2 = torch.cat([eps, eps]), torch.cat([sigma, sigma])
        x_t = interpolate(x0, eps2, sigma2)
        refs2 = [torch.cat([r, r]) for r in refs]
        text2, mask2 = torch.cat([text_emb, text_emb]), torch.cat([text_mask, text_mask])
        v = self.backbone.velocity_target(x0, eps2, sigma2)
        w = loss_weight(sigma2, **self.weighting).to(x0.device)
        regions = self.backbone.batch_regions(
            batch
        )  # backbone region tokens: the same boxes for win and lose
        regions2 = None if regions is None else [*regions, *regions]
        v_theta = self.backbone(x_t, refs2, sigma2, text2, mask2, regions=regions2)
        err = w * (v_theta.float() - v).pow(2).flatten(1).mean(1)
        with torch.no_grad():
            v_ref = self.reference(x_t, refs2, sigma2, text2, mask2, regions=regions2)
            ref_err = w * (v_ref.float() - v).pow(2).flatten(1).mean(1)
        return {
            "loss_w": err[:b],
            "loss_l": err[b:],
            "ref_loss_w": ref_err[:b],
            "ref_loss_l": ref_err[b:],
            "sigma": sigma,
            "online": online,
        }

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self.pair_losses(batch)
        per_sample = dpo_loss(
            p["loss_w"], p["loss_l"], p["ref_loss_w"], p["ref_loss_l"], self.beta, self.omega, self.lam
        )
        stats = dpo_stats(p["loss_w"], p["loss_l"], p["ref_loss_w"], p["ref_loss_l"], self.beta)
        stats.update(
            loss_w=p["loss_w"].detach().mean(),
            loss_l=p["loss_l"].detach().mean(),
            sft_term=self.lam * p["loss_w"].detach().mean(),
            online_negative_frac=p["online"].float().mean(),
        )
        train = self.training
        bs = int(p["loss_w"].shape[0])
        for name, value in stats.items():
            key = f"dpo/{name}" if train else f"val/dpo_{name}"
            self.log(key, value, on_step=train, on_epoch=True, batch_size=bs)
        return per_sample.mean(), {"sigma": p["sigma"], "mse": p["loss_w"].detach()}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo_reference_fingerprint"] = self._reference_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # builds backbone + reference from init_from
        saved = checkpoint.get("dpo_reference_fingerprint")
        current = self._reference_fingerprint
        if saved is not None and current is not None and abs(saved - current) > 1e-6 * max(1.0, abs(saved)):
            raise RuntimeError(
                "the DPO reference rebuilt from stage.init_from differs from the one the checkpoint was "
                f"trained against (fingerprint {current:.6g} vs {saved:.6g}); resume with the same stage.init_from"
            )
