"""Validation during training (issue 18): recipes hold out rows of the training split and log ``val/loss`` and
``val/loss_tbin*``.

* The held-out rows are a function of the seed alone, never trained on, and the validation batches are the
  same at every validation (every row once; ranks get equal numbers of batches, padded only when rows are
  fewer than ranks).
* A sample's validation σ and noise come from (seed, sample id): with frozen weights ``val/loss`` is the same
  at every step, although the timestep curriculum and the region-weight schedule move in between.
* Validation data that cannot work is a one-sentence config error, not Lightning's warning.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose, read_step_metric, train_overrides
from rededit.data.datamodule import EditDataModule, hold_out, holdout_count
from rededit.data.manifest import Manifest
from rededit.utils.config_checks import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _train_rows(manifest) -> Manifest:
    from rededit.data.datamodule import select_split

    return select_split(Manifest.open(manifest), "train")


def test_holdout_is_drawn_from_the_seed_and_disjoint_from_training(tiny_corpus) -> None:
    rows = _train_rows(tiny_corpus)
    train, held = hold_out(rows, 6, seed=3)
    ids, train_ids, held_ids = set(rows.ids), list(train.ids), list(held.ids)
    assert len(held_ids) == 6 and len(train_ids) == len(rows) - 6
    assert set(train_ids).isdisjoint(held_ids) and set(train_ids) | set(held_ids) == ids
    assert list(hold_out(rows, 6, seed=3)[1].ids) == held_ids  # same seed, same rows
    assert list(hold_out(rows, 6, seed=4)[1].ids) != held_ids
    assert holdout_count(0.01, len(rows)) == 1 and holdout_count(0.1, 46) == 5 and holdout_count(7, 46) == 7
    with pytest.raises(ConfigError, match="leaving none to train on"):
        hold_out(rows, len(rows), seed=0)
    for bad in (0, -1, 2.5, "many", float("nan")):
        with pytest.raises(ConfigError, match=r"data\.val_holdout"):
            holdout_count(bad, 46)


@pytest.mark.parametrize("world", [1, 2])
def test_validation_batches_serve_every_held_out_row_the_same_way_each_time(tiny_corpus, world) -> None:
    dms = [
        EditDataModule(
            str(tiny_corpus),
            "tiny",
            512,
            seed=0,
            val_split="holdout",
            val_holdout=9,
            world_size=world,
            rank=r,
        )
        for r in range(world)
    ]
    for dm in dms:
        dm.setup("fit")
    held = set(dms[0].val_manifest.ids)
    assert held.isdisjoint(dms[0].train_manifest.ids)
    per_rank = [[[k.row for k in b] for b in dm.val_sampler] for dm in dms]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) >= 1  # equal steps on every rank
    served = [dms[0].val_manifest.ids[r] for p in per_rank for b in p for r in b]
    assert sorted(served) == sorted(held)  # every held-out row once (9 rows: enough for 2 ranks, no padding)
    assert [[[k.row for k in b] for b in dm.val_sampler] for dm in dms] == per_rank  # the same at every pass
    batch = next(iter(dms[0].val_dataloader()))
    assert (batch["epoch"], batch["step"]) == (0, 0) and len(batch["ids"]) == len(per_rank[0][0])


def test_fewer_rows_than_ranks_are_padded_not_dropped(tiny_corpus) -> None:
    samplers = []
    for r in (0, 1):
        dm = EditDataModule(
            str(tiny_corpus), "tiny", 512, val_split="holdout", val_holdout=1, world_size=2, rank=r
        )
        dm.setup("fit")
        samplers.append(dm.val_sampler)
    assert [len(s) for s in samplers] == [1, 1] and samplers[0].padded == 1
    assert [[k.row for k in b] for b in samplers[0]] == [[k.row for k in b] for b in samplers[1]]


def test_validation_noise_and_sigma_are_per_sample(tmp_path) -> None:
    from conftest import untrained_tiny_stage

    stage, _ = untrained_tiny_stage(tmp_path, "timestep=stratified_curriculum")
    x0 = torch.zeros(3, stage.vae.latent_channels, 8, 8)
    batch = {"ids": ["a", "b", "c"], "epoch": 2, "step": 5}
    stage.eval()
    s1, e1 = stage._draw(batch, x0)
    s2, e2 = stage._draw({"ids": ["c", "a"], "epoch": 0, "step": 9}, x0[:2])  # other batch, order and step
    torch.testing.assert_close(s2, s1[[2, 0]])
    torch.testing.assert_close(e2, e1[[2, 0]])
    assert len(set(s1.tolist())) == 3 and not torch.equal(e1[0], e1[1])
    stage.train()
    _, e_train = stage._draw(batch, x0)
    assert not torch.equal(e_train, e1)  # training keeps its (seed, epoch, step, rank) streams


def test_val_loss_is_comparable_across_steps(tiny_corpus, tmp_path) -> None:
    """lr = 0 freezes the weights while the curriculum anneals: val/loss (and its σ bins) must not move."""
    overrides = train_overrides(
        tiny_corpus,
        "experiment=demo_pretrain",
        "backbone.transformer_config.num_layers=2",
        "timestep.curriculum.anneal_steps=3",
        "optimizer.lr=0.0",
        "data.val_holdout=6",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=2",
        steps=3,
    )
    from rededit.train import run

    run(compose(overrides, tmp_path))
    val = read_step_metric(tmp_path, "val/loss")
    assert sorted(val) == [1, 2, 3] and np.isfinite(list(val.values())).all()
    assert max(val.values()) - min(val.values()) < 1e-6 * max(abs(v) for v in val.values())
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(c.startswith("val/loss_tbin") for c in header) and "train/loss_tbin0_step" in header


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.val_split=nosuchsplit", r"data.val_split='nosuchsplit'.*no rows with split == 'nosuchsplit'"),
        ("data.val_holdout=1000", r"data.val_holdout=1000 holds out 1000 of the \d+ training rows"),
    ],
)
def test_validation_data_that_cannot_work_is_a_config_error(tiny_corpus, tmp_path, override, message) -> None:
    from rededit.train import run

    cfg = compose(train_overrides(tiny_corpus, override, "debug=fast_dev_run"), tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        run(cfg)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_two_rank_validation_reduces_every_bin(tiny_corpus, tmp_path) -> None:
    """2 ranks (DDP) where σ bins are empty on one rank: every logged value is a finite mean over both ranks
    (Lightning's sync_dist needs every key on every rank and truncates the integer sample counts)."""
    import csv

    from test_strategies_multiprocess import launch

    overrides = [
        "experiment=demo_pretrain",
        "backbone.transformer_config.num_layers=2",
        "data.token_budget=256",
        "data.val_holdout=5",
        f"data.manifest={tiny_corpus}",
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=3",
        "~callbacks.progress",
        "export_dir=null",
    ]
    proc = launch(tmp_path, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "logs" / "metrics.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/loss")]
    assert len(rows) == 2
    for r in rows:
        vals = {k: float(v) for k, v in r.items() if k.startswith("val/loss") and v}
        assert len(vals) >= 3 and np.isfinite(list(vals.values())).all(), vals
