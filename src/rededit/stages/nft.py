"""Online DiffusionNFT stage (report §3.6.2, eq. 3).

One training step on a batch of B prompts (conditions: references + instruction):

1. **Rollout** with the old policy: each prompt is repeated G times (``group_size``) and edited from
   noise drawn from (seed, "rollout", epoch·stride + data step, rank) with the Euler ODE sampler
   (:func:`~rededit.flow.sampler.euler_sample`) or the marginal-preserving SDE
   (:func:`~rededit.flow.sde.sde_sample`), ``rollout_steps`` steps, no CFG (DiffusionNFT is CFG-free).
2. **Score** the decoded edits ``[B·G, 3, H, W]`` in [0, 1] with the configured
   :class:`~rededit.rewards.base.Reward` (NaN = not applicable) and compute the unrewarded hack monitors
   (:func:`~rededit.rewards.monitors.hack_monitors`) next to it.
3. **Normalise** to optimality probabilities per prompt group
   (:func:`~rededit.losses.nft.optimality_probability`): ``A = (R − mean_g) / std_g`` clipped to ``±c``,
   ``r = ½ + A/(2c)``; NaN rewards are dropped from the loss.
4. **Train** on the rollout latents ``x_0`` (not re-encoded): fresh σ, ε from the base stage's ``_draw``,
   ``x_t = (1 − σ) x_0 + σ ε``, ``v = ε − x_0``, ``v_θ`` from the policy and ``v_old`` from the old policy
   on the same ``x_t``, loss = eq. (3) (:func:`~rededit.losses.nft.nft_loss`) averaged over valid samples.
5. **Soft update** of the old policy right after every optimizer step (before that step's checkpoint),
   reusing the EMA math of :class:`~rededit.models.ema.EMAWeights` with DiffusionNFT's ramped decay
   (:class:`OldPolicyEMA`):
   ``θ_old ← η_n θ_old + (1 − η_n) θ``, ``η_n = min(η_max, η_rate · n)`` — on-policy at first, smoother later.

The old policy and the reward are kept out of the module tree (not trained, not wrapped); the old
policy's weights and update count go into the checkpoint under ``nft_old_policy`` (they cannot be rebuilt
from ``init_from``). On one device / DDP it is a plain fp32 deep copy whose parameters *are* the EMA shadow.

Under FSDP2/HSDP it is an fp32 frozen twin sharded like the policy
(:func:`~rededit.stages.dpo.sharded_frozen_twin`, built collectively in :meth:`configure_optimizers` from the
backbone's shards), its local shards are the EMA shadow (the lerp stays local) and every rank runs its
rollout / ``v_old`` forwards together. Checkpoints: with a sharded (DCP) checkpoint every old-policy tensor is
written by its own rank as ``__nft_old__.<name>`` in the DCP directory (like the EMA's ``__ema__.``) and
``nft_old_policy`` keeps only the counters and ``"sharded": True``; a resume reads the shards back (DCP
reshards, so the world size may change). A full checkpoint (``save_distributed_checkpoint=false``, DDP, one
device) carries the gathered shadow and resumes under any strategy.

Two forms of the loss (``stage.nft.form``, :mod:`rededit.losses.nft`): ``report`` (default) is eq. (3) in
v-space divided by β (:func:`~rededit.losses.nft.nft_loss` with ``inverse_beta``; eq. (3) itself at β = 1);
``official`` is the loss of DiffusionNFT's released trainer (:func:`~rededit.losses.nft.nft_loss_official`:
x₀-space, adaptive per-sample weights, × c/β, advantages clipped at ``stage.nft.adv_clip`` = 5) plus
``stage.nft.kl_weight`` × :func:`~rededit.losses.nft.nft_kl` to a frozen *reference* policy. The reference is
the backbone's initial weights (after ``init_from``), built only when the official form has ``kl_weight > 0``,
exactly like the DPO reference (:mod:`rededit.stages.dpo`): a frozen copy outside the module tree, or under
FSDP2/HSDP a frozen twin sharded like the backbone (:func:`~rededit.stages.dpo.sharded_frozen_twin`), rebuilt
from ``init_from`` on resume and checked by a fingerprint stored in the checkpoint.

With an adapter (``adapter=lora|lokr|loha``, issue 20) the old policy is no copy of the backbone: it is a second
adapter ``nft_old`` in the same peft layers (a frozen fp32 copy of the trained adapter, soft-updated by the same
:class:`OldPolicyEMA`, whose shadow aliases its tensors), run through :class:`~rededit.models.adapters.AdapterView`
(``nft_old`` active instead of the trained adapter; the FireEdit modules' old weights, when they are on, swapped
in from fp32 copies). The checkpoint keeps it under ``nft_old_policy`` as before (shadow = the old weights of
every trainable tensor). The KL reference is likewise an ``AdapterView`` with every adapter off and the *initial*
FireEdit weights, in eval mode: exactly the base the adapter was injected into. Under FSDP2/HSDP the ``nft_old``
adapter is added before the backbone is sharded (:meth:`adapter_applied`), so its tensors are sharded with their
layers and the soft update stays local; its gathered shadow goes into ``nft_old_policy`` (no ``__nft_old__``
shards: those would repeat the whole sharded base).

Validation (``val/loss``) is the base stage's flow-matching loss on the held-out targets: a cheap check
that RL does not destroy the supervised fit (no rollout in validation).

Logged per step: ``reward/mean``, ``reward/std``, ``reward/<component>`` (every key the reward returns),
``monitor/<name>`` (brightness, saturation, edge density, colour entropy, …), ``nft/r_mean``, ``nft/r_std``,
``nft/adv_abs_mean``, ``nft/valid_frac``, ``nft/flat_group_frac`` (groups with no reward spread), ``nft/pos_mse``, ``nft/neg_mse``, ``nft/policy_old_mse`` (drift
from the old policy) and ``nft/old_decay``; with a reference also ``nft/kl`` (policy vs reference) and
``nft/old_kl`` (old policy vs reference).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rededit.flow.path import interpolate
from rededit.flow.sampler import euler_sample
from rededit.flow.sde import sde_sample
from rededit.losses.nft import nft_kl, nft_loss, nft_loss_official, optimality_probability
from rededit.models import adapters
from rededit.models.ema import EMAWeights
from rededit.parallel import copy_shards_
from rededit.parallel.parallelize import is_sharded
from rededit.parallel.safe_dcp import safe_dcp_load
from rededit.rewards.base import source_from_batch
from rededit.rewards.monitors import hack_monitors
from rededit.stages.base import STEPS_PER_EPOCH_STRIDE, BaseStage
from rededit.stages.dpo import backbone_fingerprint, sharded_frozen_twin
from rededit.utils.logging import get_logger
from rededit.utils.module_tree import hidden_from_tree
from rededit.utils.seeding import torch_generator

log = get_logger(__name__)

SAMPLERS = ("ode", "sde")
NFT_FORMS = ("report", "official")
#: ``stage.nft`` defaults: the official form's knobs are those of NVlabs/DiffusionNFT's config/base.py
#: (``train.beta = 1e-4`` KL weight, ``train.adv_clip_max = 5``, adaptive weighting always on).
NFT_DEFAULTS = {"form": "report", "kl_weight": 1.0e-4, "adv_clip": 5.0, "adaptive_weighting": True}
#: The old policy's adapter of an adapter run (the trained one is adapters.ADAPTER_NAME).
OLD_ADAPTER = "nft_old"
# State-dict prefix of the sharded old policy in DCP checkpoints (cf. rededit.callbacks.ema.DCP_PREFIX).
DCP_OLD_PREFIX = "__nft_old__."


class OldPolicyEMA(EMAWeights):
    """EMA with DiffusionNFT's soft-update schedule ``η_n = min(decay, rate · n)`` (n = updates so far).

    Used as a plain object (not a trainer callback): :meth:`EMAWeights.update` lerps ``shadow`` toward the policy,
    and ``shadow`` aliases the old-policy module's parameters, so the update happens in place.
    """

    def __init__(self, decay: float = 0.5, rate: float = 0.001):
        super().__init__(decay=decay, warmup=False)
        if rate < 0:
            raise ValueError(f"old-policy decay rate must be >= 0, got {rate}")
        self.rate = float(rate)

    def decay_at(self, n: int) -> float:
        return min(self.decay, self.rate * n)


def repeat_batch(batch: Mapping[str, Any], g: int) -> dict[str, Any]:
    """Each sample repeated ``g`` times (``[b0, b0, …, b1, b1, …]``): tensors along dim 0, per-sample lists
    element-wise, reference lists position-wise; scalars (epoch, step) unchanged."""
    n = len(batch["ids"])
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == n:
            out[key] = value.repeat_interleave(g, dim=0)
        elif key == "references":
            out[key] = [r.repeat_interleave(g, dim=0) for r in value]
        elif isinstance(value, list) and len(value) == n:
            out[key] = [v for v in value for _ in range(g)]
        else:
            out[key] = value
    return out


class NFTModule(BaseStage):
    """Online DiffusionNFT (eq. 3) on top of :class:`BaseStage`.

    Args:
        reward: a :class:`~rededit.rewards.base.Reward` (``forward(images [B,3,H,W] in [0,1], batch)``);
            the config passes the ``reward=`` group here (None when no option is chosen).
        fallback_reward: the reward used when ``reward`` is None (the stage config's weight-free default).
        group_size: G rollouts per prompt (group statistics need G ≥ 2).
        nft_beta: β of the implicit policies v⁺ / v⁻.
        rollout_sampler: ``ode`` (Euler) or ``sde``.
        rollout_steps: sampler steps per rollout.
        sde_noise_level: ``a`` of the SDE's ``g(σ)``.
        adv_clip: c of the advantage clip / r mapping (report form).
        adv_scale: ``group`` or ``global`` std for the advantages.
        old_decay / old_decay_rate: η_max and η_rate of the old policy's soft update.
        monitors: compute the hack monitors (cheap image statistics).
        nft: the loss form and the official form's own knobs (:data:`NFT_DEFAULTS`): ``form`` (``report`` |
            ``official``), ``kl_weight`` (official: weight of the KL to the frozen reference; 0 builds none),
            ``adv_clip`` (official: c, replaces ``adv_clip``), ``adaptive_weighting`` (official).
        **kwargs: :class:`BaseStage` arguments.
    """

    trains_flow_loss = False  # its own loss: stage.preserve_base does not apply

    def __init__(
        self,
        *,
        reward: nn.Module | None = None,
        fallback_reward: nn.Module | None = None,
        group_size: int = 4,
        nft_beta: float = 1.0,
        rollout_sampler: str = "ode",
        rollout_steps: int = 8,
        sde_noise_level: float = 0.7,
        adv_clip: float = 1.0,
        adv_scale: str = "group",
        old_decay: float = 0.5,
        old_decay_rate: float = 0.001,
        monitors: bool = True,
        nft: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if reward is None:
            reward = fallback_reward
        if reward is None:
            raise ValueError(
                "NFTModule needs a reward: choose `reward=<conf/reward option>` or set stage.reward"
            )
        if group_size < 2:
            raise ValueError(f"stage.group_size must be >= 2 (per-prompt statistics), got {group_size}")
        if rollout_sampler not in SAMPLERS:
            raise ValueError(f"stage.rollout_sampler must be one of {SAMPLERS}, got {rollout_sampler!r}")
        if nft_beta <= 0:
            raise ValueError(f"stage.nft_beta must be > 0, got {nft_beta}")
        self._reward = hidden_from_tree(reward)
        self.group_size = int(group_size)
        self.nft_beta = float(nft_beta)
        self.rollout_sampler = rollout_sampler
        self.rollout_steps = int(rollout_steps)
        self.sde_noise_level = float(sde_noise_level)
        self.adv_clip = float(adv_clip)
        self.adv_scale = adv_scale
        self.old_ema = OldPolicyEMA(old_decay, old_decay_rate)
        self._old = hidden_from_tree(None)
        self.monitors = bool(monitors)
        opts = {**NFT_DEFAULTS, **dict(nft or {})}
        unknown = sorted(set(opts) - set(NFT_DEFAULTS))
        if unknown:
            raise ValueError(f"stage.nft has unknown keys {unknown}; known: {sorted(NFT_DEFAULTS)}")
        if opts["form"] not in NFT_FORMS:
            raise ValueError(f"stage.nft.form must be one of {NFT_FORMS}, got {opts['form']!r}")
        self.nft_form = str(opts["form"])
        self.kl_weight = float(opts["kl_weight"])
        self.official_adv_clip = float(opts["adv_clip"])
        self.adaptive_weighting = bool(opts["adaptive_weighting"])
        if self.kl_weight < 0 or self.official_adv_clip <= 0:
            raise ValueError(
                f"stage.nft.kl_weight must be >= 0 and stage.nft.adv_clip > 0, got {self.kl_weight}, "
                f"{self.official_adv_clip}"
            )
        self._ref = hidden_from_tree(None)
        self._reference_fingerprint: float | None = None

    # ------------------------------------------------------------------ frozen parts
    @property
    def reward(self) -> nn.Module:
        return self._reward[0]

    @property
    def old_policy(self) -> nn.Module | None:
        return self._old[0]

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference of the KL term (None unless the official form has ``kl_weight > 0``)."""
        return self._ref[0]

    @property
    def uses_reference(self) -> bool:
        return self.nft_form == "official" and self.kl_weight > 0

    @property
    def _adapter_on(self) -> bool:
        return getattr(self, "adapter", None) is not None

    def frozen_copies(self) -> list[str]:
        if self._adapter_on:
            return []
        return ["NFT old policy"] + (["NFT KL reference"] if self.uses_reference else [])

    def reference_velocity(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The reference's prediction (backbone arguments): the frozen copy, or with a PEFT adapter an
        :class:`~rededit.models.adapters.AdapterView` of the backbone with its adapters disabled, in eval mode and
        with the initial FireEdit weights swapped in, i.e. exactly the base the adapter was injected into (no
        copy, as the official trainer's ``disable_adapter``). Call under ``no_grad``."""
        if self.reference is None:
            raise RuntimeError(
                "NFT has no KL reference: under FSDP2/HSDP it is built in configure_optimizers, i.e. only "
                "by trainer.fit"
            )
        return self.reference(*args, **kwargs)

    def _set_reference(self, ref: nn.Module) -> None:
        self._ref[0] = ref
        if isinstance(ref, adapters.AdapterView):  # the base, not the adapter (as DPO's reference)
            self._reference_fingerprint = adapters.weights_fingerprint(self.backbone)
        else:
            self._reference_fingerprint = backbone_fingerprint(ref)

    def _move_frozen(self) -> None:
        super()._move_frozen()
        self.reward.to(self.device)
        if self.reference is not None and not is_sharded(self.reference):
            self.reference.to(self.device)
        if self.old_policy is not None:
            if not is_sharded(self.old_policy):  # a sharded twin was materialised on its device
                self.old_policy.to(self.device)
            self._alias_shadow()

    def _alias_shadow(self) -> None:
        """Point the EMA shadow at the old policy's parameters (trainable names of the policy)."""
        names = [n for n, p in self.backbone.named_parameters() if p.requires_grad]
        if isinstance(self.old_policy, adapters.AdapterView):
            # adapter tensors: the nft_old adapter's; FireEdit tensors: the view's fp32 copies
            params = dict(self.backbone.named_parameters())
            own = set(adapters.adapter_parameter_names(self.backbone))
            self.old_ema.shadow = {
                n: params[adapters.renamed_adapter_parameter(n, adapters.ADAPTER_NAME, OLD_ADAPTER)].data
                if n in own
                else self.old_policy.weights[n]
                for n in names
            }
            return
        old = dict(self.old_policy.named_parameters())
        self.old_ema.shadow = {n: old[n].data for n in names}

    def adapter_applied(self) -> None:
        # A second adapter, not a second backbone (fp32 like peft's adapter weights: the lerp runs in place),
        # added before FSDP2 shards the backbone so that its tensors are sharded with their layers.
        if self._adapter_on and not adapters.has_adapter(self.backbone, OLD_ADAPTER):
            adapters.add_copy_of_adapter(self.backbone, OLD_ADAPTER)

    def configure_model(self) -> None:
        super().configure_model()
        if self._adapter_on:
            # Views of the (possibly sharded) backbone, no collective but the fingerprint: built on every rank
            # here under every strategy. The FireEdit copies are taken from the (sharded) initial weights.
            if self.uses_reference and self.reference is None:
                ref = adapters.AdapterView(
                    self.backbone, None, adapters.non_adapter_trainables(self.backbone)
                )
                self._set_reference(ref)
            if self.old_policy is None:
                extras = adapters.non_adapter_trainables(self.backbone)
                self._old[0] = adapters.AdapterView(self.backbone, OLD_ADAPTER, extras)
                self._alias_shadow()
            return
        if self.parallel_plan() is not None:
            return  # sharded backbone: old policy and reference are built collectively in configure_optimizers
        if self.uses_reference and self.reference is None:
            # The initial (init_from) weights, before the old policy and training move away from them.
            self._set_reference(copy.deepcopy(self.backbone).eval().requires_grad_(False))
        if self.old_policy is not None:
            return
        # fp32 so the EMA lerp (fp32 shadow) runs in place on the module's own tensors.
        old = copy.deepcopy(self.backbone).float().eval().requires_grad_(False)
        self._old[0] = old
        self._alias_shadow()

    def configure_optimizers(self) -> Any:
        out = super().configure_optimizers()  # first fills a meta-initialised backbone from init_from
        if self.old_policy is None and self.parallel_plan() is not None and not self._adapter_on:
            # fp32 like the unsharded copy: the EMA lerp writes into its local shards in place.
            self._old[0] = sharded_frozen_twin(self, dtype=torch.float32)
            self._alias_shadow()
            log.info("NFT: sharded old policy built from the backbone (FSDP2/HSDP)")
        if self.uses_reference and self.reference is None and not self._adapter_on and self.parallel_plan():
            # Before Lightning restores a resumed checkpoint: the backbone still holds the init weights.
            self._set_reference(sharded_frozen_twin(self))
            log.info("NFT: sharded KL reference built from the initial backbone (FSDP2/HSDP)")
        return out

    # ------------------------------------------------------------------ rollout
    def _micro_step(self, batch: Mapping[str, Any]) -> int:
        return int(batch["epoch"]) * STEPS_PER_EPOCH_STRIDE + int(batch["step"])

    @torch.no_grad()
    def rollout(
        self,
        batch: Mapping[str, Any],
        refs: list[torch.Tensor],
        text_emb: torch.Tensor,
        text_mask,
        shape,
        regions: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Old-policy edits (latents ``[B·G, C, h, w]``) of the G-repeated batch (``regions``: its backbone
        region boxes, G-repeated, or None)."""
        micro = self._micro_step(batch)
        gen = torch_generator(self.seed, "rollout", micro, self.global_rank)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device)
        kwargs = dict(
            noise=noise, references=refs, text_emb=text_emb, text_mask=text_mask, steps=self.rollout_steps
        )
        with self.old_policy.using_regions(regions):
            if self.rollout_sampler == "sde":
                sde_gen = torch_generator(self.seed, "rollout-sde", micro, self.global_rank)
                return sde_sample(
                    self.old_policy, noise_level=self.sde_noise_level, generator=sde_gen, **kwargs
                )
            return euler_sample(self.old_policy, **kwargs)

    @torch.no_grad()
    def score(self, images01: torch.Tensor, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
        """Reward dict and hack monitors of decoded edits ``[N, 3, H, W]`` in [0, 1]."""
        out = self.reward(images01, batch)
        if "reward" not in out:
            raise ValueError(
                f"the reward {type(self.reward).__name__} returned no 'reward' key: {sorted(out)}"
            )
        monitors: dict[str, torch.Tensor] = {}
        if self.monitors:
            masks = None
            if "edit_mask" in batch and bool(torch.as_tensor(batch.get("has_edit_mask", False)).all()):
                masks = batch["edit_mask"].to(images01.device)
            monitors = hack_monitors(images01, source_from_batch(batch, images01), masks)
            # The OCR reward already read these images: its text area (same text_area_fraction) is the monitor.
            if "ocr_text_area" in out:
                monitors["text_area_fraction"] = out["ocr_text_area"].float().to(images01.device)
        return out, monitors

    # ------------------------------------------------------------------ loss
    def nft_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Rollout → reward → r → eq. (3). Returns the scalar loss and what to log."""
        g = self.group_size
        _, refs = self.encode_images(batch)  # the target latent is not used: the rollout replaces it
        text_emb, text_mask = self.text_condition(batch)
        b = text_emb.shape[0]
        big = repeat_batch(batch, g)
        refs_g = [r.repeat_interleave(g, 0) for r in refs]
        emb_g, mask_g = text_emb.repeat_interleave(g, 0), text_mask.repeat_interleave(g, 0)
        f = self.vae.downsample
        h, w = batch["target"].shape[-2:]
        shape = (b * g, self.vae.latent_channels, h // f, w // f)
        regions = self.backbone.batch_regions(batch)  # backbone region tokens (None when off)
        regions_g = None if regions is None else [r for r in regions for _ in range(g)]
        x0 = self.rollout(batch, refs_g, emb_g, mask_g, shape, regions_g)
        with torch.no_grad():
            images01 = ((self.vae.decode(x0).float().clamp(-1, 1) + 1) / 2).clamp(0, 1)
        rewards, monitors = self.score(images01, big)
        groups = torch.arange(b, device=x0.device).repeat_interleave(g)
        official = self.nft_form == "official"
        clip = self.official_adv_clip if official else self.adv_clip
        r, adv, valid = optimality_probability(
            rewards["reward"].to(x0.device), groups, adv_clip=clip, scale=self.adv_scale
        )
        sigma, eps = self._draw(batch, x0)
        x_t = interpolate(x0, eps, sigma)
        v = self.backbone.velocity_target(x0, eps, sigma)
        v_theta = self.backbone(x_t, refs_g, sigma, emb_g, mask_g, regions=regions_g).float()
        with torch.no_grad():
            v_old = self.old_policy(x_t, refs_g, sigma, emb_g, mask_g, regions=regions_g).float()
        if official:
            sigma_c = self.backbone.effective_sigma(sigma)  # the σ that maps this backbone's output to x̂0
            per_sample = nft_loss_official(
                v_theta,
                v_old,
                x_t,
                x0,
                sigma_c,
                r,
                self.nft_beta,
                adv_clip=clip,
                adaptive_weighting=self.adaptive_weighting,
            )
        else:
            # eq. (3) / β: β sets the trust region, not the step size (rededit.losses.nft, "β and the step size").
            per_sample = nft_loss(v_theta, v_old, v, r, self.nft_beta, inverse_beta=True)
        vf = valid.float()
        loss = (per_sample * vf).sum() / vf.sum().clamp_min(1.0)
        kl = None
        if self.uses_reference:
            with torch.no_grad():
                v_ref = self.reference_velocity(x_t, refs_g, sigma, emb_g, mask_g, regions=regions_g).float()
            kl = nft_kl(v_theta, v_ref)  # every sample: the KL does not depend on the reward
            loss = loss + self.kl_weight * kl.mean()
        with torch.no_grad():
            beta = self.nft_beta
            v_pos = (1 - beta) * v_old + beta * v_theta
            v_neg = (1 + beta) * v_old - beta * v_theta
            mse = (v_theta - v).pow(2).flatten(1).mean(1)
            finite = rewards["reward"][torch.isfinite(rewards["reward"])].float()
            logs: dict[str, torch.Tensor] = {
                "reward/mean": finite.mean() if finite.numel() else torch.tensor(float("nan")),
                "reward/std": finite.std(unbiased=False) if finite.numel() else torch.tensor(float("nan")),
                "nft/r_mean": r[valid].mean() if valid.any() else torch.tensor(0.5),
                "nft/r_std": r[valid].std(unbiased=False) if valid.any() else torch.tensor(0.0),
                "nft/adv_abs_mean": adv[valid].abs().mean() if valid.any() else torch.tensor(0.0),
                "nft/valid_frac": vf.mean(),
                # Groups whose G rewards are all equal carry no signal (r = ½ everywhere).
                "nft/flat_group_frac": (adv.view(b, g).abs().amax(1) == 0).float().mean(),
                "nft/pos_mse": (v_pos - v).pow(2).flatten(1).mean(1).mean(),
                "nft/neg_mse": (v_neg - v).pow(2).flatten(1).mean(1).mean(),
                "nft/policy_old_mse": (v_theta - v_old).pow(2).flatten(1).mean(1).mean(),
                "nft/old_decay": torch.tensor(self.old_ema.decay_at(self.old_ema.num_updates)),
            }
            if kl is not None:
                logs["nft/kl"] = kl.mean()
                logs["nft/old_kl"] = (v_old - v_ref).pow(2).flatten(1).mean(1).mean()
            for key, value in rewards.items():
                if key == "reward" or not torch.is_tensor(value) or value.shape != (b * g,):
                    continue
                vals = value.float()[torch.isfinite(value.float())]
                if vals.numel():
                    logs[f"reward/{key}"] = vals.mean()
            for key, value in monitors.items():
                vals = value.float()[torch.isfinite(value.float())]
                if vals.numel():
                    logs[f"monitor/{key}"] = vals.mean()
        return loss, {"sigma": sigma, "mse": mse, "logs": logs, "n": b * g}

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self.training:
            return super().compute_loss(batch)  # val/loss: flow matching on held-out targets
        loss, parts = self.nft_step(batch)
        for key, value in parts.pop("logs").items():
            self.log(key, value.float(), on_step=True, on_epoch=True, batch_size=parts["n"])
        return loss, parts

    # ------------------------------------------------------------------ old-policy soft update
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # once per optimizer step, not per accumulation micro-batch
        # Right after the step, not in on_train_batch_end: Lightning runs the LightningModule's batch-end hook
        # *after* the callbacks', i.e. after ModelCheckpoint saved, so a checkpoint would miss this update and
        # a resumed run would drift from the uninterrupted one.
        self.old_ema.update(self)
        self.old_ema.last_step = self.trainer.global_step

    def _load_old_state(self, state: Mapping[str, Any]) -> None:
        if isinstance(self.old_policy, adapters.AdapterView):
            params = self.old_ema.shadow  # aliases of the nft_old adapter and the view's FireEdit copies
        else:
            params = dict(self.old_policy.named_parameters())
        with torch.no_grad():
            for name, value in state["shadow"].items():
                _copy_full_(params[name], value)
        self._load_counters(state)

    def _load_counters(self, state: Mapping[str, Any]) -> None:
        self.old_ema.num_updates = int(state["num_updates"])
        self.old_ema.last_step = int(state.get("last_step", 0))
        self._alias_shadow()

    def _old_policy_in_dcp(self) -> bool:
        """The old policy is sharded and the strategy writes sharded (DCP) checkpoints."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return (
            self.old_policy is not None
            and not isinstance(self.old_policy, adapters.AdapterView)  # its shadow goes into nft_old_policy
            and is_sharded(self.old_policy)
            and bool(getattr(strategy, "_save_distributed_checkpoint", False))
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._reference_fingerprint is not None:
            checkpoint["nft_reference_fingerprint"] = self._reference_fingerprint
        if self._old_policy_in_dcp():
            # Rank 0 alone writes the non-state-dict keys (meta.pt): the shards go through the state dict,
            # every tensor (frozen ones too) so the resume needs nothing else.
            checkpoint["state_dict"].update(
                {DCP_OLD_PREFIX + n: p.detach() for n, p in self.old_policy.named_parameters()}
            )
            ema = self.old_ema
            counters = {"decay": ema.decay, "num_updates": ema.num_updates, "last_step": ema.last_step}
            checkpoint["nft_old_policy"] = {**counters, "sharded": True, "shadow": {}}
        else:
            checkpoint["nft_old_policy"] = self.old_ema.state_dict()  # gathers a sharded shadow (collective)

    def _load_old_shards(self) -> None:
        """Every rank reads its old-policy shards from the resumed DCP directory (``__nft_old__.*``)."""
        path = self.trainer.ckpt_path
        target = {
            "state_dict": {DCP_OLD_PREFIX + n: p.detach() for n, p in self.old_policy.named_parameters()}
        }
        safe_dcp_load(target, path)  # in place into the local shards
        log.info("NFT: loaded the sharded old policy from %s", path)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # configure_model: backbone + old policy exist now
        saved_ref, current_ref = checkpoint.get("nft_reference_fingerprint"), self._reference_fingerprint
        if (
            saved_ref is not None
            and current_ref is not None
            and abs(saved_ref - current_ref) > 1e-6 * max(1.0, abs(saved_ref))
        ):
            raise RuntimeError(
                "the NFT KL reference rebuilt from stage.init_from differs from the one the checkpoint was "
                f"trained against (fingerprint {current_ref:.6g} vs {saved_ref:.6g}): resume with the same init_from"
            )
        state = checkpoint.get("nft_old_policy")
        if state is None:
            return
        if self.old_policy is None:
            raise RuntimeError(
                "the checkpoint has an NFT old policy but none was built: under FSDP2/HSDP it is created in "
                "configure_optimizers, i.e. only by trainer.fit"
            )
        if state.get("sharded"):
            if not is_sharded(self.old_policy):
                raise RuntimeError(
                    "this checkpoint's NFT old policy is sharded (a DCP directory): resume it with "
                    "strategy=fsdp2/hsdp, or consolidate it with rededit-consolidate first"
                )
            self._load_old_shards()
            self._load_counters(state)
            return
        if isinstance(self.old_policy, adapters.AdapterView):
            self._load_old_state(state)  # the base is shared: only the old adapter / FireEdit weights load
            return
        # Frozen tensors (not in the EMA state) equal the policy's: take them from the checkpoint too,
        # the old policy was copied from the freshly built backbone before its weights were loaded.
        saved = checkpoint.get("state_dict", {})
        with torch.no_grad():
            if is_sharded(self.old_policy) and not saved:
                # FSDP2 restores the backbone before this hook (and drops the state dict): copy its shards.

                copy_shards_(self.old_policy, self.backbone)
            else:
                for name, t in self.old_policy.named_parameters():
                    if name not in state["shadow"] and f"backbone.{name}" in saved:
                        _copy_full_(t, saved[f"backbone.{name}"])
        self._load_old_state(state)


@torch.no_grad()
def _copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param ← value`` for a full tensor ``value``; a sharded ``param`` keeps its own shard of it."""
    if hasattr(param, "to_local"):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(value.to(param.device, param.dtype))
