"""Adapters and the DPO / NFT frozen models under the distributed strategies (issues 20 and 21).

Default tier:

* NFT's KL reference with an adapter (``stage.nft.form=official``, ``kl_weight > 0``) is an
  :class:`~rededit.models.adapters.AdapterView` with the adapter off, in eval mode and with the *initial* FireEdit
  weights: it predicts exactly what the base the adapter was injected into predicts, after the adapter and the
  FireEdit weights trained and with the backbone in training mode.

Slow tier (2 CPU processes, gloo; one spawned group per strategy runs every run of that strategy,
``tests/multiprocess/run_plan.py``), under ``ddp`` and ``fsdp2``, with LoRA (rank 4) on a perturbed 2-block base:

* SFT: the first step's gradients equal a single-process computation on the concatenated global batch and only
  adapter tensors get them; the checkpoints (a DCP directory under fsdp2) hold only the adapter + the adapter
  record; a resume from the step-1 checkpoint reproduces the losses and ends on identical adapter and EMA
  tensors; the export holds the unchanged base and equals the single-process export of the same checkpoint
  (``rededit-consolidate``): PEFT folder and diffusers LoRA file included.
* DPO (reference = the base with the adapter off) and NFT (official form with its KL reference view; old policy
  = the second adapter): every rank's loss and stage metrics at step 1 and after the resume point equal a
  single-process recomputation on the same weights and batch; a resume reproduces the rest exactly; the old
  adapter travels in the checkpoint.
* ddp without an adapter: DPO (deep-copied reference) and NFT (deep-copied old policy and KL reference), same
  per-rank checks (fsdp2 without an adapter: tests/test_strategies_multiprocess.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose, untrained_tiny_stage
from rededit.models import adapters
from test_strategies_multiprocess import free_port, per_rank_metrics, records

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LIVE = "backbone.zero_init_output=false"
OLD = ".nft_old."  # the NFT old policy's adapter (rededit.stages.nft.OLD_ADAPTER)


# --------------------------------------------------------------------------------------------- default tier
def test_nft_kl_reference_with_an_adapter_is_the_initial_base(tmp_path) -> None:
    """Before: the reference disabled the adapter on the live backbone, which kept the *trained* FireEdit weights
    and the training mode. Now it is the base exactly (tati on: FireEdit weights train beside the adapter)."""
    from rededit.models.backbone import EditBackbone
    from test_adapters import _inputs, _perturb_adapter

    overrides = (
        LIVE,
        "backbone.tati=true",
        "stage=nft",
        "stage.nft.form=official",
        "stage.nft.kl_weight=0.5",
    )
    stage, cfg = untrained_tiny_stage(tmp_path, *overrides, "adapter=lora", "adapter.rank=4")
    backbone = stage.backbone
    assert isinstance(stage.reference, adapters.AdapterView) and stage.reference.backbone is backbone
    assert stage.frozen_copies() == []
    from hydra.utils import instantiate

    base: EditBackbone = instantiate(cfg.backbone)(latent_channels=backbone.latent_channels)
    base.load_state_dict(adapters.base_state_dict(backbone), strict=True)  # the initial weights
    base.eval()
    fingerprint = stage._reference_fingerprint
    # Training moves the adapter and the FireEdit weights (tati.*); the backbone is in training mode.
    _perturb_adapter(backbone)
    tati = [p for n, p in backbone.named_parameters() if n.startswith("tati.")]
    assert tati and all(p.requires_grad for p in tati)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # random, not uniform: a uniform gate on the text stream is undone by its RMSNorm
        for p in tati:
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    backbone.train()
    inputs = _inputs(backbone, seed=3)
    with torch.no_grad():
        got = stage.reference_velocity(*inputs)
        torch.testing.assert_close(got, base(*inputs), rtol=0, atol=0)
        with adapters.adapters_disabled(backbone):  # what the reference was before: trained FireEdit weights
            assert (backbone(*inputs) - got).abs().max() > 1e-4
    assert backbone.training and all(p.requires_grad for p in tati)  # the live backbone is left as it was
    assert stage._reference_fingerprint == fingerprint == pytest.approx(adapters.weights_fingerprint(base))


# --------------------------------------------------------------------------------------------- slow tier
COMMON = (
    "backbone.transformer_config.num_layers=2",
    "data.val_split=null",
    "data.token_budget=256",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "stage.warmup_steps=0",
    "stage.init_from_ema=false",
)
LORA = ("adapter=lora", "adapter.rank=4", "adapter.alpha=8")
STAGES = {
    "sft": ("experiment=demo_sft", "optimizer.lr=1e-2"),
    # No `rejected` column in the tiny corpus: every negative is the reference's own sample (2 Euler steps).
    "dpo": ("experiment=demo_dpo", "stage.missing_rejected=reference_sample", "stage.negative_steps=2"),
    "nft": (
        "experiment=demo_nft",
        "stage.reward={_target_: test_nft.BrightnessReward}",
        "stage.group_size=2",
        "stage.rollout_steps=2",
        "stage.old_decay_rate=0.3",  # η = 0, 0.3, 0.5: the old policy lags the policy from step 2 on
        "optimizer.lr=1e-3",
        "stage.nft.form=official",  # with the KL term: the reference (a view with an adapter) is exercised
        "stage.nft.kl_weight=0.5",
    ),
}
STEPS = {"sft": 3, "dpo": 2, "nft": 3}
RESUME_AT = {"sft": 1, "dpo": 1, "nft": 2}


def _overrides(
    stage: str, strategy: str, manifest: Path, init: Path, adapter: bool, *extra: str
) -> list[str]:
    return [
        *STAGES[stage],
        *COMMON,
        *(LORA if adapter else ()),
        f"strategy={strategy}",
        "trainer.devices=2",
        f"data.manifest={manifest}",
        f"stage.init_from={init}",
        f"trainer.max_steps={STEPS[stage]}",
        *extra,
    ]


def _launch(plan: list[dict], root: Path) -> subprocess.CompletedProcess:
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(REPO / "tests" / "multiprocess" / "run_plan.py"),
        str(root / "plan.json"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    (root / "launch.log").write_text(proc.stdout + proc.stderr)
    return proc


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step:07d}.ckpt"


def _stage(stage_name: str, manifest: Path, init: Path, adapter: bool):
    """The single-process stage of a run's config, with the run's step-0 weights (adapter init included)."""
    from hydra.utils import instantiate

    cfg = compose(
        [
            *STAGES[stage_name],
            *COMMON,
            *(LORA if adapter else ()),
            f"data.manifest={manifest}",
            f"stage.init_from={init}",
        ]
    )
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()  # one device: reference / old policy = a view (adapter) or a deep copy of init_from
    return stage


def _load_step(stage, run: Path, g: int, adapter: bool) -> None:
    """The weights of the run before optimizer step ``g`` (+1): step 0's dump, then the step-``g`` checkpoint."""
    from rededit.stages.checkpoints import _load_full_checkpoint, consolidate

    init = torch.load(run / "records" / "step0_init.pt", weights_only=True)
    stage.backbone.load_state_dict(init, strict=True)
    if g == 0:
        return
    ckpt = _ckpt(run, g)
    raw, _ = consolidate(ckpt)
    missing, _ = stage.backbone.load_state_dict(raw, strict=not adapter)
    assert not set(missing) & {n for n, p in stage.backbone.named_parameters() if p.requires_grad}
    if hasattr(stage, "old_policy"):
        full = _load_full_checkpoint(ckpt)
        if not adapter:  # the frozen tensors of the deep-copied old policy are the policy's
            stage.old_policy.load_state_dict({**raw, **full["nft_old_policy"]["shadow"]})
        else:
            stage._load_old_state(full["nft_old_policy"])


def _check_rl_run(stage_name: str, manifest: Path, init: Path, root: Path, tag: str, adapter: bool) -> None:
    full, resumed = root / f"{stage_name}_{tag}", root / f"{stage_name}_{tag}_resumed"
    rec = records(full)
    assert sorted({s for s, _ in rec}) == list(range(1, STEPS[stage_name] + 1))
    assert all(math.isfinite(r["loss"]) for r in rec.values())
    stage = _stage(stage_name, manifest, init, adapter)
    at = RESUME_AT[stage_name]
    for g in (0, at):
        _load_step(stage, full, g, adapter)
        want = per_rank_metrics(stage_name, stage, full, g)
        for rank in (0, 1):
            got = rec[(g + 1, rank)]
            assert got["loss"] == pytest.approx(want[rank]["loss"], rel=1e-4, abs=1e-6), (tag, g, rank)
            for key, value in want[rank].items():
                if key != "loss":
                    assert got["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (
                        tag,
                        g,
                        rank,
                        key,
                    )
    if stage_name == "nft":
        late = rec[(at + 1, 0)]["metrics"]
        assert (
            late["nft/policy_old_mse"] > 0 and late["nft/kl"] > 0
        )  # old policy and reference lag the policy
    if adapter:  # the checkpoint: the trained adapter only (+ NFT's old adapter, gathered, in nft_old_policy)
        from rededit.stages.checkpoints import _load_full_checkpoint

        saved = _load_full_checkpoint(_ckpt(full, at))
        keys = {k for k in saved["state_dict"] if k.startswith("backbone.")}
        assert keys and all(".lora_A.default." in k or ".lora_B.default." in k for k in keys), sorted(keys)[
            :3
        ]
        assert saved[adapters.CHECKPOINT_KEY]["type"] == "lora"
        if stage_name == "nft":
            assert {f"backbone.{k}" for k in saved["nft_old_policy"]["shadow"]} == keys
    if adapter and stage_name == "nft":
        # the export leaves the old adapter out: the base + the trained adapter
        from safetensors.torch import load_file

        export = full / "export"
        start = torch.load(init, weights_only=True)["state_dict"]
        base = load_file(export / "backbone_raw.safetensors")
        assert base and all(torch.equal(v, start[f"backbone.{k}"]) for k, v in base.items())
        trained = load_file(export / "adapter_raw" / "adapter_model.safetensors")
        assert trained and not any(OLD in k for k in trained)
    if resumed.is_dir():
        rec_resumed = records(resumed)
        assert sorted({s for s, _ in rec_resumed}) == list(range(at + 1, STEPS[stage_name] + 1))
        for key, row in rec_resumed.items():
            assert row["ids"] == rec[key]["ids"] and row["loss"] == rec[key]["loss"], (tag, key)
            assert row["metrics"] == rec[key]["metrics"], (tag, key)


def _sft_reference_grads(manifest: Path, init: Path, run: Path) -> dict[str, torch.Tensor]:
    """Single process: the concatenated global batch of step 0 (rank r's half with rank r's noise)."""
    stage = _stage("sft", manifest, init, adapter=True)
    stage.backbone.load_state_dict(torch.load(run / "records" / "step0_init.pt", weights_only=True))
    losses = []
    for rank in (0, 1):
        batch = torch.load(run / "records" / f"step0_batch_rank{rank}.pt", weights_only=False)
        stage._trainer = types.SimpleNamespace(global_rank=rank, world_size=2, global_step=0, barebones=True)
        losses.append(stage.flow_loss(batch)[0])
    assert losses[0].numel() == losses[1].numel()
    torch.cat(losses).mean().backward()
    stage._trainer = None
    return {n: p.grad for n, p in stage.backbone.named_parameters() if p.grad is not None}


def _check_sft(manifest: Path, init: Path, root: Path, strategy: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from rededit.cli.consolidate import consolidate_to_editor
    from rededit.stages.checkpoints import _load_full_checkpoint, consolidate

    full, resumed = root / "sft_lora", root / "sft_lora_resumed"
    rec = records(full)
    assert all(math.isfinite(r["loss"]) for r in rec.values())
    # 1. step-0 gradients: only the adapter's, equal to one process on the global batch
    got = torch.load(full / "records" / "step0_grads.pt", weights_only=True)
    want = _sft_reference_grads(manifest, init, full)
    assert got and set(got) == set(want)
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in got), sorted(got)[:3]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # 2. checkpoints: only the trainable tensors + the adapter record (DCP directory under fsdp2)
    ckpt = _ckpt(full, RESUME_AT["sft"])
    assert (ckpt / ".metadata").is_file() == (strategy == "fsdp2")
    saved = _load_full_checkpoint(ckpt)
    assert saved[adapters.CHECKPOINT_KEY]["type"] == "lora"
    backbone_keys = {k for k in saved["state_dict"] if k.startswith("backbone.")}
    assert backbone_keys and all(".lora_A.default." in k or ".lora_B.default." in k for k in backbone_keys)
    # 3. resume from step 1: the same losses, adapter and EMA tensors
    rec_resumed = records(resumed)
    assert sorted({s for s, _ in rec_resumed}) == list(range(RESUME_AT["sft"] + 1, STEPS["sft"] + 1))
    for key, row in rec_resumed.items():
        assert row["ids"] == rec[key]["ids"] and row["loss"] == rec[key]["loss"], key
    last = f"step{STEPS['sft']:07d}.ckpt"
    raw_a, ema_a = consolidate(full / "checkpoints" / last)
    raw_c, ema_c = consolidate(resumed / "checkpoints" / last)
    assert ema_a and raw_a.keys() == raw_c.keys() and ema_a.keys() == ema_c.keys()
    assert all(torch.equal(raw_a[k], raw_c[k]) for k in raw_a) and all(
        torch.equal(ema_a[k], ema_c[k]) for k in ema_a
    )
    # 4. the export: the base untouched, the adapter trained, the same files as a single-process export
    export = full / "export"
    base = load_file(export / "backbone_raw.safetensors")
    start = torch.load(init, weights_only=True)["state_dict"]
    assert all(torch.equal(v, start[f"backbone.{k}"]) for k, v in base.items())
    assert (export / "adapter" / "adapter_config.json").is_file()
    assert (export / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    trained = load_file(export / "adapter_raw" / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in trained.items())  # B left its zero init
    single = consolidate_to_editor(full / "checkpoints" / "last.ckpt", tmp_path / "single")
    files = sorted(p.relative_to(export) for p in export.rglob("*") if p.suffix in (".safetensors", ".json"))
    theirs = sorted(p.relative_to(single) for p in single.rglob("*") if p.suffix in (".safetensors", ".json"))
    assert files == theirs
    for rel in files:
        if rel.suffix == ".json":
            assert (export / rel).read_text() == (single / rel).read_text(), rel
            continue
        a, b = load_file(export / rel), load_file(single / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def _plan(strategy: str, manifest: Path, init: Path, root: Path) -> list[dict]:
    plan = []
    for stage in ("sft", "dpo", "nft"):
        out = root / f"{stage}_lora"
        extra = (f"export_dir={out / 'export'}",) if stage != "dpo" else ("export_dir=null",)
        overrides = _overrides(stage, strategy, manifest, init, True, *extra)
        plan.append(
            {"out": str(out), "overrides": overrides, "dump_step0": True, "dump_batches": stage != "sft"}
        )
        resume = (f"ckpt_path={_ckpt(out, RESUME_AT[stage])}", "export_dir=null")
        plan.append(
            {
                "out": str(root / f"{stage}_lora_resumed"),
                "overrides": _overrides(stage, strategy, manifest, init, True, *resume),
            }
        )
    if strategy == "ddp":  # full fine-tuning under fsdp2: tests/test_strategies_multiprocess.py
        for stage in ("dpo", "nft"):
            overrides = _overrides(stage, strategy, manifest, init, False, "export_dir=null")
            out = root / f"{stage}_full"
            plan.append({"out": str(out), "overrides": overrides, "dump_step0": True, "dump_batches": True})
    return plan


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_adapter_stages_under_two_processes(strategy, tiny_corpus, tmp_path) -> None:
    from test_strategies_multiprocess import _perturbed_init

    init = _perturbed_init(tmp_path / "init.ckpt")
    root = tmp_path / strategy
    root.mkdir()
    proc = _launch(_plan(strategy, tiny_corpus, init, root), root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _check_sft(tiny_corpus, init, root, strategy, tmp_path)
    _check_rl_run("dpo", tiny_corpus, init, root, "lora", adapter=True)
    _check_rl_run("nft", tiny_corpus, init, root, "lora", adapter=True)
    if strategy == "ddp":
        _check_rl_run("dpo", tiny_corpus, init, root, "full", adapter=False)
        _check_rl_run("nft", tiny_corpus, init, root, "full", adapter=False)


def test_adapter_state_of_a_full_state_leaves_the_nft_old_adapter_out(tmp_path) -> None:
    """An NFT adapter run's export reads the adapter from a full state (the EMA's, or FSDP2's gathered one) that
    also holds the ``nft_old`` adapter: only the trained adapter's tensors are the adapter (it failed before)."""
    from rededit.stages.checkpoints import backbone_from_state

    stage, cfg = untrained_tiny_stage(tmp_path, LIVE, "stage=nft", "adapter=lora", "adapter.rank=4")
    full = dict(stage.backbone.state_dict())
    assert any(OLD in k for k in full)
    want = adapters.adapter_state_dict(stage.backbone)
    # the live backbone (one device), and the one FSDP2's export rebuilds from the gathered state (no nft_old)
    rebuilt = backbone_from_state(cfg, full)
    assert not any(OLD in k for k in rebuilt.state_dict())
    for backbone in (stage.backbone, rebuilt):
        got = adapters.adapter_state_dict(backbone, state=full)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
