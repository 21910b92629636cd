"""SLURM launching and stable run folders (issue 7, "Launch").

``hydra/launcher=slurm`` composes, every key is a field of the plugin's config, and the sbatch script
submitit would submit has one task per GPU; the run id (and so the run folder and the wandb id) is the
same for a requeued job and different for another job; ``ckpt_path=auto`` finds the folder's
``last.ckpt``; the sbatch template passes the node count and ``ckpt_path=auto`` to ``rededit-train``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose
from rededit.utils.run_id import register_resolvers, resolve_ckpt_path, wandb_id

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
SLURM_ENV = (
    "REDEDIT_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _run_dir(tmp_path) -> tuple[str, str]:
    return _run_dir_with(tmp_path)


def test_run_id_is_stable_across_requeues_and_distinct_across_jobs(clean_env, tmp_path) -> None:
    clean_env.setenv("SLURM_JOB_ID", "4242")
    first = _run_dir(tmp_path)
    assert first == ("4242", "outputs/runs/pretrain/4242")
    clean_env.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued
    assert _run_dir(tmp_path) == first
    clean_env.setenv("SLURM_JOB_ID", "4243")  # another job (or another array task: each has its own id)
    assert _run_dir(tmp_path)[1] == "outputs/runs/pretrain/4243"
    clean_env.setenv("REDEDIT_RUN_ID", "ablation-a")  # explicit id wins
    assert _run_dir(tmp_path) == ("ablation-a", "outputs/runs/pretrain/ablation-a")


def test_local_run_id_is_the_start_time_and_matches_the_folder(clean_env, tmp_path) -> None:
    run_id, run_dir = _run_dir(tmp_path)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_id)
    assert run_dir == f"outputs/runs/pretrain/{run_id}"


def test_resuming_a_checkpoint_of_a_run_continues_in_that_run_folder(clean_env, tmp_path) -> None:
    """``ckpt_path=<run>/checkpoints/last.ckpt`` used to resume into a new timestamped folder."""
    register_resolvers()
    run = tmp_path / "outputs" / "runs" / "sft" / "2026-01-01_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("stage_name: sft\n")
    for ckpt in (
        run / "checkpoints" / "last.ckpt",
        run / "checkpoints" / "step0000100.ckpt",
        run / "hpc_ckpt_3.ckpt",
    ):
        cfg = compose([f"ckpt_path={ckpt}"], tmp_path, keep_hydra=True)
        assert OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"] == str(run), ckpt
    # Not a rededit run folder (no config.yaml), auto, or no checkpoint: a new run folder as before.
    for other in (tmp_path / "elsewhere" / "checkpoints" / "x.ckpt", "auto", "null"):
        run_id, run_dir = _run_dir_with(tmp_path, f"ckpt_path={other}")
        assert run_dir == f"outputs/runs/pretrain/{run_id}", other


def _run_dir_with(tmp_path, *overrides: str) -> tuple[str, str]:
    cfg = compose(list(overrides), tmp_path, keep_hydra=True)
    return str(cfg.run_id), OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]


def test_wandb_id_follows_the_run_folder(clean_env, tmp_path) -> None:
    assert wandb_id("sft", tmp_path / "a") == wandb_id("sft", tmp_path / "a")
    assert wandb_id("sft", tmp_path / "a") != wandb_id("sft", tmp_path / "b")
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", wandb_id("demo sft/β" * 10, tmp_path))
    register_resolvers()
    cfg = compose(["logger=wandb"], tmp_path)
    node = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    assert node["id"] == wandb_id("pretrain", tmp_path) and node["resume"] == "allow"


def test_ckpt_path_auto(tmp_path) -> None:
    assert resolve_ckpt_path("auto", tmp_path) is None  # first start: nothing to resume
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"global_step": 1}, last)
    assert resolve_ckpt_path("auto", tmp_path) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # Lightning's SIGUSR1 checkpoint, newer than last.ckpt
    torch.save({"global_step": 2}, hpc)
    os.utime(last, ns=(1, 1))
    assert resolve_ckpt_path("auto", tmp_path) == str(hpc)
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("/x/step1.ckpt", tmp_path) == "/x/step1.ckpt"
    assert resolve_ckpt_path("last", tmp_path) == "last"  # Lightning's own keywords pass through


def test_train_run_hands_auto_resolved_checkpoint_to_fit(tmp_path, monkeypatch, tiny_corpus) -> None:
    import rededit.train as train

    seen = []
    trainer = SimpleNamespace(
        fit=lambda model, datamodule, ckpt_path, weights_only: seen.append((ckpt_path, weights_only)),
        callback_metrics={},
        fast_dev_run=True,
    )
    monkeypatch.setattr(train, "build", lambda cfg: (None, None, trainer))
    cfg = compose(["ckpt_path=auto", f"data.manifest={tiny_corpus}"], tmp_path)
    train.run(cfg)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 1}, tmp_path / "checkpoints" / "last.ckpt")
    train.run(cfg)
    assert seen == [(None, True), (str(tmp_path / "checkpoints" / "last.ckpt"), True)]


def test_slurm_launcher_composes_and_builds_the_sbatch_script(tmp_path, monkeypatch) -> None:
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path, keep_hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    config = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config")
    submitit = pytest.importorskip("submitit")
    from hydra.utils import instantiate

    fields = set(OmegaConf.structured(config.SlurmQueueConf).keys())
    assert set(launcher) <= fields, f"unknown launcher keys: {set(launcher) - fields}"
    params = instantiate(launcher).params
    # What the plugin does in launch(): executor-specific keys get the "slurm_" prefix.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path / "sub", slurm_max_num_timeout=params["max_num_timeout"]
    )
    base = set(OmegaConf.structured(config.BaseQueueConf).keys())
    executor.update_parameters(
        **{
            k if k in base else f"slurm_{k}": v
            for k, v in params.items()
            if k not in {"max_num_timeout", "submitit_folder"}
        }
    )
    script = executor._executor._make_submission_file_text("rededit-train", "uid")
    for line in ("--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in script
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script and "srun" in script


def test_sbatch_template_passes_nodes_devices_and_auto_resume(tmp_path) -> None:
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in {
        "srun": 'shift; echo "SRUN $*"',  # drop --kill-on-bad-exit, print the command it would start
        "scontrol": "echo node-a; echo node-b",
    }.items():
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(0o755)
    env = {
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "777",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_GPUS_PER_NODE": "h100:4",
        "SLURM_CPUS_PER_TASK": "6",
    }
    out = subprocess.run(
        ["bash", str(SBATCH), "experiment=sft", "strategy=hsdp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    srun = next(line for line in out.stdout.splitlines() if line.startswith("SRUN"))
    assert srun.split()[1:] == [
        "rededit-train",
        "trainer=gpu",
        "trainer.num_nodes=2",
        "trainer.devices=4",
        "ckpt_path=auto",
        "+callbacks=preemption",  # our signal-safe save + requeue (not Lightning's in-handler save)
        "callbacks.preemption.requeue=true",
        "experiment=sft",
        "strategy=hsdp",
    ]
    text = Path(SBATCH).read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=USR1@120" in text


def test_preemption_callback_turns_off_lightnings_in_handler_requeue(monkeypatch) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from rededit.callbacks.preemption import PreemptionCheckpoint
    from rededit.train import cluster_plugins

    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert SLURMEnvironment.detect()
    (env,) = cluster_plugins([PreemptionCheckpoint(requeue=True)])
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    assert cluster_plugins([]) == []  # without our callback Lightning keeps its own handler
    monkeypatch.delenv("SLURM_NTASKS")
    assert cluster_plugins([PreemptionCheckpoint()]) == []  # not under SLURM
