"""The ``sample_images`` callback writes edit grids of held-out samples during training."""

from __future__ import annotations

import json

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
