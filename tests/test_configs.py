"""Every option of every config group composes, and what can be built on a CPU box without weights is built.

Options that need local production weights (``backbone=qwen_image``, ``vae=qwen_image``,
``text_encoder=qwen_vl``), a GPU (``trainer=gpu``) or packages outside the default install
(``strategy=fsdp1_hybrid`` / ``deepspeed_zero*``: instantiated, never run; the tensorboard and wandb loggers when absent) are composed and
checked, not instantiated. A config group missing from :data:`CHECKS` fails the inventory test, so a new
group cannot go untested.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conftest import CONF_DIR, compose
from rededit.train import _instantiate_group, build_strategy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WEIGHT_PATHS = {"backbone.pretrained_path", "vae.path", "text_encoder.path"}
WEIGHT_PATHS |= {"reward.scorer.path", "reward.rewards.vlm.scorer.path"}  # local VLM judge folder
LATENT_CHANNELS = 48  # conf/vae/pixel.yaml: factor 4 → 3·4² channels


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_stage(cfg: DictConfig, option: str) -> None:
    stage = instantiate(cfg.stage, text_encoder=None)
    assert isinstance(stage, L.LightningModule) and stage.backbone is None  # built in configure_model
    stage.configure_model()
    assert stage.backbone.latent_channels == LATENT_CHANNELS
    assert stage.configure_optimizers() is not None


def _check_backbone(cfg: DictConfig, option: str) -> None:
    assert cfg.backbone._partial_ is True  # built by the stage in configure_model (FSDP delayed init)
    if OmegaConf.is_missing(cfg.backbone, "pretrained_path"):  # qwen_image and its variant presets: a folder
        assert OmegaConf.missing_keys(cfg.backbone) == {"backbone.pretrained_path"}
        assert cfg.backbone.zero_cond_t is None  # the folder decides (issue 19)
        assert cfg.backbone.variant in (None, option) and cfg.backbone.expected_config.num_layers == 60
        return
    channels = cfg.backbone.transformer_config.in_channels // cfg.backbone.patch_size**2
    backbone = instantiate(cfg.backbone)(latent_channels=channels)
    x = torch.zeros(1, channels, 4, 4)
    text = torch.zeros(1, 3, cfg.backbone.transformer_config.joint_attention_dim)
    out = backbone(x, [x], torch.full((1,), 0.5), text, torch.ones(1, 3, dtype=torch.bool))
    assert out.shape == x.shape


def _check_vae(cfg: DictConfig, option: str) -> None:
    if option == "qwen_image":
        assert OmegaConf.missing_keys(cfg.vae) == {"vae.path"}
        return
    vae = instantiate(cfg.vae)
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    assert torch.allclose(vae.decode(vae.encode(image)), image, atol=1e-6)


def _check_text_encoder(cfg: DictConfig, option: str) -> None:
    if option == "qwen_vl":
        assert OmegaConf.missing_keys(cfg.text_encoder) == {"text_encoder.path"}
        return
    emb, mask = instantiate(cfg.text_encoder).encode(["make the sky red"], None)
    assert emb.shape[-1] == 384 and mask.shape == emb.shape[:2] and mask.any()


def _check_timestep(cfg: DictConfig, option: str) -> None:
    sampler = instantiate(cfg.timestep.sampler)
    sigma = sampler.sample(16, step=3, world_size=2, rank=1, seed=0)
    assert sigma.shape == (16,) and bool(((sigma > 0) & (sigma < 1)).all())
    if cfg.timestep.curriculum is not None:
        curriculum = instantiate(cfg.timestep.curriculum)
        assert curriculum.bias_at(0) > curriculum.bias_at(curriculum.anneal_steps) == 0.0


def _check_optimizer(cfg: DictConfig, option: str) -> None:
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert tuple(optimizer.defaults["betas"]) == (0.9, 0.999)  # Table 1


def _check_callbacks(cfg: DictConfig, option: str) -> None:
    callbacks = _instantiate_group(cfg.callbacks)
    assert all(isinstance(c, L.Callback) for c in callbacks)
    assert len(callbacks) == len(cfg.callbacks)


def _check_trainer(cfg: DictConfig, option: str) -> None:
    assert (
        cfg.trainer.use_distributed_sampler is False
    )  # docs/architecture.md rule 5: the bucket sampler shards
    if option == "gpu":
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        return
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    assert isinstance(trainer, L.Trainer)


def _check_strategy(cfg: DictConfig, option: str) -> None:
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    from rededit.parallel.strategy import FSDP2Strategy

    expected = {
        "auto": str,
        "ddp": DDPStrategy,
        "fsdp2": FSDP2Strategy,
        "hsdp": FSDP2Strategy,
        "fsdp1_hybrid": FSDPStrategy,  # GPU only: instantiated here, never run on CPU
        "deepspeed_zero2": DeepSpeedStrategy,
        "deepspeed_zero3": DeepSpeedStrategy,
    }
    strategy = build_strategy(cfg.strategy)
    assert isinstance(strategy, expected[option]) and cfg.strategy.name == option
    if isinstance(strategy, ModelParallelStrategy):
        assert strategy.plan.hsdp == (option == "hsdp") and strategy._save_distributed_checkpoint
    if isinstance(strategy, DeepSpeedStrategy):
        assert strategy.config["zero_optimization"]["stage"] == int(option[-1])
    if isinstance(strategy, FSDPStrategy):
        assert strategy.sharding_strategy.name == "HYBRID_SHARD"


def _check_logger(cfg: DictConfig, option: str) -> None:
    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(option, ())
    if needs and not any(importlib.util.find_spec(m) for m in needs):
        assert all("_target_" in node for node in cfg.logger.values())
        return
    loggers = _instantiate_group(cfg.logger)
    assert loggers and all(isinstance(lg, L.pytorch.loggers.Logger) for lg in loggers)


def _check_experiment(cfg: DictConfig, option: str) -> None:
    header = (CONF_DIR / "experiment" / f"{option}.yaml").read_text().splitlines()[0]
    assert header == "# @package _global_"
    assert cfg.stage_name != "pretrain" or option == "pretrain"  # a recipe names its runs
    instantiate(cfg.stage, text_encoder=None)


def _check_debug(cfg: DictConfig, option: str) -> None:
    assert (CONF_DIR / "debug" / f"{option}.yaml").read_text().startswith("# @package _global_")


def _check_buckets(cfg: DictConfig, option: str) -> None:
    from rededit.data.buckets import ResolutionSet

    resset = ResolutionSet.from_config(cfg.data.buckets)
    assert len(resset) > 0


def _check_reward(cfg: DictConfig, option: str) -> None:
    from rededit.rewards import Reward

    for node in (cfg.reward, *cfg.reward.get("rewards", {}).values()):
        if "scorer" in node:  # a factory (_partial_): no model is loaded, so any folder name will do
            node.scorer.path = "/nonexistent/vlm"
    reward = instantiate(cfg.reward)
    assert isinstance(reward, Reward) and reward.name


def _check_loss_consistency(cfg: DictConfig, option: str) -> None:
    from rededit.losses.consistency import ConsistencyLoss

    # The group fills stage.auxiliary_losses, which only the SFT stage takes: compose it with one.
    sft = compose(["experiment=demo_sft", f"loss/consistency={option}"])
    stage = instantiate(sft.stage, text_encoder=None)
    expected = {"none": set(), "face": {"loss_id"}, "object": {"loss_obj"}}[option]
    assert set(stage.auxiliary_losses) == expected
    assert all(isinstance(m, ConsistencyLoss) for m in stage.auxiliary_losses.values())


def _check_hydra_launcher(cfg: DictConfig, option: str) -> None:
    # The launcher lives in the hydra node (removed from a task's config): compose it again with it.
    launcher = compose([f"hydra/launcher={option}"], keep_hydra=True).hydra.launcher
    assert launcher._target_.startswith(
        "hydra_plugins.hydra_submitit_launcher."
    )  # tests/test_slurm_launch.py


def _check_hparams_search(cfg: DictConfig, option: str) -> None:
    # The sweeper lives in the hydra node: compose it again with it (the sweep itself: tests/test_sweeps.py).
    full = compose([f"hparams_search={option}"], keep_hydra=True)
    assert full.hydra.sweeper._target_.startswith("hydra_plugins.hydra_optuna_sweeper.")
    assert full.hydra.sweeper.params and cfg.optimized_metric


def _check_hydra_help(cfg: DictConfig, option: str) -> None:
    # The template asks rededit.cli.help for the groups (tests/test_entry_help.py runs --help itself).
    from rededit.cli import help as entry_help

    entry_help.register()
    template = compose([f"hydra/help={option}"], keep_hydra=True).hydra.help.template
    assert "experiment: " in template and "eval/benchmark" not in template


def _check_adapter(cfg: DictConfig, option: str) -> None:
    # none = full fine-tune (no peft layer); lora/lokr/loha inject a PEFT adapter (tests/test_adapters.py)
    from rededit.models import adapters

    assert cfg.stage.adapter.type == option
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()
    assert adapters.has_adapter(stage.backbone) is (option != "none")


CHECKS: dict[str, Callable[[DictConfig, str], None]] = {
    "adapter": _check_adapter,
    "stage": _check_stage,
    "backbone": _check_backbone,
    "vae": _check_vae,
    "text_encoder": _check_text_encoder,
    "timestep": _check_timestep,
    "optimizer": _check_optimizer,
    "callbacks": _check_callbacks,
    "trainer": _check_trainer,
    "strategy": _check_strategy,
    "logger": _check_logger,
    "experiment": _check_experiment,
    "debug": _check_debug,
    "data/buckets": _check_buckets,
    "reward": _check_reward,
    "loss/consistency": _check_loss_consistency,
    "hydra/launcher": _check_hydra_launcher,
    "hydra/help": _check_hydra_help,
    "hparams_search": _check_hparams_search,
}
SINGLE_OPTION = {"paths", "hydra", "data"}  # one option each, composed by every test here
CASES = [(group, option) for group in CHECKS for option in _options(group)]


def test_every_config_group_is_checked() -> None:
    # conf/eval/ holds the groups of the other primary config (conf/eval.yaml, rededit-eval); its
    # options are composed by tests/test_evaluate.py. conf/engine/ likewise (conf/engine.yaml, rededit-data
    # pipeline; tests/test_engine_runner.py). conf/ablation/ holds multirun studies appended with
    # `+ablation=<study>`: tests/test_ablations.py expands every study and composes every job.
    primaries = ("eval", "engine", "ablation")
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in primaries} | {"data/buckets"}
    groups = (groups - {"loss"}) | {f"loss/{p.name}" for p in (CONF_DIR / "loss").iterdir() if p.is_dir()}
    groups |= {f"hydra/{p.name}" for p in (CONF_DIR / "hydra").iterdir() if p.is_dir()}
    assert groups - SINGLE_OPTION == set(CHECKS), "add the new config group to CHECKS in this file"
    assert {g for g in SINGLE_OPTION if len(_options(g)) > 1} == set(), "check the new options"


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(group, option, tmp_path) -> None:
    cfg = compose([f"{group}={option}"], tmp_path)
    # The only `???` left are the local weight folders of the production parts.
    assert OmegaConf.missing_keys(cfg) <= WEIGHT_PATHS
    CHECKS[group](cfg, option)


def test_default_config_resolves_fully(tmp_path) -> None:
    cfg = compose([], tmp_path, keep_hydra=True)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    container = OmegaConf.to_container(job, resolve=True, throw_on_missing=True)
    assert container["paths"]["output_dir"] == str(tmp_path)
    assert OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"].startswith("outputs/runs/pretrain/")


def test_several_callbacks_are_one_override(tmp_path) -> None:
    from rededit.callbacks.ema import EMA
    from rededit.callbacks.nan_guard import NaNGuard

    cfg = compose(["callbacks=[default,ema,nan_guard]"], tmp_path)
    assert set(cfg.callbacks) == {
        "model_checkpoint",
        "lr_monitor",
        "progress",
        "preemption",
        "ema",
        "nan_guard",
    }
    kinds = {type(c) for c in _instantiate_group(cfg.callbacks)}
    assert {EMA, NaNGuard} <= kinds
    # The selection is independent of the strategy group (issue 3: composable with any strategy=).
    cfg = compose(["callbacks=[ema,nan_guard]", "strategy=fsdp2"], tmp_path)
    assert set(cfg.callbacks) == {"ema", "nan_guard"} and cfg.strategy.name == "fsdp2"


def test_unknown_key_fails_with_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'data\.not_a_key'") as err:
        compose(["data.not_a_key=1"], tmp_path)
    assert "+data.not_a_key=1" in str(err.value)  # Hydra says how to add a key on purpose
    with pytest.raises(ConfigCompositionException, match="not_an_option"):
        compose(["backbone=not_an_option"], tmp_path)
    assert compose(["+data.not_a_key=1"], tmp_path).data.not_a_key == 1


@pytest.mark.parametrize("path", sorted(CONF_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_every_shipped_yaml_parses(path: Path) -> None:
    loaded = OmegaConf.load(path)
    assert isinstance(loaded, DictConfig)
