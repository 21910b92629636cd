"""Stages through the Hydra entry point on CPU (issue 3 acceptance).

* ``fast_dev_run`` (``debug=fast_dev_run``: one train and one validation batch) of every stage and every
  experiment config on the tiny synthetic corpus, through :func:`rededit.train.run`; the resolved config
  lands in the run folder; the per-σ-bin metrics ``train/loss_tbin{k}`` (§3.8) are logged.
* ``stage.init_from`` chaining (report Fig. 8): a 2-step pretrain run with EMA, then SFT initialised from
  its run folder or its export folder starts from exactly those weights — the EMA ones by default
  (``init_from_ema``), the raw ones otherwise.

Batch-composition invariance through the backbone is tests/test_backbone.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose, read_step_metric, train_overrides
from rededit.stages.checkpoints import EXPORT_CONFIG
from rededit.train import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Parts that need local production weights (a `???` path); a fast_dev_run swaps in the embedded default.
EMBEDDED = (
    "backbone=tiny",
    "vae=pixel",
    "text_encoder=minilm",
    "data/buckets=tiny",
    "trainer=cpu",
    "strategy=auto",
)


# The preference / RL stages run their own fast_dev_runs (with online rollouts and OCR rewards) in the default
# tier (tests/test_dpo.py, tests/test_nft.py); repeating them here costs ~1 min, so these cases are slow-tier.
RL_OVERRIDES = {
    f"{g}={o}"
    for g, opts in (("stage", ("dpo", "nft")), ("experiment", ("dpo", "nft", "demo_dpo", "demo_nft")))
    for o in opts
}


def _config_sets() -> list:
    stages = [(f"stage={p.stem}",) for p in sorted((CONF_DIR / "stage").glob("*.yaml"))]
    experiments = [(f"experiment={p.stem}",) for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]
    return [
        pytest.param(o, id=o[0], marks=pytest.mark.slow) if o[0] in RL_OVERRIDES else pytest.param(o, id=o[0])
        for o in stages + experiments
    ]


@pytest.mark.parametrize("overrides", _config_sets())
def test_fast_dev_run(overrides, tiny_corpus, tmp_path) -> None:
    # Production recipes (pretrain / ct / sft) run on the embedded default parts and tiny buckets: the
    # recipe is the same, only backbone/data are swapped (as the README's production overrides do the reverse).
    production = overrides[0].startswith("experiment=") and not overrides[0].startswith("experiment=demo_")
    extra = EMBEDDED if production else ()
    cfg = compose(train_overrides(tiny_corpus, *overrides, *extra, "debug=fast_dev_run"), tmp_path)
    if OmegaConf.missing_keys(cfg):  # a recipe that needs local weights: same recipe on the embedded parts
        extra = EMBEDDED
        cfg = compose(train_overrides(tiny_corpus, *overrides, *extra, "debug=fast_dev_run"), tmp_path)
    init = cfg.stage.get("init_from")
    # A recipe that starts from a trained editor (demo_lora: make demo's export), absent on a fresh clone.
    if init and not Path(init).exists():
        cfg = compose(
            train_overrides(tiny_corpus, *overrides, *extra, "stage.init_from=null", "debug=fast_dev_run"),
            tmp_path,
        )
    result = run(cfg)
    metrics = result["metrics"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and torch.isfinite(
        torch.tensor(metrics["val/loss"])
    )
    tbins = {k for k in metrics if k.startswith("train/loss_tbin") and k.count("_") == 1}
    assert tbins and tbins <= {f"train/loss_tbin{k}" for k in range(cfg.stage.num_tbins)}
    # The resolved config is saved in the run folder and rebuilds the same config.
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert OmegaConf.to_container(saved) == OmegaConf.to_container(cfg, resolve=True)
    assert saved.paths.output_dir == str(tmp_path)
    # fast_dev_run writes no checkpoint and no export.
    assert not (tmp_path / "checkpoints").exists() and result["export_dir"] is None


@pytest.fixture(scope="module")
def pretrain_run(tiny_corpus, tmp_path_factory) -> Path:
    """A 2-step demo_pretrain run (EMA on) with its export folder."""
    out = tmp_path_factory.mktemp("pretrain")
    overrides = train_overrides(tiny_corpus, "experiment=demo_pretrain", steps=2)
    result = run(compose([*overrides, f"export_dir={out}/export"], out))
    assert result["export_dir"] == str(out / "export")
    return out


def _checkpoint_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(raw backbone state, backbone state with the EMA shadow in place of the trainable tensors)."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    raw = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    ema_state = ckpt["callbacks"]["EMA"]
    assert ema_state["num_updates"] == 2
    return raw, {**raw, **ema_state["shadow"]}


def _assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_pretrain_logs_tbin_metrics_and_exports(pretrain_run) -> None:
    losses = read_step_metric(pretrain_run)
    assert sorted(losses) == [1, 2]
    tbin_steps = [read_step_metric(pretrain_run, f"train/loss_tbin{k}_step") for k in range(4)]
    assert set().union(*tbin_steps) == {1, 2}  # every step logs the bins its σ fell in
    export = pretrain_run / "export"
    assert (export / EXPORT_CONFIG).is_file() and (export / "WEIGHTS").read_text().strip() == "ema"


@pytest.mark.parametrize("source", ["run_dir", "export"])
@pytest.mark.parametrize("use_ema", [True, False], ids=["ema", "raw"])
def test_init_from_loads_exactly_the_previous_weights(pretrain_run, tiny_corpus, source, use_ema) -> None:
    raw, ema = _checkpoint_weights(pretrain_run)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the two choices are distinguishable
    path = pretrain_run if source == "run_dir" else pretrain_run / "export"
    cfg = compose(
        train_overrides(
            tiny_corpus, "experiment=demo_sft", f"stage.init_from={path}", f"stage.init_from_ema={use_ema}"
        ),
        pretrain_run / "unused",
    )
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()
    _assert_state_equal(stage.backbone.state_dict(), ema if use_ema else raw)


def test_sft_fit_starts_from_the_pretrain_ema_weights(pretrain_run, tiny_corpus, tmp_path) -> None:
    """Through the trainer: configure_model runs again inside fit and must not rebuild (re-randomise)."""
    _, ema = _checkpoint_weights(pretrain_run)
    cfg = compose(
        train_overrides(tiny_corpus, "experiment=demo_sft", f"stage.init_from={pretrain_run}", steps=1),
        tmp_path,
    )
    model, datamodule, trainer = build(cfg)
    model.configure_model()
    _assert_state_equal(model.backbone.state_dict(), ema)
    backbone = model.backbone
    trainer.fit(model, datamodule=datamodule)
    assert model.backbone is backbone and trainer.global_step == 1
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, ema[k])]
    assert changed  # it trained from there
