"""Which stage may run under which strategy: the frozen models of DPO / NFT and adapters (issues 20, 21).

DPO's reference and NFT's old policy / KL reference are frozen models beside the trained backbone. How each
strategy holds them:

================  ============================================  ==========================================
strategy          without an adapter                            with an adapter (LoRA / LoKr / LoHa)
================  ============================================  ==========================================
auto, ddp         a deep copy per rank (as the backbone itself)  the backbone with its adapter off / a
                                                                 second adapter (no copy)
fsdp2, hsdp       a frozen twin sharded like the backbone        the same, on the sharded backbone
                  (``stages.dpo.sharded_frozen_twin``)
deepspeed_zero2   a deep copy per rank (ZeRO-2 keeps full        refused (see below)
                  parameters on every rank, like DDP)
fsdp1_hybrid      refused: the copy is made before FSDP1 wraps   refused
                  the module and nothing shards it (a full
                  unsharded copy on every rank)
deepspeed_zero3   refused: ``configure_model`` runs under        refused
                  ``deepspeed.zero.Init``, so a deep copy copies
                  the partitioned placeholders, not the weights
================  ============================================  ==========================================

Adapters are built and tested for the strategies full fine-tuning is tested with on CPU (single device, DDP,
FSDP2/HSDP; issue 20): FSDP1 flattens the parameters that the adapter checkpoints, the DPO/NFT adapter switches
and the FireEdit weight swaps address by name, and DeepSpeed partitions them (ZeRO-3) and writes its own engine
checkpoints (every tensor, no adapter record); neither runs on CPU, so neither could be proven here. Such a
combination is refused at start-up (``BaseStage.setup``), naming the strategy, the stage and what to use instead,
rather than failing or silently training wrong after minutes of loading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Strategies whose frozen models are deep copies (each rank holds full parameters anyway).
COPY_STRATEGIES = ("auto", "single", "ddp", "deepspeed_zero1", "deepspeed_zero2")
#: Strategies whose frozen models are sharded twins of the backbone.
SHARDED_TWIN_STRATEGIES = ("fsdp2", "hsdp")
#: Strategies an adapter run may use.
ADAPTER_STRATEGIES = ("auto", "single", "ddp", "fsdp2", "hsdp")

_WHY_NO_COPY = {
    "fsdp1": (
        "the copy is made in configure_model, before FSDP1 wraps the module, and nothing shards it: a full "
        "unsharded backbone on every rank"
    ),
    "deepspeed_zero3": (
        "configure_model runs under deepspeed.zero.Init, so a deep copy copies ZeRO-3's partitioned parameter "
        "placeholders, not the weights"
    ),
}


class UnsupportedStrategy(ValueError):
    """A stage × strategy (× adapter) combination that rededit refuses at start-up (the message says why)."""


def _zero_stage(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 2  # Lightning's DeepSpeedStrategy default


def strategy_kind(strategy: Any) -> str:
    """The strategy's kind: ``auto``, ``single``, ``ddp``, ``fsdp2``, ``hsdp``, ``fsdp1``, ``deepspeed_zero{1,2,3}``
    or ``other``.

    Args:
        strategy: a Lightning strategy instance, a strategy name (``"auto"``, ``"ddp"``, ...) or a ``strategy=``
            config node (``conf/strategy/*.yaml``: ``_target_``, ``stage``, ``parallelize.hsdp``). Read by class
            name so that neither Lightning nor DeepSpeed is imported here.
    """
    if isinstance(strategy, str):
        name = strategy.lower()
        if name.startswith("ddp"):
            return "ddp"
        if name.startswith("deepspeed"):
            digits = [c for c in name if c.isdigit()]
            return f"deepspeed_zero{digits[-1] if digits else 2}"
        if name.startswith("fsdp"):
            return "fsdp1"  # Lightning's "fsdp" is FSDP1
        return {"single_device": "single", "auto": "auto"}.get(name, "other")
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_") or "")
        if not target:
            return strategy_kind(str(strategy.get("name") or "auto"))
        cls = target.rsplit(".", 1)[-1]
        if cls in ("FSDP2Strategy", "ModelParallelStrategy"):
            plan = strategy.get("parallelize") or {}
            return "hsdp" if plan.get("hsdp", False) else "fsdp2"
        if cls == "DeepSpeedStrategy":
            return f"deepspeed_zero{_zero_stage(strategy.get('stage', 2))}"
        return _kind_of_class_names([cls])
    names = [c.__name__ for c in type(strategy).__mro__]
    if "ModelParallelStrategy" in names:
        plan = getattr(strategy, "plan", None)
        return "hsdp" if plan is not None and getattr(plan, "hsdp", False) else "fsdp2"
    if "DeepSpeedStrategy" in names:
        config = getattr(strategy, "config", None) or {}
        return f"deepspeed_zero{_zero_stage(config.get('zero_optimization', {}).get('stage', 2))}"
    return _kind_of_class_names(names)


def _kind_of_class_names(names: Sequence[str]) -> str:
    for cls, kind in (
        ("FSDPStrategy", "fsdp1"),
        ("DDPStrategy", "ddp"),
        ("SingleDeviceStrategy", "single"),
    ):
        if cls in names:
            return kind
    return "other"


def check_stage_strategy(kind: str, stage: str, *, frozen_copies: Sequence[str], adapter: str | None) -> str:
    """Refuse a combination the table of the module docstring marks "refused"; else say how the frozen models
    are held (``"copy"``, ``"sharded twin"``, ``"adapter view"`` or ``"none"``).

    Args:
        kind: :func:`strategy_kind` of the run's strategy.
        stage: the stage's name for the message (``dpo``, ``nft``, ``sft``, ...).
        frozen_copies: the frozen models the stage would build as copies of the backbone (no adapter), e.g.
            ``["DPO reference"]``; empty when it builds none (SFT, or an adapter run).
        adapter: the adapter type (``lora`` / ``lokr`` / ``loha``) or None for full fine-tuning.

    Raises:
        UnsupportedStrategy: naming the strategy, the stage and what to use instead.
    """
    label = {"fsdp1": "fsdp1_hybrid (FSDP1)"}.get(kind, kind)
    if adapter is not None:
        if kind not in ADAPTER_STRATEGIES and kind != "other":
            raise UnsupportedStrategy(
                f"adapter={adapter} with strategy={label} (stage={stage}) is not supported: adapters run under "
                f"strategy=auto|ddp|fsdp2|hsdp, where their checkpoints, the DPO/NFT adapter switches and the "
                f"FireEdit weight swaps are tested; FSDP1 flattens and DeepSpeed partitions the parameters they "
                f"address by name. Use strategy=fsdp2 (or hsdp across nodes) with adapter={adapter}"
            )
        return "adapter view" if frozen_copies or stage in ("dpo", "nft") else "none"
    if not frozen_copies:
        return "none"
    if kind in _WHY_NO_COPY:
        what = " and ".join(frozen_copies)
        raise UnsupportedStrategy(
            f"stage={stage} with strategy={label} is not supported: its {what} would be a deep copy of the "
            f"backbone, and {_WHY_NO_COPY[kind]}. Use strategy=hsdp (FSDP2 hybrid sharding, shard inside a node "
            f"and replicate across nodes) or strategy=fsdp2: there the {what} is a frozen twin sharded like the "
            f"backbone; or train an adapter (adapter=lora with strategy=fsdp2|hsdp|ddp): then it is the backbone "
            f"itself with the adapter switched, no copy"
        )
    return "sharded twin" if kind in SHARDED_TWIN_STRATEGIES else "copy"
