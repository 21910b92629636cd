"""Default-tier checks of rededit.parallel: plan/mesh arithmetic, meta-device init, atomic checkpoints,
the consolidation command, the NaN guard's stop action and the preemption checkpoint (single process)."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch

from conftest import compose, tiny_loader, tiny_trainer, train_overrides
from rededit.parallel import ParallelPlan, load_full_state, materialize, meta_init
from rededit.parallel.checkpoint_io import atomic_dir, recover, swap_in_dir, tmp_dir_for
from rededit.parallel.parallelize import mesh_shape

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------------------------- plan / mesh
def test_mesh_shape_fsdp2_and_hsdp() -> None:
    assert mesh_shape(8, None, hsdp=False, devices_per_node=8) == (1, 8)  # FSDP2: one shard group
    assert mesh_shape(32, None, hsdp=True, devices_per_node=8) == (4, 8)  # HSDP default: one node per group
    assert mesh_shape(32, 16, hsdp=True, devices_per_node=8) == (2, 16)
    with pytest.raises(ValueError, match="does not divide the world size 12"):
        mesh_shape(12, 8, hsdp=True, devices_per_node=8)


def test_plan_validates_dtypes_and_builds_fsdp_kwargs() -> None:
    with pytest.raises(ValueError, match=r"parallelize\.param_dtype='int8'"):
        ParallelPlan(param_dtype="int8")
    kwargs = ParallelPlan(param_dtype="bf16", reshard_after_forward=False).fsdp_kwargs()
    assert (
        kwargs["mp_policy"].param_dtype == torch.bfloat16
        and kwargs["mp_policy"].reduce_dtype == torch.float32
    )
    assert kwargs["reshard_after_forward"] is False
    frozen = ParallelPlan(param_dtype="bf16", reshard_after_forward=False).fsdp_kwargs(frozen=True)
    assert frozen["reshard_after_forward"] is True and frozen["mp_policy"].reduce_dtype is None


# ----------------------------------------------------------------------------------------------- meta init
def _tiny_backbone_factory():
    from hydra.utils import instantiate

    cfg = compose(["backbone.transformer_config.num_layers=2"])
    return instantiate(cfg.backbone)


def test_meta_init_then_load_gives_identical_weights_and_outputs() -> None:
    factory = _tiny_backbone_factory()
    torch.manual_seed(0)
    reference = factory(latent_channels=48)
    state = {k: v.clone() for k, v in reference.state_dict().items()}

    empty = meta_init(factory, latent_channels=48)
    assert all(p.is_meta for p in empty.parameters())
    materialize(empty, "cpu")  # to_empty + RoPE rebuilt (plain tensors stay on meta otherwise)
    load_full_state(empty, state)
    for name, value in empty.state_dict().items():
        assert torch.equal(value, state[name]), name
    x = torch.randn(1, 48, 4, 4)
    text = torch.randn(1, 3, reference.transformer.config.joint_attention_dim)
    args = (x, [x], torch.full((1,), 0.5), text, torch.ones(1, 3, dtype=torch.bool))
    with torch.no_grad():
        assert torch.equal(empty(*args), reference(*args))


# ----------------------------------------------------------------------------------------------- atomic writes
def test_atomic_dir_keeps_the_previous_sharded_checkpoint(tmp_path) -> None:
    final = tmp_path / "last.ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "__0_0.distcp").write_text("good")
        (tmp / ".metadata").write_text("meta")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "__0_0.distcp").write_text("half")
        raise KeyboardInterrupt
    assert (final / "__0_0.distcp").read_text() == "good" and not tmp_dir_for(final).exists()
    # A crash between the two renames of swap_in_dir leaves `.last.ckpt.old`: recover() finds it.
    os.replace(final, final.with_name(".last.ckpt.old"))
    assert recover(final).name == ".last.ckpt.old"
    new = tmp_dir_for(final)
    new.mkdir()
    (new / "x").write_text("new")
    swap_in_dir(new, final)
    assert (final / "x").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------------------------- NaN guard / signals
def test_nan_guard_stop_action_stops_at_the_first_bad_step(tmp_path, tiny_module) -> None:
    from rededit.callbacks.nan_guard import NaNGuard

    with pytest.raises(ValueError, match="'skip' or 'stop'"):
        NaNGuard(action="ignore")
    module = tiny_module(nan_batches=[1])
    trainer = tiny_trainer(tmp_path, [NaNGuard(max_consecutive=5, action="stop")], max_steps=4)
    with pytest.raises(FloatingPointError, match=r"batch ids \['s2', 's3'\]"):
        trainer.fit(module, train_dataloaders=tiny_loader())
    assert len(module.step_weights) == 1  # step 0 trained, step 1 (NaN) stopped the run


class _SendSignal(L.Callback):
    def __init__(self, at: int, signum: int) -> None:
        self.at, self.signum = at, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_checkpoint_then_stops(tmp_path, tiny_module, signame) -> None:
    from rededit.callbacks.preemption import PreemptionCheckpoint

    signum = getattr(signal, signame)
    before = signal.getsignal(signum)
    guard = PreemptionCheckpoint(signals=[signame], dirpath=str(tmp_path / "ckpt"))
    trainer = tiny_trainer(tmp_path, [_SendSignal(2, signum), guard], max_steps=10)
    trainer.fit(tiny_module(), train_dataloaders=tiny_loader(n=32))
    assert trainer.global_step == 3  # the signalled batch finished, then training stopped
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and guard.saved_path == tmp_path / "ckpt" / "last.ckpt"
    assert signal.getsignal(signum) == before  # handlers restored at teardown


# ----------------------------------------------------------------------------------------------- consolidation
def test_consolidate_a_single_file_checkpoint_matches_the_export(tiny_corpus, tmp_path) -> None:
    from safetensors.torch import load_file

    from rededit.cli.consolidate import main as consolidate_main
    from rededit.train import run

    overrides = train_overrides(
        tiny_corpus,
        "experiment=demo_pretrain",
        "backbone.transformer_config.num_layers=1",
        "data.val_split=null",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"export_dir={tmp_path / 'export'}",
        steps=2,
        budget=256,
    )
    run(compose(overrides, tmp_path))
    assert consolidate_main([str(tmp_path), "--out", str(tmp_path / "cons")]) == 0
    for rel in ("backbone_raw.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "export" / rel), load_file(tmp_path / "cons" / rel)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), rel
    assert (tmp_path / "cons" / "WEIGHTS").read_text().strip() == "ema"


@pytest.mark.slow
def test_scale_out_benchmark_smoke(tmp_path) -> None:
    """experiments/benchmarks/scale_out/run.py runs its FSDP2 + AC path (CPU, tiny; the GPU figures need a GPU)."""
    import socket
    import subprocess
    import sys

    from conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    script = REPO / "experiments" / "benchmarks" / "scale_out" / "run.py"
    cmd = [
        sys.executable,
        str(script),
        "--device",
        "cpu",
        "--tiny",
        "--steps",
        "1",
        "--configs",
        "bf16_fsdp2+ac",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| bf16_fsdp2+ac |" in proc.stdout and "out of memory" not in proc.stdout
