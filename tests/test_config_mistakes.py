"""Config mistakes end in one sentence naming the key, exit code 2, and no half-made run folder (issue 17 §4).

Attacks: ``trainer.max_steps=abc``, ``optimizer.lr=fast``, ``data.manifest=null``, a manifest that does not
exist, ``rededit-eval`` without ``checkpoint=``/``out_dir=`` or without the benchmark's manifest, and a run
that fails before its first step (its folder used to stay behind with a config and a log).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, compose, train_overrides
from rededit.train import run
from rededit.utils.config_checks import ConfigError, remove_unstarted_run


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=abc", r"trainer\.max_steps='abc': expected an integer"),
        ("optimizer.lr=fast", r"optimizer\.lr='fast': expected a number"),
        ("optimizer.lr=-1", r"optimizer\.lr=-1: must be at least 0"),
        ("data.token_budget=0", r"data\.token_budget=0: must be at least 1"),
        ("data.manifest=null", r"data\.manifest is not set.*rededit-data synth"),
        # A corpus that fills no batch used to "train" zero steps and exit 0.
        ("data.token_budget=100000000", r"fill no batch of data\.token_budget=100000000"),
        # Lightning takes these from their own groups: a trainer.* value would be silently replaced.
        ("+trainer.strategy=ddp", r"trainer\.strategy is not read.*use strategy="),
        ("+trainer.logger=false", r"trainer\.logger is not read.*logger="),
    ],
)
def test_a_config_mistake_names_its_key_before_anything_is_written(override, message, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    cfg = compose(train_overrides(tiny_corpus, override), out)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not out.exists()


def test_a_missing_manifest_names_the_key_the_working_directory_and_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(train_overrides(tmp_path / "nope" / "manifest.parquet"), tmp_path / "run")
    cfg.data.manifest = "nope/manifest.parquet"
    with pytest.raises(ConfigError) as err:
        run(cfg)
    text = str(err.value)
    assert "data.manifest=nope/manifest.parquet: no such file" in text
    assert f"working directory {os.getcwd()}" in text and "rededit-data synth --out DIR" in text


def test_a_run_that_fails_before_its_first_step_takes_its_folder_back(tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = compose(train_overrides(tiny_corpus), out)

    def boom(*a, **k):
        raise RuntimeError("fails in fit before any step")

    monkeypatch.setattr("lightning.Trainer.fit", boom)
    with pytest.raises(RuntimeError, match="before any step"):
        run(cfg)
    assert not out.exists()  # config.yaml, logs/ and the lock were written, then taken back


def test_unstarted_run_cleanup_keeps_what_is_not_its_own(tmp_path) -> None:
    import time

    since = time.time() - 1
    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)
    (folder / "config.yaml").write_text("x")
    (folder / "logs" / "metrics.csv").write_text("x")
    (folder / "notes.txt").write_text("mine")  # the user's file: nothing is removed
    assert not remove_unstarted_run(folder, since)
    assert (folder / "config.yaml").exists() and (folder / "notes.txt").exists()
    (folder / "notes.txt").unlink()
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_text("x")  # a resumable run: nothing is removed
    assert not remove_unstarted_run(folder, since)
    assert (folder / "config.yaml").exists()
    (folder / "checkpoints" / "last.ckpt").unlink()
    old = folder / "train.log"
    old.write_text("an earlier segment")
    os.utime(old, (since - 100, since - 100))  # older than this process: kept, and so is the folder
    assert not remove_unstarted_run(folder, since)
    assert old.exists() and not (folder / "config.yaml").exists() and not (folder / "logs").exists()


def _cli(*argv: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_rededit_train_cli_prints_the_sentence_and_exits_2(tiny_corpus, tmp_path) -> None:
    out = tmp_path / "run"
    r = _cli(
        "-m",
        "rededit.cli.train",
        f"data.manifest={tiny_corpus}",
        "trainer.max_steps=abc",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "rededit-train: error: trainer.max_steps='abc': expected an integer" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_rededit_eval_cli_names_missing_settings(tmp_path) -> None:
    r = _cli("-m", "rededit.cli.eval", f"out_dir={tmp_path / 'e1'}", cwd=tmp_path)
    assert r.returncode == 2 and "missing checkpoint=" in r.stderr and "Traceback" not in r.stderr
    r = _cli("-m", "rededit.cli.eval", f"checkpoint={tmp_path}", f"out_dir={tmp_path / 'e2'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "benchmark.manifest_path not set" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "e2").exists()


def test_unstarted_run_cleanup_takes_back_the_empty_parents_hydra_made(tmp_path, monkeypatch) -> None:
    """A first run that fails left ``outputs/runs/<run_name>/`` behind, empty."""
    import time

    since = time.time() - 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "keep").mkdir(parents=True)  # the user's: outputs/ stays
    run_dir = tmp_path / "outputs" / "runs" / "demo_pretrain" / "2026-01-01_00-00-00"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("x")
    assert remove_unstarted_run(run_dir, since)
    assert not (tmp_path / "outputs" / "runs").exists() and (tmp_path / "outputs" / "keep").is_dir()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Was a FileNotFoundError traceback from inside fit (and before that a hub-id validation error).
        (
            ("backbone=qwen_image", "backbone.pretrained_path=/nonexistent"),
            r"backbone\.pretrained_path=/nonexistent: no such folder.*never downloads",
        ),
        (("backbone=qwen_image",), r"backbone\.pretrained_path is not set"),
        (("vae=qwen_image", "vae.path=/nonexistent"), r"vae\.path=/nonexistent: no such folder"),
    ],
)
def test_a_weight_folder_that_does_not_exist_names_its_key(overrides, message, tiny_corpus, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = compose(train_overrides(tiny_corpus, *overrides), out)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not out.exists()


def test_rededit_eval_without_out_dir_names_it(tmp_path, monkeypatch, capsys) -> None:
    """``rededit-eval checkpoint=...`` alone (and with neither key): one sentence, exit 2, nothing written."""
    from rededit.cli.eval import main

    monkeypatch.chdir(tmp_path)
    for argv, missing in (
        ([f"checkpoint={tmp_path}"], "missing out_dir="),
        ([], "missing checkpoint= and out_dir="),
    ):
        monkeypatch.setattr(sys, "argv", ["rededit-eval", *argv])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        assert f"rededit-eval: error: {missing}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_with_invalid_utf8_stops_training_with_one_sentence(tiny_corpus, tmp_path) -> None:
    """Training on a manifest whose string column holds bytes that are not UTF-8 ended in a traceback: it is
    a config error naming the manifest, the row and the column (exit 2 from rededit-train), nothing left."""
    import shutil

    import pyarrow.parquet as pq

    from test_validate import _with_bad_utf8

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.parent, corpus)
    table = pq.read_table(corpus / "manifest.parquet")
    pq.write_table(_with_bad_utf8(table, "instruction", 3), corpus / "manifest.parquet")
    out = tmp_path / "run"
    cfg = compose(train_overrides(corpus / "manifest.parquet"), out)
    with pytest.raises(
        ConfigError, match=r"(?s)data\.manifest: invalid manifest .*column 'instruction'.*not valid UTF-8"
    ):
        run(cfg)
    assert not out.exists()
