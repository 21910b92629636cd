"""What a run shows and records (issue 18, "Logging and what the user sees").

One real ``rededit-train`` run (a subprocess, so Hydra configures logging as on the command line; stdout is a
pipe, as in a SLURM ``.out`` file or CI) is shared by the tests below:

* Hydra's job log ``<run>/train.log`` holds the run's rededit messages (the loggers propagate), and a rank
  above 0 is silenced by the rank-zero filter.
* Outside a terminal the progress is periodic lines with step/total, loss, samples/s and ETA, written while
  the run goes (not one frame at the end); the epoch display never shows a negative total; long data and
  evaluation commands show their totals the same way.
* The resolved config reaches every logger as hyperparameters (``logs/hparams.yaml`` is not ``{}``).
* ``logger`` is a list (``[csv]`` by default): ``logger=[csv,wandb]`` / ``+logger=tensorboard`` add a logger beside
  the CSV log instead of replacing it; TensorBoard and wandb are extras.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_overrides

STEPS = 3


@pytest.fixture(scope="module")
def cli_run(tiny_corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m rededit.cli.train`` for a few steps on the tiny corpus; returns (run folder, process)."""
    run = tmp_path_factory.mktemp("cli_run") / "run"
    overrides = [o for o in train_overrides(tiny_corpus, steps=STEPS) if o != "~callbacks.progress"]
    env = dict(os.environ)
    env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "rededit.cli.train", *overrides, "torch_threads=1", f"hydra.run.dir={run}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc


def test_hydra_job_log_holds_the_run(cli_run) -> None:
    run, _ = cli_run
    log = (run / "train.log").read_text()
    assert log.strip(), "train.log is empty: rededit's loggers do not reach Hydra's job log"
    assert "[rededit.train][INFO]" in log and "torch threads: 1" in log
    assert "[rededit.data.datamodule][INFO]" in log and "train data:" in log


def test_rank_above_zero_is_filtered(monkeypatch, caplog) -> None:
    from rededit.utils.logging import get_logger

    log = get_logger("rededit.test_rank_filter")
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("RANK", "0")
    log.info("from rank zero")
    monkeypatch.setenv("RANK", "1")
    log.info("from rank one")
    log.info("asked for every rank", extra={"all_ranks": True})
    messages = [r.getMessage() for r in caplog.records if r.name == "rededit.test_rank_filter"]
    assert messages == ["from rank zero", "asked for every rank"]


# ------------------------------------------------------------------------------------------------ progress
def test_cli_run_outside_a_terminal_prints_progress_lines(cli_run) -> None:
    run, proc = cli_run
    lines = [ln for ln in proc.stdout.splitlines() if "train step: " in ln]
    assert any(f"train step: 1/{STEPS} " in ln for ln in lines), proc.stdout[-2000:]
    assert any(f"train step: {STEPS}/{STEPS} (100%)" in ln for ln in lines)
    assert all("samples/s" in ln and "ETA" in ln and "loss " in ln for ln in lines)
    assert "/-" not in proc.stdout and "\r" not in proc.stdout  # no negative epoch total, no redrawn frames
    assert "train step: 1/" in (run / "train.log").read_text()  # the job log has the progress too


def test_line_progress_is_written_while_training(tiny_module, tmp_path) -> None:
    """Every step's line exists when that step ends (a later callback looks), not only after fit."""
    import lightning as L

    from conftest import tiny_loader, tiny_trainer
    from rededit.callbacks.progress import LineProgressBar

    bar = LineProgressBar(every_n_seconds=0)
    seen: list[int] = []

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen.append(len(bar.lines))
            assert bar.lines[-1].startswith(f"train step: {trainer.global_step}/6 ")

    trainer = tiny_trainer(tmp_path, [bar, Look()], max_steps=6, enable_progress_bar=True)
    trainer.fit(tiny_module(), train_dataloaders=tiny_loader(n=8, batch_size=2))
    assert seen == [1, 2, 3, 4, 5, 6]
    assert "epoch 1 " in bar.lines[-2] and "/-" not in " ".join(bar.lines)  # 4 batches/epoch, max_epochs=-1
    assert "samples/s" in bar.lines[0] and "ETA" in bar.lines[0]
    assert bar.lines[-1].startswith("training done: 6 steps")


def test_epoch_display_has_no_negative_total(tmp_path) -> None:
    import lightning as L

    from rededit.callbacks.progress import LineProgressBar, RichBar, epoch_label, progress_bar

    by_steps = L.Trainer(max_steps=50, max_epochs=-1, logger=False, default_root_dir=tmp_path)
    by_epochs = L.Trainer(max_epochs=3, logger=False, default_root_dir=tmp_path)
    assert epoch_label(by_steps, 1) == "Epoch 1"
    assert epoch_label(by_epochs, 1) == "Epoch 1/2"
    bar = RichBar()
    bar._trainer = by_steps
    assert bar._get_train_description(1).strip() == "Epoch 1"
    assert isinstance(progress_bar("lines"), LineProgressBar) and isinstance(progress_bar("rich"), RichBar)
    assert isinstance(progress_bar("auto"), LineProgressBar)  # pytest captures stdout: not a terminal


def _progress_lines(caplog, prefix: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rededit.progress" and r.getMessage().startswith(prefix)
    ]


def test_progress_outside_a_terminal_logs_lines_with_totals(caplog) -> None:
    from rededit.utils.progress import Progress, track

    caplog.set_level(logging.INFO, logger="rededit.progress")
    seen = []
    for _ in track(range(4), desc="count", unit="rows", every_s=0, terminal=False):
        seen.append(len(_progress_lines(caplog, "count:")))  # lines so far, while the loop runs
    assert seen == [0, 1, 2, 3]  # a line after every item (every_s=0), the last one at the end
    lines = _progress_lines(caplog, "count:")
    assert lines[0].startswith("count: 1/4 (25%) | ") and "rows/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("count: 4/4 (100%)") and len(lines) == 4
    with Progress(10, "resumed", every_s=3600, terminal=False, initial=6) as bar:
        bar.update(4)
    assert _progress_lines(caplog, "resumed:") == [_progress_lines(caplog, "resumed:")[0]]
    assert _progress_lines(caplog, "resumed:")[0].startswith("resumed: 10/10 (100%)")


def test_progress_in_a_terminal_is_a_tqdm_bar(caplog, capsys) -> None:
    from rededit.utils.progress import track

    caplog.set_level(logging.INFO, logger="rededit.progress")
    assert list(track(range(3), desc="bar", terminal=True)) == [0, 1, 2]
    assert not _progress_lines(caplog, "bar")  # no log lines: tqdm drew it
    assert "3/3" in capsys.readouterr().err


def test_long_commands_show_their_totals(tmp_path, monkeypatch, caplog) -> None:
    """synth, encode-text and rededit-eval's generation log ``k/total`` lines outside a terminal."""
    from rededit.cli.data_encode_text import encode_manifest
    from rededit.data.manifest import Manifest
    from rededit.data.text_cache import TextEmbeddingCache
    from rededit.datagen.synth.writer import synthesize

    monkeypatch.setenv("REDEDIT_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="rededit.progress")
    manifest = synthesize(tmp_path / "corpus", n=3, seed=0, bench_n=2, min_side=64, max_side=64)
    synth = _progress_lines(caplog, "synth:")
    assert synth[0].startswith("synth: 1/5 ") and synth[-1].startswith("synth: 5/5 (100%)")

    class FakeEncoder:  # encode_manifest's interface; the real encoders are tested in test_text_encoder.py
        cache_id, dtype_name, uses_images, max_length, dim = "fake", "float32", False, 8, 4

        def encode_sequences(self, texts, images=None):
            import torch

            return [torch.zeros(2, 4) for _ in texts]

    m = Manifest.open(manifest, validate=False)
    encode_manifest(m, FakeEncoder(), TextEmbeddingCache(tmp_path / "cache", cache_id="fake"))
    enc = _progress_lines(caplog, "encode-text:")
    assert enc[0].startswith(f"encode-text: 1/{len(m)} ") and enc[-1].startswith(
        f"encode-text: {len(m)}/{len(m)}"
    )


def test_eval_generation_shows_its_total(tmp_path, monkeypatch, caplog) -> None:
    from conftest import untrained_tiny_export
    from rededit.datagen.synth.writer import synthesize
    from rededit.eval.benchmarks import SyntheticBench
    from rededit.eval.harness import generate_edits
    from rededit.inference.editor import load_editor
    from rededit.inference.sizing import sizes_fn

    monkeypatch.setenv("REDEDIT_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="rededit.progress")
    manifest = synthesize(tmp_path / "corpus", n=1, seed=0, bench_n=3, min_side=64, max_side=64)
    editor = load_editor(untrained_tiny_export(tmp_path))
    bench = SyntheticBench(manifest)
    kwargs = dict(seeds=[0, 1], sizes=sizes_fn(editor, None), steps=1, cfg_scale=1.0, negative_prompt="")
    assert generate_edits(editor, bench, tmp_path / "eval", batch_size=2, max_items=2, **kwargs) == 4
    lines = _progress_lines(caplog, "generate:")
    assert lines[0].startswith("generate: 1/4 (25%)") and lines[-1].startswith("generate: 4/4 (100%)")
    caplog.clear()
    assert (
        generate_edits(editor, bench, tmp_path / "eval", batch_size=2, max_items=3, **kwargs) == 2
    )  # resumed
    lines = _progress_lines(caplog, "generate:")
    assert lines[0].startswith("generate: 5/6 ") and lines[-1].startswith("generate: 6/6 (100%)")


# ---------------------------------------------------------------------------------------- hyperparameters
def test_resolved_config_is_logged_as_hyperparameters(cli_run) -> None:
    import yaml

    run, _ = cli_run
    hparams = yaml.safe_load((run / "logs" / "hparams.yaml").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert hparams["optimizer"]["lr"] == config["optimizer"]["lr"] == 1.0e-4
    assert (
        hparams["trainer"]["max_steps"] == STEPS and hparams["data"]["manifest"] == config["data"]["manifest"]
    )
    assert hparams["paths"]["output_dir"] == str(run)  # resolved, not ${hydra:runtime.output_dir}


# ------------------------------------------------------------------------------------------------ loggers
@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ((), ["csv"]),
        (("logger=[csv,wandb]",), ["csv", "wandb"]),
        (("+logger=tensorboard",), ["csv", "tensorboard"]),
        (("logger=[csv,tensorboard,wandb]",), ["csv", "tensorboard", "wandb"]),
    ],
)
def test_loggers_are_a_list_that_keeps_csv(overrides, names, tmp_path) -> None:
    from conftest import compose

    cfg = compose(overrides, tmp_path)
    assert list(cfg.logger) == names
    assert cfg.logger.csv._target_ == "rededit.callbacks.csv_logger.AppendingCSVLogger"


def test_tensorboard_logger_is_built_beside_csv(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    from conftest import compose
    from rededit.callbacks.csv_logger import AppendingCSVLogger
    from rededit.train import _instantiate_group

    loggers = _instantiate_group(compose(["logger=[csv,tensorboard]"], tmp_path).logger)
    assert [type(lg) for lg in loggers] == [AppendingCSVLogger, TensorBoardLogger]
    assert Path(loggers[1].log_dir) == tmp_path / "tensorboard"


def test_logger_extras_are_pinned() -> None:
    import configparser

    extras = configparser.ConfigParser()
    extras.read(REPO / "setup.cfg")
    pins = dict(extras["options.extras_require"])
    assert pins["tensorboard"].split() == ["tensorboard==2.21.0"] and pins["wandb"].split() == [
        "wandb==0.31.0"
    ]
