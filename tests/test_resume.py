"""Exact resume on CPU (issue 3 acceptance): N + k steps in one go == N steps, stop, resume k steps.

Run A trains ``N + k`` steps and checkpoints every step; run B trains ``N`` steps and stops; run C resumes
B's ``last.ckpt`` through ``ckpt_path`` for ``k`` more. C's per-step losses must equal A's last ``k``
bit for bit, and so must the final raw weights, the EMA shadow and its counters, the AdamW moments, the
bucket sampler's cursor (through ``StatefulDataLoader``) and the timestep curriculum's state. A second
resume starts from one of A's *mid-run* checkpoints (a preempted job), which Lightning writes while its
data fetcher has already looked one batch ahead. One setting stays inside an epoch, the other crosses
epoch boundaries (2-3 step epochs; both checkpoints are written on an epoch's last batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose, read_step_metric, train_overrides
from rededit.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOTAL = 6  # N + k

# demo_pretrain brings EMA, the NaN guard and the progressive curriculum; the curriculum anneals within the
# run so every resumed step sees a different bias. Two transformer layers keep the steps cheap.
COMMON = (
    "experiment=demo_pretrain",
    "timestep.curriculum.anneal_steps=5",
    "backbone.transformer_config.num_layers=2",
    "data.val_split=null",
)
# Two data settings: a long epoch (train split, budget 256: > TOTAL steps) and a 2-3 step one (the 8-row
# bench split as training data, budget 384).
SETTINGS = {
    "mid_epoch": ("data.split=train", 256),
    "epoch_boundary": ("data.split=bench", 384),
}


def _steps_per_epoch(manifest: Path, out: Path, budget: int, split: str) -> int:
    from hydra.utils import instantiate

    cfg = compose(train_overrides(manifest, *COMMON, split, budget=budget), out)
    datamodule = instantiate(cfg.data, text_encoder=None)
    datamodule.setup("fit")
    return len(datamodule.train_sampler)


def _train(manifest: Path, out: Path, steps: int, budget: int, *extra: str) -> Path:
    run(compose(train_overrides(manifest, *COMMON, *extra, steps=steps, budget=budget), out))
    return out


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _sampler_state(ckpt: dict) -> dict:
    return ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_index_sampler_state"]


def _assert_same_state(a: dict, c: dict) -> None:
    assert a["global_step"] == c["global_step"] == TOTAL
    sa, sc = a["state_dict"], c["state_dict"]
    assert sa.keys() == sc.keys()
    assert [k for k in sa if not torch.equal(sa[k], sc[k])] == [], "raw weights differ after resume"
    ea, ec = a["callbacks"]["EMA"], c["callbacks"]["EMA"]
    assert (ea["num_updates"], ea["last_step"]) == (ec["num_updates"], ec["last_step"]) == (TOTAL, TOTAL)
    assert [k for k in ea["shadow"] if not torch.equal(ea["shadow"][k], ec["shadow"][k])] == []
    oa, oc = a["optimizer_states"][0]["state"], c["optimizer_states"][0]["state"]
    assert oa.keys() == oc.keys()
    for i in oa:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(oa[i][name], oc[i][name]), f"AdamW {name} of param {i} differs"
    assert _sampler_state(a) == _sampler_state(c)
    assert a["timestep_curriculum"] == c["timestep_curriculum"]
    assert a["timestep_curriculum"]["step"] == TOTAL - 1  # the step of the last draw (before its update)


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def reference_run(request, tiny_corpus, tmp_path_factory):
    """(setting, run A's folder, steps per epoch): ``TOTAL`` uninterrupted steps, a checkpoint after each."""
    split, budget = SETTINGS[request.param]
    out = tmp_path_factory.mktemp(f"A_{request.param}")
    per_epoch = _steps_per_epoch(tiny_corpus, out, budget, split)
    if request.param == "mid_epoch":
        assert per_epoch > TOTAL
    else:
        assert 2 <= per_epoch <= 3  # A crosses at least one epoch boundary
    # Checkpoints cost more than steps here: A writes one mid-run (for the preemption test) and its last.
    every = f"callbacks.model_checkpoint.every_n_train_steps={per_epoch}"
    return request.param, _train(tiny_corpus, out, TOTAL, budget, split, every), per_epoch


def test_stop_and_resume_matches_uninterrupted_run(reference_run, tiny_corpus, tmp_path) -> None:
    setting, run_a, per_epoch = reference_run
    split, budget = SETTINGS[setting]
    # mid_epoch: stop inside the epoch; epoch_boundary: stop on an epoch's last batch, resume across.
    n = 3 if setting == "mid_epoch" else per_epoch
    run_b = _train(tiny_corpus, tmp_path / "B", n, budget, split)
    b_state = _sampler_state(_ckpt(run_b / "checkpoints" / "last.ckpt"))
    assert (b_state["epoch"], b_state["cursor"]) == (0, n)
    run_c = _train(
        tiny_corpus, tmp_path / "C", TOTAL, budget, split, f"ckpt_path={run_b}/checkpoints/last.ckpt"
    )
    losses_a, losses_c = read_step_metric(run_a), read_step_metric(run_c)
    assert sorted(losses_a) == list(range(1, TOTAL + 1))
    assert losses_c == {s: losses_a[s] for s in range(n + 1, TOTAL + 1)}
    assert len(set(losses_a.values())) == TOTAL  # distinct per-step losses: the comparison has teeth
    _assert_same_state(_ckpt(run_a / "checkpoints" / "last.ckpt"), _ckpt(run_c / "checkpoints" / "last.ckpt"))
    c_state = _sampler_state(_ckpt(run_c / "checkpoints" / "last.ckpt"))
    # The cursor counts batches yielded in the current epoch; it rolls over when the next epoch starts.
    last_epoch = (TOTAL - 1) // per_epoch
    assert (c_state["epoch"], c_state["cursor"]) == (last_epoch, TOTAL - last_epoch * per_epoch)


@pytest.mark.parametrize("reference_run", ["epoch_boundary"], indirect=True)
def test_resume_from_a_mid_run_checkpoint(reference_run, tiny_corpus, tmp_path) -> None:
    """A preempted job: resume from the checkpoint A wrote mid-run on an epoch's last batch (Lightning has
    already fetched ahead when it writes it); it must resume at the next epoch's first batch, neither
    replaying nor skipping one."""
    setting, run_a, per_epoch = reference_run
    split, budget = SETTINGS[setting]
    n = per_epoch
    ckpt = run_a / "checkpoints" / f"step{n:07d}.ckpt"
    mid = _ckpt(ckpt)
    state = _sampler_state(mid)
    assert mid["global_step"] == n and state["epoch"] * per_epoch + state["cursor"] == n
    run_c = _train(tiny_corpus, tmp_path / "C", TOTAL, budget, split, f"ckpt_path={ckpt}")
    losses_a = read_step_metric(run_a)
    assert read_step_metric(run_c) == {s: losses_a[s] for s in range(n + 1, TOTAL + 1)}
    _assert_same_state(_ckpt(run_a / "checkpoints" / "last.ckpt"), _ckpt(run_c / "checkpoints" / "last.ckpt"))
