"""Shared fixtures of the training-core tests: a tiny synthetic corpus and Hydra composition of conf/train.yaml.

``compose(overrides, output_dir=...)`` returns the config a ``rededit-train`` task function would receive
(Hydra's own ``hydra`` node removed, ``paths.output_dir`` pinned to a test folder), so tests drive
:func:`rededit.train.run` / :func:`rededit.train.build` exactly as the command line does.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
from rededit.utils.paths import CONF_DIR  # noqa: E402

# Overrides that keep a CPU training run tiny and quiet: a per-step CSV log, no rich progress bar
# (it redraws per step on a 2-core box), no end-of-fit export unless a test asks for it.
FAST = (
    "trainer.log_every_n_steps=1",
    "~callbacks.progress",
    "export_dir=null",
)


def compose(overrides: Iterable[str] = (), output_dir: str | Path | None = None, *, keep_hydra: bool = False):
    """Compose ``conf/train.yaml`` with ``overrides`` the way ``@hydra.main`` does.

    Args:
        overrides: Hydra command-line overrides (``"experiment=demo_sft"``, ``"data.token_budget=512"``).
        output_dir: the run folder; becomes ``hydra.runtime.output_dir`` and ``paths.output_dir``.
        keep_hydra: keep the ``hydra`` node (a task function never sees it; ``run`` must not either).

    Returns:
        the composed ``DictConfig``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from rededit.utils.run_id import register_resolvers

    register_resolvers()  # as rededit.train does on import: ${rededit.run_dir:...} in hydra.run.dir
    overrides = list(overrides)
    if output_dir is not None:
        overrides.append(f"paths.output_dir={output_dir}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or "outputs/test")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` resolvers read this singleton
    if not keep_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Manifest of a 40-train / 8-bench synthetic corpus at 64–96 px (every task of the template engine)."""
    from rededit.datagen.synth.writer import synthesize

    root = tmp_path_factory.mktemp("tiny_corpus")
    synthesize(root, n=40, seed=0, bench_n=8, min_side=64, max_side=96)
    return root / "manifest.parquet"


def train_overrides(manifest: Path, *extra: str, steps: int = 2, budget: int = 512) -> list[str]:
    """Overrides of a short CPU run on ``manifest`` (``budget`` visual tokens per step)."""
    return [
        f"data.manifest={manifest}",
        f"data.token_budget={budget}",
        f"trainer.max_steps={steps}",
        *FAST,
        *extra,
    ]


def read_step_metric(run_dir: str | Path, key: str = "train/loss_step") -> dict[int, float]:
    """``{global step (1-based, after the update): value}`` of ``key`` from the CSV logger's metrics.csv."""
    path = Path(run_dir) / "logs" / "metrics.csv"
    out: dict[int, float] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get(key):
                # Lightning logs a training step's metrics under the step index *before* the update.
                out[int(row["step"]) + 1] = float(row[key])
    return out


# ---------------------------------------------------------------------------------------------- fake endpoint
@contextlib.contextmanager
def fake_endpoint(
    respond: Callable[[object, dict], tuple[int, object]],
    record: Callable[[object, dict], object] | None = None,
) -> Iterator[tuple[object, str]]:
    """A local OpenAI-compatible HTTP server for the judge / reward / captioning clients.

    Args:
        respond: ``(server, request JSON) -> (status, payload)``; a dict payload is sent as JSON, bytes as they are.
        record: ``(handler, request JSON) -> entry`` appended to ``server.requests`` (default: the JSON).

    Yields:
        ``(server, base_url)``; ``server.requests`` lists the recorded requests in order.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.server.requests.append(record(self, body) if record else body)
            status, payload = respond(self.server, body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:
            # A client that timed out on purpose (the retry tests) closes the socket under the reply.
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    srv = Server(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.requests = []
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------------------------------------- tiny module
# Built on first use: importing Lightning takes seconds and most test files never need it.
@functools.cache
def _tiny_module_class() -> type:
    import lightning as L
    import torch

    class TinyNet(torch.nn.Module):
        """Two-layer MLP plus a frozen layer (like the backbone's frozen text tail: never trained or averaged)."""

        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
            self.frozen = torch.nn.Linear(1, 1)
            self.frozen.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.frozen(self.body(x))

    class TinyModule(L.LightningModule):
        """The stage's interface as the callbacks see it (``.backbone``; dict batches with ``ids``).

        Args:
            nan_batches: training ``batch_idx`` whose loss is multiplied by NaN (non-finite gradients).
            lr: AdamW learning rate.

        Records ``step_weights`` / ``step_optim`` (copies after every optimizer step) and ``val_seen``
        (the backbone weights each validation step ran with).
        """

        def __init__(self, nan_batches: Iterable[int] = (), lr: float = 0.05) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = TinyNet()
            self.nan_batches = set(nan_batches)
            self.lr = lr
            self.step_weights: list[dict[str, torch.Tensor]] = []
            self.step_optim: list[dict] = []
            self.val_seen: list[dict[str, torch.Tensor]] = []

        def weights(self) -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(self.backbone(batch["x"]), batch["y"])
            return loss * float("nan") if batch_idx in self.nan_batches else loss

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            self.val_seen.append(self.weights())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

        def optimizer_step(self, *args, **kwargs) -> None:
            super().optimizer_step(*args, **kwargs)
            self.step_weights.append(self.weights())
            self.step_optim.append(copy.deepcopy(self.trainer.optimizers[0].state_dict()["state"]))

    return TinyModule


@pytest.fixture(scope="session")
def tiny_module() -> type:
    """The ``TinyModule`` class (see :func:`_tiny_module_class`)."""
    return _tiny_module_class()


def tiny_loader(n: int = 8, batch_size: int = 2):
    """``n`` fixed samples as dict batches ``{"x": [B, 4], "y": [B, 1], "ids": [B] str}``."""
    import torch

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    samples = [{"x": x[i], "y": y[i], "id": f"s{i}"} for i in range(n)]

    def collate(items: list[dict]) -> dict:
        return {
            "x": torch.stack([s["x"] for s in items]),
            "y": torch.stack([s["y"] for s in items]),
            "ids": [s["id"] for s in items],
        }

    return torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=collate)


def tiny_trainer(root: str | Path, callbacks: list, **kwargs):
    """A quiet CPU ``Trainer`` for ``TinyModule`` (no logger, no checkpointing unless passed in)."""
    import lightning as L

    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
    }
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------- tiny editors
# A 2-block transformer config for the pure-PyTorch model tests (4 latent channels, 32-d text).
TINY_TRANSFORMER = {
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "in_channels": 16,
    "out_channels": 4,
    "axes_dims_rope": [4, 6, 6],
}


def untrained_tiny_stage(run_dir: str | Path, *overrides: str):
    """An untrained stage of ``conf/train.yaml`` with a 2-block backbone (seed 0) and its composed config."""
    import torch
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # Two blocks are enough to exercise every path and keep the tests fast.
        cfg = hydra_compose(
            "train",
            overrides=[f"paths.output_dir={run_dir}", "backbone.transformer_config.num_layers=2", *overrides],
        )
    torch.manual_seed(0)
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()
    return stage, cfg


def untrained_tiny_export(root: Path) -> Path:
    """``root/export``: an untrained tiny editor exported as ``rededit-edit`` / ``rededit-eval`` read it."""
    from omegaconf import OmegaConf

    from rededit.stages.checkpoints import export_editor

    stage, cfg = untrained_tiny_stage(root / "run")
    return export_editor(stage.backbone, root / "export", config_yaml=OmegaConf.to_yaml(cfg, resolve=True))


@pytest.fixture(autouse=True)
def _uris_stay_inside_their_root(monkeypatch):
    """Every test starts with the default: image URIs may not leave their manifest's folder (a datamodule
    built with data.allow_outside_root=true allows it process-wide)."""
    monkeypatch.delenv("REDEDIT_ALLOW_OUTSIDE_ROOT", raising=False)
