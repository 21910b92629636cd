"""The ``sample_images`` callback writes edit grids of held-out samples during training."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import FAST, compose, read_step_metric, train_overrides
from rededit.train import run


def test_sample_grids_are_written_every_n_steps_and_at_the_end(tiny_corpus, tmp_path) -> None:
    overrides = [
        o for o in train_overrides(tiny_corpus, "experiment=demo_pretrain", steps=3) if o not in FAST
    ]
    overrides += [
        "trainer.log_every_n_steps=1",
        "export_dir=null",
        "callbacks=[ema,sample_images]",
        "callbacks.sample_images.every_n_steps=2",
        "callbacks.sample_images.steps=2",
    ]
    cfg = compose(overrides, tmp_path)
    run(cfg)
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["step0000002.png", "step0000003.png"]
    with Image.open(tmp_path / "samples" / grids[-1]) as img:
        assert img.width > 300 and img.height > 100
    # Training-time validation numbers: per-category judge success and preservation, logged and saved.
    scores = json.loads((tmp_path / "samples" / "step0000002.json").read_text())
    assert 0.0 <= scores["val/success"] <= 1.0 and "val/psnr_outside" in scores
    assert any(k.startswith("val/success_") for k in scores)
    logged = read_step_metric(tmp_path, "val/success")
    assert 2 in logged and all(0.0 <= v <= 1.0 for v in logged.values())


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_sample_grids_under_fsdp2_run_the_sampler_on_every_rank(tiny_corpus, tmp_path) -> None:
    """Under FSDP2 each backbone forward all-gathers: rank 0 sampling alone would hang. Every rank samples (with
    its EMA shards swapped in), rank 0 alone writes the grid and its scores."""
    from test_strategies_multiprocess import launch

    overrides = [
        "experiment=demo_pretrain",
        "backbone.transformer_config.num_layers=2",
        "data.val_split=null",
        "data.token_budget=256",
        f"data.manifest={tiny_corpus}",
        "strategy=fsdp2",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "export_dir=null",
        "callbacks=[ema,sample_images]",
        "callbacks.sample_images.every_n_steps=2",
        "callbacks.sample_images.steps=2",
    ]
    proc = launch(tmp_path, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step0000002.json", "step0000002.png"]
    scores = json.loads((tmp_path / "samples" / "step0000002.json").read_text())
    assert 0.0 <= scores["val/success"] <= 1.0
    log = (tmp_path / "launch.log").read_text()
    assert log.count("sample grid (EMA weights) written") == 1  # rank 0 only
