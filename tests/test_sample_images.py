"""The ``sample_images`` callback writes edit grids of held-out samples during training (PNG files, and images in
TensorBoard / wandb when those loggers are on)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import FAST, compose, read_step_metric, train_overrides
from rededit.train import run

try:
    import tensorboard  # noqa: F401  (the .[tensorboard] extra)

    TENSORBOARD = True
except ImportError:
    TENSORBOARD = False


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
    if TENSORBOARD:  # the grids also go to TensorBoard (make venv installs the extra)
        overrides.append("logger=[csv,tensorboard]")
    cfg = compose(overrides, tmp_path)
    run(cfg)
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["step0000002.png", "step0000003.png"]
    if TENSORBOARD:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
        images = events.Images("samples/grid")
        assert [im.step for im in images] == [2, 3]
        with Image.open(tmp_path / "samples" / grids[-1]) as img:
            assert (images[-1].width, images[-1].height) == img.size
    with Image.open(tmp_path / "samples" / grids[-1]) as img:
        assert img.width > 300 and img.height > 100
    # Training-time validation numbers: per-category judge success and preservation, logged and saved.
    scores = json.loads((tmp_path / "samples" / "step0000002.json").read_text())
    assert 0.0 <= scores["val/success"] <= 1.0 and "val/psnr_outside" in scores
    assert any(k.startswith("val/success_") for k in scores)
    logged = read_step_metric(tmp_path, "val/success")
    assert 2 in logged and all(0.0 <= v <= 1.0 for v in logged.values())


def test_grids_go_to_the_image_loggers_only() -> None:
    """``log_image`` sends a grid to TensorBoard (``add_image``) and wandb (``log_image``), never to CSV; fake
    loggers of the real classes, so this holds without either package installed."""
    from types import SimpleNamespace

    import numpy as np
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    from rededit.callbacks.loggers import log_image

    calls: list[tuple] = []

    class FakeTB(TensorBoardLogger):
        def __init__(self) -> None:
            pass

        @property
        def experiment(self):
            return SimpleNamespace(
                add_image=lambda tag, img, global_step, dataformats: calls.append(
                    ("tb", tag, img.shape, global_step, dataformats)
                )
            )

    class FakeWandb(WandbLogger):
        def __init__(self) -> None:
            pass

        def log_image(self, key, images, step=None, **kwargs) -> None:
            calls.append(("wandb", key, images[0].size, step, kwargs["caption"]))

    class FakeCSV(CSVLogger):
        def __init__(self) -> None:
            pass

    grid = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))
    trainer = SimpleNamespace(loggers=[FakeCSV(), FakeTB(), FakeWandb()])
    assert log_image(trainer, "samples/grid", grid, 7, caption="step 7") == ["tensorboard", "wandb"]
    assert calls == [
        ("tb", "samples/grid", (20, 30, 3), 7, "HWC"),
        ("wandb", "samples/grid", (30, 20), 7, ["step 7"]),
    ]


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
