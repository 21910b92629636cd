"""The ``sample_images`` callback writes edit grids of held-out samples during training."""

from __future__ import annotations

from PIL import Image

from conftest import FAST, compose, train_overrides
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
