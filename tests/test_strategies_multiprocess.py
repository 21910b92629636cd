"""2-process CPU (gloo) proofs of the ``ddp`` and ``fsdp2`` presets (issue 7 acceptance; slow tier).

Each run is ``torchrun --nproc_per_node 2 tests/multiprocess/train_dist.py`` (a subprocess with a free port,
not in-process DDP inside pytest: docs/architecture.md). For each strategy:

1. every step, both ranks are served the same bucket (one target shape) and disjoint samples;
2. the first step's gradients equal a single-process computation on the concatenation of the two ranks'
   batches (each half with its rank's noise/σ stream; mean over the global batch), within fp32 tolerance;
3. a run SIGKILLed right after its step-``K`` checkpoint and resumed from it reproduces the uninterrupted
   run's per-rank losses of steps ``K+1..N`` bit for bit, and ends on identical raw and EMA weights
   (fsdp2: DCP directories with EMA shards, consolidated in one process by ``rededit-consolidate``'s code);
4. fsdp2 only: the 2-rank sharded checkpoint resumes on 1 rank without losing or repeating a sample;
5. fsdp2 only: meta-device init + ``stage.init_from`` starts from exactly the checkpoint's weights.

DPO / NFT (``test_rl_stage_frozen_copies_under_fsdp2``; fsdp2, NFT also hsdp and a gathered-file checkpoint): the
sharded DPO reference / NFT old policy give each rank the loss and reference / old-policy terms of a
single-process run on the same weights and batch, and a resume from a mid-run checkpoint reproduces the rest.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.timeout(2400),  # up to 5 two-process runs per test; each takes 1-4 min on a shared 2-core box
]

SCRIPT = REPO / "tests" / "multiprocess" / "train_dist.py"
TOTAL, KILL_AT = 4, 2
COMMON = (
    "experiment=demo_pretrain",
    "backbone.transformer_config.num_layers=2",
    "timestep.curriculum.anneal_steps=5",  # the curriculum moves during the resumed steps
    "data.val_split=null",
    "data.token_budget=256",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress",
    "callbacks.model_checkpoint.every_n_train_steps=1",
)


def free_port() -> int:
    """A TCP port free on this machine now (torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, overrides: list[str], *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(SCRIPT),
        "--out",
        str(out),
        "--record",
        str(out / "records"),
        *args,
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    (out / "launch.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return proc


def records(out: Path) -> dict[tuple[int, int], dict]:
    """``{(global_step, rank): record}``."""
    rows = {}
    for path in sorted((out / "records").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[(r["global_step"], r["rank"])] = r
    return rows


def _overrides(strategy: str, manifest: Path, steps: int = TOTAL, *extra: str) -> list[str]:
    return [
        *COMMON,
        f"strategy={strategy}",
        "trainer.devices=2",
        f"data.manifest={manifest}",
        f"trainer.max_steps={steps}",
        *extra,
    ]


def _reference_grads(manifest: Path, run: Path) -> dict[str, torch.Tensor]:
    """Single process: loss of the concatenated global batch of step 0 (rank r's half with rank r's noise)."""
    from hydra.utils import instantiate

    cfg = compose([*COMMON, f"data.manifest={manifest}", "trainer.max_steps=1"], run / "ref")
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()
    stage.backbone.load_state_dict(torch.load(run / "records" / "step0_init.pt", weights_only=True))
    losses, sizes = [], []
    for rank in (0, 1):
        batch = torch.load(run / "records" / f"step0_batch_rank{rank}.pt", weights_only=False)
        # Rank r's σ/ε streams (BaseStage._draw reads global_rank / world_size / global_step); barebones: the
        # stand-in has no logger connection, so self.log (the condition-drop fraction) is switched off.
        stage._trainer = types.SimpleNamespace(global_rank=rank, world_size=2, global_step=0, barebones=True)
        per_sample, _ = stage.flow_loss(batch)
        losses.append(per_sample)
        sizes.append(per_sample.numel())
    assert sizes[0] == sizes[1]  # equal halves: mean of the concatenation == mean of the ranks' means
    torch.cat(losses).mean().backward()
    stage._trainer = None
    return {n: p.grad for n, p in stage.backbone.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_strategy(strategy, tiny_corpus, tmp_path) -> None:
    from rededit.stages.checkpoints import consolidate

    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = launch(full, _overrides(strategy, tiny_corpus), "--dump-step0")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 1. same bucket on every rank, disjoint samples, consecutive global steps
    rec = records(full)
    assert sorted({s for s, _ in rec}) == list(range(1, TOTAL + 1))
    seen: list[str] = []
    for step in range(1, TOTAL + 1):
        r0, r1 = rec[(step, 0)], rec[(step, 1)]
        assert r0["target_hw"] == r1["target_hw"] and r0["step"] == r1["step"] == step - 1
        assert not set(r0["ids"]) & set(r1["ids"]) and len(r0["ids"]) == len(r1["ids"])
        seen += r0["ids"] + r1["ids"]
    assert len(seen) == len(set(seen))  # no sample twice within the epoch

    # 2. gradients == single process on the concatenated batch
    got = torch.load(full / "records" / "step0_grads.pt", weights_only=True)
    want = _reference_grads(tiny_corpus, full)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)

    # 3. kill right after the step-K checkpoint, resume from it: identical losses and final weights
    proc = launch(killed, _overrides(strategy, tiny_corpus), "--kill-after-step", str(KILL_AT))
    assert proc.returncode != 0
    ckpt = killed / "checkpoints" / f"step{KILL_AT:07d}.ckpt"
    assert ckpt.exists() and not (killed / "checkpoints" / f"step{KILL_AT + 1:07d}.ckpt").exists()
    resumed = tmp_path / "resumed"
    proc = launch(resumed, _overrides(strategy, tiny_corpus, TOTAL, f"ckpt_path={ckpt}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec_resumed = records(resumed)
    assert sorted({s for s, _ in rec_resumed}) == list(range(KILL_AT + 1, TOTAL + 1))
    for key, row in rec_resumed.items():
        assert row["ids"] == rec[key]["ids"] and row["loss"] == rec[key]["loss"], key

    last = f"step{TOTAL:07d}.ckpt"
    raw_a, ema_a = consolidate(full / "checkpoints" / last)
    raw_c, ema_c = consolidate(resumed / "checkpoints" / last)
    assert ema_a and set(ema_a) == set(ema_c)
    for name in raw_a:
        assert torch.equal(raw_a[name], raw_c[name]), name
    for name in ema_a:
        assert torch.equal(ema_a[name], ema_c[name]), name
    if strategy != "fsdp2":
        return
    assert (full / "checkpoints" / last / ".metadata").is_file()  # sharded DCP directory
    assert not any(p.name.endswith(".tmp") for p in (full / "checkpoints").iterdir())

    # 4. the 2-rank sharded checkpoint resumed on ONE rank: DCP reshards, the sampler re-plans the rest of
    #    the epoch (no sample lost or repeated; losses differ: other batches, rank-dependent noise).
    one = tmp_path / "one_rank"
    overrides = [o for o in _overrides(strategy, tiny_corpus, KILL_AT + 3) if o != "trainer.devices=2"]
    proc = launch(one, [*overrides, "trainer.devices=1", f"ckpt_path={ckpt}"], nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = [i for (step, _), r in records(killed).items() if step <= KILL_AT for i in r["ids"]]
    after = [i for r in records(one).values() for i in r["ids"]]
    assert len(after) > 0 and all(r["world_size"] == 1 for r in records(one).values())
    assert len(before + after) == len(set(before + after))

    # 5. meta-device init: the backbone is built on `meta`, sharded, materialised, then filled from
    #    `stage.init_from` (rank 0 reads, broadcasts) — the first step starts from exactly those weights.
    meta = tmp_path / "meta_init"
    extra = ("strategy.parallelize.meta_init=true", f"stage.init_from={ckpt}", "stage.init_from_ema=false")
    proc = launch(meta, _overrides(strategy, tiny_corpus, 1, *extra), "--dump-step0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = torch.load(meta / "records" / "step0_init.pt", weights_only=True)
    raw_k, _ = consolidate(ckpt)
    assert set(init) == set(raw_k) and all(torch.equal(init[k], raw_k[k]) for k in raw_k)


def test_hsdp_two_dimensional_mesh_matches_single_process(tiny_corpus, tmp_path) -> None:
    """``strategy=hsdp`` on a 2 × 1 mesh (replicate 2, shard 1): gradients == the single-process reference."""
    run = tmp_path / "hsdp"
    extra = (
        "strategy.parallelize.shard_size=1",
        "strategy.parallelize.param_dtype=null",  # exact comparison; bf16 compute is the GPU default
        "strategy.parallelize.activation_checkpointing=true",
    )
    proc = launch(run, _overrides("hsdp", tiny_corpus, 1, *extra), "--dump-step0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh ('replicate', 'shard') (2, 1)" in proc.stdout + proc.stderr
    got = torch.load(run / "records" / "step0_grads.pt", weights_only=True)
    want = _reference_grads(tiny_corpus, run)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_copy_under_fsdp2(tmp_path) -> None:
    """DPO reference / NFT old policy: ``parallelize_frozen`` via ``frozen_copy`` and ``copy_shards_`` (2 ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(REPO / "tests" / "multiprocess" / "frozen_copy.py"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]


# ------------------------------------------------------------------------------------ DPO / NFT under FSDP2
# The DPO reference and the NFT old policy are sharded frozen twins of the backbone (stages/dpo.py
# sharded_frozen_twin), run several forwards per step on every rank together (DPO: the reference's online
# negatives, 2 Euler steps, + its [2B] loss forward; NFT: 2-step rollouts + v_old), and the old policy is saved
# as __nft_old__.* shards in the DCP checkpoint.
RL_COMMON = (
    "backbone.transformer_config.num_layers=2",
    "data.val_split=null",
    "data.token_budget=256",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "stage.warmup_steps=0",
    "stage.init_from_ema=false",
)
RL_STAGES = {
    # No `rejected` column in the tiny corpus: every negative is the sharded reference's own sample.
    "dpo": ("experiment=demo_dpo", "stage.missing_rejected=reference_sample", "stage.negative_steps=2"),
    "nft": (
        "experiment=demo_nft",
        "stage.reward={_target_: test_nft.BrightnessReward}",
        "stage.group_size=2",
        "stage.rollout_steps=2",
        "stage.old_decay_rate=0.3",  # η = 0, 0.3, 0.5: the old policy differs from the policy from step 2 on
        "optimizer.lr=1e-3",
    ),
}


def _perturbed_init(path: Path) -> Path:
    """A start checkpoint (``stage.init_from``) whose rollouts depend on their noise (the zero-initialised tiny
    preset predicts one x̂0 for every x_t: flat NFT groups, policy == reference in every DPO loss term)."""
    from hydra.utils import instantiate

    factory = instantiate(compose(["backbone.transformer_config.num_layers=2"]).backbone)
    torch.manual_seed(0)
    model = factory(latent_channels=instantiate(compose([]).vae).latent_channels)
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, path)
    return path


# HSDP on a 2 × 1 mesh (replicate 2, shard 1), fp32 compute for exact comparisons; its AC stays on.
RL_STRATEGIES = {
    "fsdp2": ("strategy=fsdp2",),
    "hsdp": ("strategy=hsdp", "strategy.parallelize.shard_size=1", "strategy.parallelize.param_dtype=null"),
    # One gathered .ckpt file (old policy in nft_old_policy's shadow, put back into the shards on resume).
    "fsdp2_full": ("strategy=fsdp2", "strategy.save_distributed_checkpoint=false"),
}


def _rl_overrides(
    stage: str, manifest: Path, init: Path, steps: int, *extra: str, strategy: str = "fsdp2"
) -> list[str]:
    return [
        *RL_STAGES[stage],
        *RL_COMMON,
        *RL_STRATEGIES[strategy],
        "trainer.devices=2",
        f"data.manifest={manifest}",
        f"stage.init_from={init}",
        f"trainer.max_steps={steps}",
        *extra,
    ]


def _single_process_step(stage_name: str, manifest: Path, init: Path, run: Path, g: int) -> dict[int, dict]:
    """Rank r's loss (and stage metrics) of the batch before optimizer step ``g``, recomputed in one process from
    the 2-rank run's weights at ``g`` (consolidated checkpoint) and its dumped batch, with rank r's streams."""
    from hydra.utils import instantiate

    from rededit.stages.checkpoints import _load_full_checkpoint, consolidate

    cfg = compose(
        [*RL_STAGES[stage_name], *RL_COMMON, f"data.manifest={manifest}", f"stage.init_from={init}"]
    )
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()  # single device: reference / old policy = deep copy of the init_from backbone
    if g > 0:
        ckpt = run / "checkpoints" / f"step{g:07d}.ckpt"
        raw, _ = consolidate(ckpt)
        stage.backbone.load_state_dict(raw)
        if stage_name == "nft":
            full = _load_full_checkpoint(ckpt)
            prefix = "__nft_old__."
            old = {k.removeprefix(prefix): v for k, v in full["state_dict"].items() if k.startswith(prefix)}
            if (
                not old
            ):  # a gathered checkpoint: the trainable tensors' shadow, the frozen ones = the policy's
                old = {**raw, **full["nft_old_policy"]["shadow"]}
            stage.old_policy.load_state_dict(old)
    return per_rank_metrics(stage_name, stage, run, g)


def per_rank_metrics(stage_name: str, stage, run: Path, g: int) -> dict[int, dict]:
    """Each rank's loss and stage metrics of the batch it saw before optimizer step ``g`` (its dumped batch in
    ``run/records``), recomputed in this process by ``stage`` with that rank's streams."""
    from rededit.losses.dpo import dpo_loss

    out = {}
    for rank in (0, 1):
        batch = torch.load(run / "records" / f"batch_g{g}_rank{rank}.pt", weights_only=False)
        stage._trainer = types.SimpleNamespace(global_rank=rank, world_size=2, global_step=g, barebones=True)
        with torch.no_grad():
            if stage_name == "dpo":
                p = stage.pair_losses(batch)
                per = dpo_loss(
                    p["loss_w"],
                    p["loss_l"],
                    p["ref_loss_w"],
                    p["ref_loss_l"],
                    stage.beta,
                    stage.omega,
                    stage.lam,
                )
                out[rank] = {
                    "loss": float(per.mean()),
                    **{f"dpo/{k}": float(p[k].mean()) for k in ("ref_loss_w", "ref_loss_l", "loss_w")},
                }
            else:
                loss, parts = stage.nft_step(batch)
                logs = parts["logs"]
                keys = ("reward/mean", "nft/policy_old_mse", "nft/kl")
                out[rank] = {"loss": float(loss), **{k: float(logs[k]) for k in keys if k in logs}}
    stage._trainer = None
    return out


@pytest.mark.parametrize(
    ("stage_name", "strategy"), [("dpo", "fsdp2"), ("nft", "fsdp2"), ("nft", "hsdp"), ("nft", "fsdp2_full")]
)
def test_rl_stage_frozen_copies_under_fsdp2(stage_name, strategy, tiny_corpus, tmp_path) -> None:
    """2-rank fsdp2 DPO / NFT: per-rank losses and reference / old-policy terms equal a single-process run with
    the same weights and batch (unsharded deep-copied reference / old policy); a resume from a mid-run sharded
    checkpoint reproduces the uninterrupted run's losses and stage metrics exactly."""
    total, resume_at = 3, (1 if stage_name == "dpo" else 2)
    init = _perturbed_init(tmp_path / "init.ckpt")
    full = tmp_path / "full"
    proc = launch(
        full, _rl_overrides(stage_name, tiny_corpus, init, total, strategy=strategy), "--dump-batches"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if strategy == "hsdp":
        assert "mesh ('replicate', 'shard') (2, 1)" in proc.stdout + proc.stderr
    rec = records(full)
    assert sorted({s for s, _ in rec}) == list(range(1, total + 1))
    ckpt = full / "checkpoints" / f"step{resume_at:07d}.ckpt"
    assert (ckpt / ".metadata").is_file() == (strategy != "fsdp2_full")  # sharded DCP directory or one file

    # Sharded frozen copies == unsharded ones: step 1 (reference / old policy = init) and the step after the
    # resume point (policy trained; DPO reference still the init weights; NFT old policy ≠ policy).
    checks = {
        "dpo": ("dpo/ref_loss_w", "dpo/ref_loss_l", "dpo/loss_w"),
        "nft": ("reward/mean", "nft/policy_old_mse"),
    }
    for g in (0, resume_at):
        want = _single_process_step(stage_name, tiny_corpus, init, full, g)
        for rank in (0, 1):
            got = rec[(g + 1, rank)]
            assert got["loss"] == pytest.approx(want[rank]["loss"], rel=1e-4, abs=1e-6), (g, rank)
            for key in checks[stage_name]:
                assert got["metrics"][key] == pytest.approx(want[rank][key], rel=1e-4, abs=1e-7), (
                    g,
                    rank,
                    key,
                )
    if stage_name == "nft":
        assert rec[(resume_at + 1, 0)]["metrics"]["nft/policy_old_mse"] > 0  # the old policy lags the policy
    else:
        assert rec[(resume_at + 1, 0)]["metrics"]["dpo/implicit_acc"] >= 0  # logged per rank
        ref_w, pol_w = (rec[(resume_at + 1, 0)]["metrics"][k] for k in ("dpo/ref_loss_w", "dpo/loss_w"))
        assert ref_w != pol_w  # the reference did not follow the policy

    # Resume from the sharded mid-run checkpoint (DPO: reference rebuilt from init_from, fingerprint-checked;
    # NFT: old-policy shards and counters read back): the remaining steps are reproduced exactly.
    resumed = tmp_path / "resumed"
    extra = f"ckpt_path={ckpt}"
    proc = launch(resumed, _rl_overrides(stage_name, tiny_corpus, init, total, extra, strategy=strategy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec_resumed = records(resumed)
    assert sorted({s for s, _ in rec_resumed}) == list(range(resume_at + 1, total + 1))
    for key, row in rec_resumed.items():
        assert row["ids"] == rec[key]["ids"] and row["loss"] == rec[key]["loss"], key
        assert row["metrics"] == rec[key]["metrics"], key


@pytest.mark.slow
def test_fsdp2_export_gathers_on_rank0_and_equals_a_single_process_export(tiny_corpus, tmp_path) -> None:
    """Issue 19: under FSDP2 the end-of-training export gathered full raw and EMA weights on every rank. It now
    gathers tensor by tensor into rank 0's CPU memory (``rank0_only``); the folder it writes equals the
    single-process export of the same weights (``rededit-consolidate`` of the run's sharded ``last.ckpt``)."""
    from safetensors.torch import load_file

    from rededit.cli.consolidate import consolidate_to_editor

    run = tmp_path / "run"
    overrides = [
        *COMMON,
        f"data.manifest={tiny_corpus}",
        "strategy=fsdp2",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "callbacks=[default,ema]",
        f"export_dir={run / 'export'}",
    ]
    proc = launch(run, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = consolidate_to_editor(run / "checkpoints" / "last.ckpt", tmp_path / "single")
    files = sorted(p.relative_to(run / "export") for p in (run / "export").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(single) for p in single.rglob("*.safetensors"))
    for rel in files:
        a, b = load_file(run / "export" / rel), load_file(single / rel)
        assert a.keys() == b.keys(), rel
        for k in a:
            assert torch.equal(a[k], b[k]), (rel, k)
