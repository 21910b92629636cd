"""Every stage × strategy × adapter pair at start-up (issue 21 "every stage under every strategy", issue 20).

No processes: each pair's config is composed, its stage instantiated and its start-up check run
(``BaseStage.setup``, which Lightning calls before ``configure_model``) against the Lightning strategy the
``strategy=`` preset builds. The expectation table is written out here, independently of
``rededit.parallel.stage_support``:

* DPO's reference and NFT's old policy / KL reference are deep copies without an adapter: refused under
  FSDP1-hybrid (an unsharded copy on every rank) and DeepSpeed ZeRO-3 (a copy of partitioned placeholders);
  fine under auto / ddp / ZeRO-2 (copies) and fsdp2 / hsdp (sharded twins).
* Adapters run under auto / ddp / fsdp2 / hsdp only; elsewhere refused for every stage.
* A refusal names the strategy, the stage and what to use instead.
"""

from __future__ import annotations

import types

import pytest

from conftest import compose
from rededit.parallel.stage_support import UnsupportedStrategy, check_stage_strategy, strategy_kind

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

STRATEGIES = ("auto", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp1_hybrid", "fsdp2", "hsdp")
STAGES = {
    "pretrain": ("stage=pretrain",),
    "sft": ("stage=sft",),
    "dpo": ("stage=dpo",),
    "nft": ("stage=nft",),
    "nft_official_kl": ("stage=nft", "stage.nft.form=official", "stage.nft.kl_weight=0.1"),
}
KINDS = {
    "auto": "auto",
    "ddp": "ddp",
    "deepspeed_zero2": "deepspeed_zero2",
    "deepspeed_zero3": "deepspeed_zero3",
    "fsdp1_hybrid": "fsdp1",
    "fsdp2": "fsdp2",
    "hsdp": "hsdp",
}


def _refused(stage: str, strategy: str, adapter: bool) -> bool:
    if adapter:
        return strategy in ("deepspeed_zero2", "deepspeed_zero3", "fsdp1_hybrid")
    return stage.startswith(("dpo", "nft")) and strategy in ("deepspeed_zero3", "fsdp1_hybrid")


@pytest.fixture(scope="module")
def strategies() -> dict:
    """The Lightning strategy of each preset, built as ``rededit-train`` builds it, and its config node."""
    from rededit.train import build_strategy

    out = {}
    for name in STRATEGIES:
        node = compose([f"strategy={name}"]).strategy
        out[name] = (node, build_strategy(node))
    return out


@pytest.fixture(scope="module")
def stages() -> dict:
    """One instantiated (not configured) stage per stage config × adapter."""
    from hydra.utils import instantiate

    out = {}
    for name, overrides in STAGES.items():
        for adapter in ("none", "lora"):
            cfg = compose(["backbone.transformer_config.num_layers=1", *overrides, f"adapter={adapter}"])
            out[name, adapter] = instantiate(cfg.stage, text_encoder=None)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_kind_from_config_and_instance(strategy, strategies) -> None:
    node, instance = strategies[strategy]
    assert strategy_kind(node) == strategy_kind(instance) == KINDS[strategy]


@pytest.mark.parametrize("adapter", ["none", "lora"])
@pytest.mark.parametrize("stage_name", list(STAGES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_stage_strategy_pair_at_startup(strategy, stage_name, adapter, strategies, stages) -> None:
    stage = stages[stage_name, adapter]
    _, instance = strategies[strategy]
    stage._trainer = types.SimpleNamespace(strategy=instance)  # what setup() reads of the trainer
    try:
        if _refused(stage_name, strategy, adapter == "lora"):
            with pytest.raises(UnsupportedStrategy) as err:
                stage.setup("fit")
            message = str(err.value)
            short = stage_name.split("_")[0]
            assert f"stage={short if short != 'pretrain' else 'pretrain'}" in message
            assert f"strategy={strategy.split('_hybrid')[0]}" in message
            assert "strategy=fsdp2" in message  # what to use instead
            if adapter == "lora":
                assert "adapter=lora" in message
        else:
            stage.setup("fit")
    finally:
        stage._trainer = None


def test_frozen_models_each_stage_builds(stages) -> None:
    """What the check is told: the frozen copies each stage would make (none with an adapter)."""
    assert stages["sft", "none"].frozen_copies() == []
    assert stages["dpo", "none"].frozen_copies() == ["DPO reference"]
    assert stages["nft", "none"].frozen_copies() == ["NFT old policy"]
    assert stages["nft_official_kl", "none"].frozen_copies() == ["NFT old policy", "NFT KL reference"]
    assert all(stages[name, "lora"].frozen_copies() == [] for name in STAGES)


def test_check_says_how_frozen_models_are_held() -> None:
    assert check_stage_strategy("ddp", "dpo", frozen_copies=["DPO reference"], adapter=None) == "copy"
    assert (
        check_stage_strategy("hsdp", "dpo", frozen_copies=["DPO reference"], adapter=None) == "sharded twin"
    )
    assert check_stage_strategy("fsdp2", "nft", frozen_copies=[], adapter="lora") == "adapter view"
    assert check_stage_strategy("fsdp1", "sft", frozen_copies=[], adapter=None) == "none"
    with pytest.raises(
        UnsupportedStrategy, match=r"NFT old policy and NFT KL reference would be a deep copy"
    ):
        check_stage_strategy(
            "deepspeed_zero3", "nft", frozen_copies=["NFT old policy", "NFT KL reference"], adapter=None
        )
    assert strategy_kind("deepspeed_stage_3") == "deepspeed_zero3" and strategy_kind("ddp_spawn") == "ddp"
