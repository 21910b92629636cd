"""Resume on a different world size at the sampler level (issue 7): 2 ranks → 1 rank (and 2 → 4 → 1)
mid-epoch continues the epoch without losing or repeating a sample, and the re-planned remainder is
itself resumable from a later checkpoint."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from rededit.data.buckets import ResolutionSet, assign_buckets, load_bucket_config
from rededit.data.sampler import MultiConditionBucketSampler
from test_sampler import BUDGET, make_sizes


@pytest.fixture(scope="module")
def assignment():
    return assign_buckets(make_sizes(n=1200), ResolutionSet.from_config(load_bucket_config("tiny")))


def _samplers(assignment, world: int, **kw) -> list[MultiConditionBucketSampler]:
    return [
        MultiConditionBucketSampler(assignment, token_budget=BUDGET, world_size=world, rank=r, seed=3, **kw)
        for r in range(world)
    ]


def _take(samplers: list[MultiConditionBucketSampler], steps: int | None) -> list[int]:
    """Run every rank ``steps`` global steps (None: to the epoch's end); rows served, all ranks."""
    served: list[int] = []
    iters = [iter(s) for s in samplers]
    epoch = samplers[0].epoch
    step = 0
    while steps is None or step < steps:
        try:
            batches = [next(it) for it in iters]
        except StopIteration:
            break
        assert len({len(b) for b in batches}) == 1  # ranks: same batch size (same bucket)
        for b in batches:
            served += b
        step += 1
        if samplers[0].epoch != epoch:
            break
    return served


def _epoch_draws(assignment, **kw) -> Counter:
    """What a single uninterrupted run on 1 rank could serve at most this epoch (rows drawn)."""
    s = _samplers(assignment, 1, **kw)[0]
    return Counter(s._epoch_rows(0).tolist())


@pytest.mark.parametrize("kw", [{}, {"task_weights": {"t2i": 2.0, "*": 1.0}}], ids=["plain", "task_weights"])
def test_two_ranks_to_one_rank_mid_epoch_loses_and_repeats_nothing(assignment, kw) -> None:
    two = _samplers(assignment, 2, **kw)
    first = _take(two, 7)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["world_size"] == 2 and state["cursor"] == 7

    one = _samplers(assignment, 1, **kw)[0]
    one.load_state_dict(state)
    assert one.epoch == 0 and one.cursor == 0  # the rest of epoch 0, re-planned for one rank
    rest = _take([one], None)
    served = Counter(first) + Counter(rest)
    drawn = _epoch_draws(assignment, **kw)
    assert all(served[r] <= drawn[r] for r in served)  # nothing served more often than drawn: no repeats
    assert not set(first) & set(rest) or kw  # plain epochs draw each row once
    # Nothing lost beyond the remainder's own leftovers that fill no batch (the sampler's usual drop rule).
    assert sum(drawn.values()) - sum(served.values()) == one.schedule(0).num_dropped
    assert one.epoch == 1  # then the next epoch starts normally, for one rank
    nxt = _samplers(assignment, 1, **kw)[0]
    nxt.set_epoch(1)
    assert one.schedule(1).samples.tolist() == nxt.schedule(1).samples.tolist()


def test_remainder_is_resumable_and_chains_across_world_sizes(assignment) -> None:
    two = _samplers(assignment, 2)
    first = _take(two, 5)
    four = _samplers(assignment, 4)
    for s in four:
        s.load_state_dict(two[0].state_dict())
    second = _take(four, 3)
    state = four[0].state_dict()
    assert state["history"] == [[2, 5]] and state["cursor"] == 3 and state["world_size"] == 4
    one = _samplers(assignment, 1)[0]
    one.load_state_dict(state)
    assert one.state_dict()["history"] == [[2, 5], [4, 3]]
    rest = _take([one], None)
    served = first + second + rest
    assert len(served) == len(set(served))  # no repeats across three world sizes
    assert len(set(served)) >= len(assignment) - 3 * 4 * 64  # at most a few leftover batches dropped

    # A state saved on the same world size inside the remainder resumes exactly (same next batches).
    again = _samplers(assignment, 2)
    for s in again:
        s.load_state_dict(two[0].state_dict())  # → world 2, cursor 5: same world, no re-planning
    assert again[0].cursor == 5 and "history" not in again[0].state_dict()


def test_same_world_size_resume_is_unchanged(assignment) -> None:
    a = _samplers(assignment, 2)
    _take(a, 4)
    b = _samplers(assignment, 2)
    for s in b:
        s.load_state_dict(a[0].state_dict())
    assert _take(b, 3) == _take(a, 3)
    assert np.array_equal(b[0].schedule(0).samples, a[0].schedule(0).samples)
