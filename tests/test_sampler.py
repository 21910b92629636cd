"""MultiConditionBucketSampler: shape homogeneity, exact coverage, token budget, resume traps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rededit.data.buckets import ResolutionSet, assign_buckets, load_bucket_config
from rededit.data.manifest import ManifestSizes
from rededit.data.sampler import MultiConditionBucketSampler
from rededit.utils.seeding import numpy_rng

TASKS = (("t2i", 0), ("edit", 1), ("pair", 2), ("triple", 3))
RATIOS = np.array([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5])
BUDGET = 400  # tiny set: ~64² px images of ~64 tokens, a 3-ref sample ≤ 4·72 tokens


def make_sizes(n: int = 3000, seed: int = 0, clusters: int = 8) -> ManifestSizes:
    rng = numpy_rng("test_sampler", seed, n)
    task = rng.choice(len(TASKS), size=n, p=[0.4, 0.4, 0.12, 0.08]).astype(np.int32)
    n_refs = np.array([t[1] for t in TASKS])[task]

    def draw(k: int) -> np.ndarray:
        r = RATIOS[rng.integers(0, RATIOS.size, k)] * np.exp(rng.normal(0, 0.03, k))
        a = rng.uniform(70**2, 150**2, k)
        return np.stack([np.round(np.sqrt(a / r)), np.round(np.sqrt(a * r))], 1).astype(np.int32)

    offsets = np.concatenate([[0], np.cumsum(n_refs)]).astype(np.int64)
    p = np.arange(1, clusters + 1, dtype=np.float64) ** -1.5
    return ManifestSizes(
        target_hw=draw(n),
        ref_offsets=offsets,
        ref_hw=draw(int(offsets[-1])),
        task_codes=task,
        task_names=tuple(t[0] for t in TASKS),
        cluster=rng.choice(clusters, size=n, p=p / p.sum()).astype(np.int64),
    )


@pytest.fixture(scope="module")
def assignment():
    return assign_buckets(make_sizes(), ResolutionSet.from_config(load_bucket_config("tiny")))


def samplers(assignment, world=2, **kw):
    return [
        MultiConditionBucketSampler(assignment, token_budget=BUDGET, world_size=world, rank=r, **kw)
        for r in range(world)
    ]


def test_batches_are_shape_homogeneous_and_ranks_share_the_bucket(assignment):
    s0, s1 = samplers(assignment)
    sched = s0.schedule(0)
    assert len(sched) == len(s1) > 0
    merged = dict(zip(sched.merged_rows.tolist(), sched.merged_to.tolist()))
    assert len(merged) == sched.num_merged > 0  # the tiny set has small buckets to merge
    for step, (b0, b1) in enumerate(zip(s0, s1)):
        bucket = int(sched.step_bucket[step])
        assert len(b0) == len(b1) == sched.step_batch_size[step] >= 1
        shapes = []
        for row in b0 + b1:
            served = merged.get(row, int(assignment.bucket_of_row[row]))
            assert served == bucket
            shapes.append(s0.served_resolution(row, epoch=0))
            # A merged row stays compatible: same task group and number of references.
            own = int(assignment.bucket_of_row[row])
            assert assignment.bucket_group[own] == assignment.bucket_group[bucket]
            assert assignment.bucket_num_refs[own] == assignment.bucket_num_refs[bucket]
        assert all(s == shapes[0] for s in shapes)  # one target and one shape per reference position
        if bucket not in set(sched.merged_to.tolist()):
            assert len({tuple(assignment.target_res[r]) for r in b0 + b1}) == 1


def test_every_kept_sample_once_and_budget(assignment):
    s0, s1 = samplers(assignment)
    seen = [row for a, b in zip(s0, s1) for row in a + b]
    sched = s0.schedule(0)
    assert len(seen) == len(set(seen)) == sched.num_scheduled
    assert set(seen).isdisjoint(sched.dropped_rows.tolist())
    assert len(seen) + sched.num_dropped == len(assignment)
    rank_tokens = sched.step_batch_size * assignment.bucket_tokens[sched.step_bucket]
    assert rank_tokens.max() <= BUDGET
    # Batch size is floor(C / L) of the served bucket: every global batch is full.
    np.testing.assert_array_equal(
        sched.step_batch_size, np.maximum(1, BUDGET // assignment.bucket_tokens[sched.step_bucket])
    )
    st = s0.stats()
    assert st["padding_waste"] == 0.0 and st["rank_imbalance"] == 1.0
    assert st["merged"] == sched.num_merged and st["dropped"] == sched.num_dropped
    assert st["tokens_per_rank_step"]["max"] <= BUDGET


def test_drop_policy_keeps_only_own_buckets(assignment):
    (s,) = samplers(assignment, world=1, small_bucket_policy="drop")
    sched = s.schedule(0)
    assert sched.num_merged == 0
    np.testing.assert_array_equal(assignment.bucket_of_row[sched.samples], sched.served_bucket())
    assert sched.num_scheduled + sched.num_dropped == len(assignment)
    merged = samplers(assignment, world=1)[0].schedule(0)
    assert merged.num_dropped < sched.num_dropped


def test_resume_mid_epoch_reproduces_rest(assignment):
    s0, s1 = samplers(assignment, seed=3)
    full0, full1 = list(s0), list(s1)
    a0, a1 = samplers(assignment, seed=3)
    it0, it1 = iter(a0), iter(a1)
    for _ in range(7):
        next(it0), next(it1)
    state = a0.state_dict()
    assert (
        state == a1.state_dict() == {"seed": 3, "epoch": 0, "cursor": 7, "world_size": 2}
    )  # rank-agnostic (trap 1)
    r0, r1 = samplers(assignment, seed=3)
    r0.load_state_dict(state)
    r1.load_state_dict(state)  # rank 1 loads rank 0's state
    assert list(r0) == full0[7:] and list(r1) == full1[7:]


def test_end_of_epoch_state_rolls_over(assignment):
    (s,) = samplers(assignment, world=1)
    n = len(s)
    state = None
    for i, _ in enumerate(s):
        if i == n - 1:
            state = s.state_dict()  # saved on the epoch's last batch (trap 3)
    assert state == {"seed": 0, "epoch": 0, "cursor": n, "world_size": 1}
    (fresh,) = samplers(assignment, world=1)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == {"seed": 0, "epoch": 1, "cursor": 0, "world_size": 1}
    epoch1 = list(fresh)
    assert len(epoch1) == len(fresh.schedule(1)) > 0
    assert epoch1 == [fresh.batch_for(k, epoch=1) for k in range(len(epoch1))]


def test_epochs_advance_without_set_epoch_and_differ(assignment):
    (s,) = samplers(assignment, world=1)
    e0 = list(s)
    assert s.epoch == 1 and s.cursor == 0  # auto-advance (trap 2)
    e1 = list(s)
    assert e0 != e1
    s.set_epoch(2)  # set_epoch with the current epoch is a no-op, another epoch jumps there
    it = iter(s)
    next(it)
    s.set_epoch(2)
    assert s.cursor == 1
    s.set_epoch(0)
    assert s.cursor == 0 and list(s) == e0


def test_schedule_is_pure_function_of_seed_epoch_world(assignment):
    a = samplers(assignment, world=2, seed=5)[1].schedule(4)
    b = samplers(assignment, world=2, seed=5)[0].schedule(4)
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.step_bucket, b.step_bucket)
    c = samplers(assignment, world=2, seed=6)[0].schedule(4)
    assert not np.array_equal(a.samples, c.samples)
    d = samplers(assignment, world=4, seed=5)[0].schedule(4)
    assert d.world_size == 4 and not np.array_equal(a.step_bucket, d.step_bucket)


def test_oversized_sample_raises(assignment):
    with pytest.raises(ValueError, match=r"exceed token_budget C=100.*Raise token_budget to at least"):
        MultiConditionBucketSampler(assignment, token_budget=100)


def test_task_weights_change_frequencies(assignment):
    (s,) = samplers(assignment, world=1, task_weights={"t2i": 4.0, "edit": 2.0, "pair": 1.0, "triple": 1.0})
    sched = s.schedule(0)
    drawn = np.concatenate([sched.samples, sched.dropped_rows])
    share = np.bincount(assignment.task_codes[drawn], minlength=4) / drawn.size
    np.testing.assert_allclose(share, [0.5, 0.25, 0.125, 0.125], atol=0.03)
    assert abs(drawn.size - len(assignment)) < 0.05 * len(assignment)
    # Up-weighted t2i rows repeat, down-weighted edit rows are subsampled.
    counts = np.bincount(drawn, minlength=len(assignment))
    assert counts[assignment.task_codes == 0].max() >= 2
    assert (counts[assignment.task_codes == 1] == 0).any()
    with pytest.raises(ValueError, match="no weight for task"):
        MultiConditionBucketSampler(assignment, token_budget=BUDGET, task_weights={"t2i": 1.0})
    other = MultiConditionBucketSampler(assignment, token_budget=BUDGET, task_weights={"t2i": 4.0, "*": 1.0})
    assert not np.array_equal(other.schedule(1).samples, other.schedule(0).samples)


def test_cluster_balance_equalises_clusters(assignment):
    natural = np.bincount(assignment.cluster)
    assert natural.max() > 4 * natural.min()  # Zipf-like clusters
    (s,) = samplers(assignment, world=1, cluster_balance=True)
    sched = s.schedule(0)
    drawn = np.concatenate([sched.samples, sched.dropped_rows])
    per_cluster = np.bincount(assignment.cluster[drawn])
    expected = len(assignment) / natural.size
    np.testing.assert_allclose(per_cluster, expected, rtol=0.15)


def test_yield_buckets_mode(assignment):
    (s,) = samplers(assignment, world=1, yield_buckets=True)
    sched = s.schedule(0)
    for step, batch in enumerate(s):
        assert {b for _, b in batch} == {int(sched.step_bucket[step])}
        if step > 5:
            break


class _IndexDataset:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _collate(batch):
    return list(batch)


@pytest.mark.parametrize("workers", [0, 1])
def test_stateful_dataloader_resume(assignment, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader(rank):
        sampler = MultiConditionBucketSampler(
            assignment, token_budget=BUDGET, world_size=2, rank=rank, seed=1
        )
        return sampler, StatefulDataLoader(
            _IndexDataset(len(assignment)), batch_sampler=sampler, collate_fn=_collate, num_workers=workers
        )

    sampler, dl = loader(0)
    assert len(dl) == len(sampler)  # a __len__ keeps Lightning from prefetching ahead (trap 4)
    expected = list(dl)
    _, dl = loader(0)
    it = iter(dl)
    for _ in range(5):
        next(it)
    state = dl.state_dict()
    for rank, rest in ((0, expected[5:]), (1, None)):
        fresh_sampler, fresh = loader(rank)
        fresh.load_state_dict(state)  # rank 0's state everywhere (trap 1)
        got = list(fresh)
        if rest is None:
            rest = [
                fresh_sampler.batch_for(k, rank=1, epoch=0) for k in range(5, len(fresh_sampler.schedule(0)))
            ]
        assert got == rest


def test_benchmark_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "bucket_sampler" / "run.py"
    spec = importlib.util.spec_from_file_location("bucket_sampler_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--rows", "20000", "--world-size", "8", "--json", str(tmp_path / "r.json")])
    assert out["sampler"]["padding_waste"] == 0.0 and out["sampler"]["rank_imbalance"] == 1.0
    assert out["naive"]["padding_waste"] > 0.05 and out["naive"]["rank_imbalance_real"] > 1.05
    assert out["sampler"]["scheduled"] + out["sampler"]["dropped"] == 20000
    assert (tmp_path / "r.json").exists()
