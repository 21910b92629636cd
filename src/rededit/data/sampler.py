"""Multi-Condition Aware Bucket Sampler (report §3.2; task and cluster balancing of §3.4/§3.5).

Each bucket ``B_{r,n}`` of :mod:`rededit.data.buckets` holds samples whose target and ``n``
references share one resolution per image position. A sample costs
``L = sum_{i=0..n} ceil(H_i W_i / p²)`` visual tokens (§3.2); a bucket's per-rank batch size is
``b = floor(C / L)`` so that ``b · L <= C`` for the token capacity ``C`` of a device.

The epoch schedule is global and a pure function of ``(seed, epoch, world_size)`` plus the config:

1. draw the epoch's rows (every row once; or re-sampled by task weights / cluster balance),
2. shuffle inside each bucket (one permutation + a stable sort by bucket, no per-sample Python),
3. chop each bucket into *global* batches of ``world_size · b`` samples. Leftovers that cannot fill
   one are, with ``"merge"``, pooled per compatibility class (same task group and reference count)
   in an order that puts the nearest buckets next to each other (aspect ratio of every image
   position first — a ratio change costs crop — then areas — an area change only resizes), and cut
   into full global batches, each served at the resolution of its first sample's bucket; what still
   fills no batch is dropped. With ``"drop"`` all leftovers are dropped. No batch is ever padded,
4. interleave all global batches in a seeded random order. Step ``s`` is one bucket for every rank;
   rank ``r`` takes the ``r``-th contiguous ``b`` samples of the global batch.

Every rank computes the same schedule, so ranks never exchange indices; the state
``{"seed", "epoch", "cursor"}`` (cursor = global steps already yielded this epoch) is the same on
every rank, and rank 0's copy in a checkpoint restores all of them (docs/architecture.md distributed trap 1).

Epoch handling: the sampler carries its epoch (trap 2). After yielding a whole epoch it advances
to the next epoch by itself, so a trainer that never calls :meth:`set_epoch` still sees a new order
each epoch. :meth:`set_epoch` with a *different* epoch jumps there (cursor 0); with the epoch the
sampler already has it keeps the cursor — so a ``set_epoch(trainer.current_epoch)`` in
``on_train_epoch_start`` is harmless after auto-advance and after a mid-epoch resume.
A state saved on the last batch of an epoch loads as the start of the next epoch (trap 3), and
``__len__`` is the epoch's step count, equal on every rank (trap 4).

Resuming on a different world size: the schedule depends on ``W`` (global batches hold ``W · b``
samples), so a cursor from another ``W`` does not name the same samples. The state records
``world_size``; loading a mid-epoch state written with ``W_old != W`` rebuilds the rows already served
(the first ``cursor`` global batches of the ``W_old`` schedule) and schedules the *rest* of that epoch for
``W`` (cursor 0 of a shorter epoch): no sample is lost or repeated. That remainder is recorded in the
state (``history``: ``[[W_old, cursor], ...]``) so a later checkpoint in the same epoch resumes it exactly.
What changes: the remaining samples are re-batched (different batch companions and step numbers), and
noise/σ streams are drawn per rank, so losses differ from the uninterrupted run; which samples are seen
in the epoch does not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rededit.data.buckets import BucketAssignment
from rededit.utils.logging import get_logger
from rededit.utils.seeding import numpy_rng

log = get_logger(__name__)

SmallBucketPolicy = Literal["merge", "drop"]


@dataclass(frozen=True)
class EpochSchedule:
    """The global plan of one epoch (all ranks).

    Attributes:
        epoch: epoch number.
        world_size: number of ranks ``W``.
        step_bucket: ``[S]`` int64 bucket served at each step (every rank).
        step_batch_size: ``[S]`` int64 per-rank batch size ``b`` of each step.
        step_offsets: ``[S + 1]`` int64; the global batch of step ``s`` is
            ``samples[step_offsets[s]:step_offsets[s+1]].reshape(W, b)`` (ragged ``[S, W, b]``).
        samples: ``[T]`` int64 manifest rows in step order.
        merged_rows / merged_to: rows served at a bucket other than their own, and that bucket.
        dropped_rows: rows drawn this epoch but left out (leftovers that filled no global batch).
        num_drawn: rows drawn this epoch (with multiplicity), ``= T + len(dropped_rows)``.
    """

    epoch: int
    world_size: int
    step_bucket: np.ndarray
    step_batch_size: np.ndarray
    step_offsets: np.ndarray
    samples: np.ndarray
    merged_rows: np.ndarray
    merged_to: np.ndarray
    dropped_rows: np.ndarray
    num_drawn: int

    def __len__(self) -> int:
        return int(self.step_bucket.shape[0])

    @property
    def num_scheduled(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_merged(self) -> int:
        return int(self.merged_rows.shape[0])

    @property
    def num_dropped(self) -> int:
        return int(self.dropped_rows.shape[0])

    def global_batch(self, step: int) -> np.ndarray:
        """``[W, b]`` rows of ``step``; row ``r`` goes to rank ``r``."""
        lo, hi = self.step_offsets[step], self.step_offsets[step + 1]
        return self.samples[lo:hi].reshape(self.world_size, int(self.step_batch_size[step]))

    def batch(self, step: int, rank: int) -> np.ndarray:
        """``[b]`` rows served to ``rank`` at ``step``."""
        b = int(self.step_batch_size[step])
        lo = int(self.step_offsets[step]) + rank * b
        return self.samples[lo : lo + b]

    def served_bucket(self) -> np.ndarray:
        """``[T]`` bucket each entry of :attr:`samples` is served at."""
        return np.repeat(self.step_bucket, np.diff(self.step_offsets))


def bucket_batch_sizes(
    assignment: BucketAssignment, token_budget: int, max_batch_size: int | None = None
) -> np.ndarray:
    """Per-bucket batch size ``b = floor(C / L)`` (at least 1, at most ``max_batch_size``), int64 ``[B]``.

    Raises:
        ValueError: a non-empty bucket needs more than ``C`` tokens for one sample (the five worst named).
    """
    tokens = assignment.bucket_tokens
    over = np.nonzero((tokens > token_budget) & (assignment.bucket_counts > 0))[0]
    if over.size:
        counts = assignment.bucket_counts
        worst = over[np.argsort(-tokens[over])][:5]
        detail = "; ".join(
            f"{int(counts[b])} sample(s) in bucket {assignment.key_str(b)} need {int(tokens[b])} tokens"
            for b in worst
        )
        raise ValueError(
            f"{int(counts[over].sum())} sample(s) in {over.size} bucket(s) exceed token_budget "
            f"C={token_budget}: {detail}. Raise token_budget to at least {int(tokens[over].max())} "
            "or use a bucket set with smaller resolutions."
        )
    bs = np.maximum(1, token_budget // np.maximum(tokens, 1))
    if max_batch_size is not None:
        bs = np.minimum(bs, int(max_batch_size))
    return bs.astype(np.int64)


class MultiConditionBucketSampler:
    """Rank-aware batch sampler over bucketed manifest rows (use as ``batch_sampler=``).

    Iterating yields this rank's batches of manifest row indices (Python lists), one per global step,
    from the current cursor to the end of the epoch. Use with ``Trainer(use_distributed_sampler=False)``.

    Args:
        assignment: rows' buckets (:func:`rededit.data.buckets.assign_buckets`).
        token_budget: token capacity ``C`` per device and step; per-bucket ``b = floor(C / L)``.
        world_size: number of data-parallel ranks ``W``.
        rank: this rank.
        seed: base seed; all randomness is ``numpy_rng(seed, epoch, ...)``.
        shuffle: shuffle inside buckets and the order of global batches.
        small_bucket_policy: ``"merge"`` leftovers into nearby compatible buckets (served at that
            bucket's resolution; see the module docstring), or ``"drop"`` them.
        task_weights: per-task share of the epoch (relative weights; the epoch keeps ``N`` draws in
            expectation). ``"*"`` sets the weight of unlisted tasks. Rows of task ``t`` are drawn
            ``m_t = N w_t / (n_t Σw)`` times in expectation: ``floor(m)`` copies plus one more with
            probability ``frac(m)`` — up-weighting repeats rows, down-weighting subsamples them.
        cluster_balance: equal expected draws per semantic cluster (within each task when
            ``task_weights`` is set), from the manifest's ``cluster`` column.
        max_batch_size: optional cap on ``b``.
        yield_buckets: yield ``(row, bucket)`` pairs instead of rows, so a dataset in a worker knows the
            resolution a merged sample is served at (``assignment.bucket_shapes(bucket)``).
    """

    def __init__(
        self,
        assignment: BucketAssignment,
        *,
        token_budget: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        small_bucket_policy: SmallBucketPolicy = "merge",
        task_weights: Mapping[str, float] | None = None,
        cluster_balance: bool = False,
        max_batch_size: int | None = None,
        yield_buckets: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, W={world_size}"
            )
        if token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {token_budget}")
        if small_bucket_policy not in ("merge", "drop"):
            raise ValueError(f"small_bucket_policy must be 'merge' or 'drop', got {small_bucket_policy!r}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.assignment = assignment
        self.token_budget = int(token_budget)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.small_bucket_policy = small_bucket_policy
        self.cluster_balance = bool(cluster_balance)
        self.max_batch_size = max_batch_size
        self.yield_buckets = bool(yield_buckets)

        self.bucket_batch_size = bucket_batch_sizes(
            assignment, self.token_budget, max_batch_size
        )  # [B] per-rank b

        self._task_weight = self._resolve_task_weights(task_weights)
        self.task_weights = None if task_weights is None else dict(task_weights)
        if self.cluster_balance:
            if assignment.cluster is None:
                raise ValueError("cluster_balance=True needs a 'cluster' column in the manifest")
            _, self._cluster_code = np.unique(assignment.cluster, return_inverse=True)
            self._cluster_code = self._cluster_code.reshape(-1)

        # Merge order: buckets sorted by compatibility class (task group, #refs), then the aspect-ratio
        # class of every image position (a ratio change costs crop), then every position's area (an area
        # change only resizes). Neighbours in this order are the nearest compatible buckets.
        resset = assignment.resset
        idx = assignment.bucket_res_idx  # [B, P]
        live = idx >= 0
        ratio_cls = np.where(live, resset.ratio_class[np.maximum(idx, 0)], -1)
        area = np.where(live, resset.area[np.maximum(idx, 0)], 0)
        self._compat = assignment.bucket_group * (idx.shape[1] + 1) + assignment.bucket_num_refs
        cols = [np.arange(idx.shape[0])]  # np.lexsort: last key is the most significant
        cols += [area[:, j] for j in reversed(range(idx.shape[1]))]
        cols += [ratio_cls[:, j] for j in reversed(range(idx.shape[1]))]
        cols.append(self._compat)
        order = np.lexsort(cols) if idx.shape[0] else np.zeros(0, dtype=np.int64)
        self._merge_rank = np.empty(idx.shape[0], dtype=np.int64)
        self._merge_rank[order] = np.arange(idx.shape[0])

        self._epoch = 0
        self._cursor = 0
        self._cache: dict[int, EpochSchedule] = {}
        # Resume on another world size: (W_old, cursor) pairs already served in epoch `_resumed_epoch`.
        self._resumed_epoch: int | None = None
        self._history: tuple[tuple[int, int], ...] = ()

    # ------------------------------------------------------------------ epoch rows
    def _resolve_task_weights(self, task_weights: Mapping[str, float] | None) -> np.ndarray | None:
        if task_weights is None:
            return None
        names = self.assignment.task_names
        default = task_weights.get("*")
        missing = [t for t in names if t not in task_weights]
        if missing and default is None:
            raise ValueError(
                f"task_weights has no weight for task(s) {missing}; add them (0 excludes a task) or a '*' default"
            )
        unknown = sorted(set(task_weights) - set(names) - {"*"})
        if unknown:
            log.warning("task_weights names task(s) absent from the manifest: %s", unknown)
        w = np.asarray([float(task_weights.get(t, default)) for t in names], dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all():
            raise ValueError(f"task weights must be finite and >= 0, got {dict(zip(names, w.tolist()))}")
        present = np.bincount(self.assignment.task_codes, minlength=len(names)) > 0
        if w[present].sum() <= 0:
            raise ValueError("task_weights give every task present in the manifest weight 0")
        return w

    def expected_draws(self) -> np.ndarray:
        """``[N]`` expected number of times each row is drawn per epoch (1 without re-weighting)."""
        a = self.assignment
        n = len(a)
        if self._task_weight is None and not self.cluster_balance:
            return np.ones(n, dtype=np.float64)
        codes = np.asarray(a.task_codes, dtype=np.int64)
        if self._task_weight is not None:
            n_t = np.bincount(codes, minlength=len(a.task_names)).astype(np.float64)
            w = np.where(n_t > 0, self._task_weight, 0.0)
            scope_target = n * w / w.sum()  # expected draws per task
            scope = codes
        else:
            scope_target = np.asarray([float(n)])
            scope = np.zeros(n, dtype=np.int64)
        if not self.cluster_balance:
            n_scope = np.bincount(scope, minlength=scope_target.size).astype(np.float64)
            return (scope_target / np.maximum(n_scope, 1))[scope]
        n_clusters = int(self._cluster_code.max()) + 1 if n else 1
        cell = scope * n_clusters + self._cluster_code
        n_cell = np.bincount(cell, minlength=scope_target.size * n_clusters).astype(np.float64)
        # Each non-empty cluster of a scope gets an equal share of that scope's draws.
        k_scope = (n_cell.reshape(scope_target.size, n_clusters) > 0).sum(1)
        cell_target = np.repeat(scope_target / np.maximum(k_scope, 1), n_clusters)
        return (cell_target / np.maximum(n_cell, 1))[cell]

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        n = len(self.assignment)
        if self._task_weight is None and not self.cluster_balance:
            rows = np.arange(n, dtype=np.int64)
        else:
            m = self.expected_draws()
            base = np.floor(m)
            rng = numpy_rng(self.seed, epoch, "tasks")
            copies = base.astype(np.int64) + (rng.random(n) < (m - base))
            rows = np.repeat(np.arange(n, dtype=np.int64), copies)
        if epoch == self._resumed_epoch and self._history:
            # Multiset difference: a row drawn k times and served j times stays k - j times.
            left = np.bincount(rows, minlength=n) - np.bincount(self._served_before(epoch), minlength=n)
            rows = np.repeat(np.arange(n, dtype=np.int64), np.maximum(left, 0))
        return rows

    def _with_world(self, world_size: int, history: tuple[tuple[int, int], ...]) -> Any:
        """A view of this sampler with another world size and resume history (shares the arrays)."""
        other = copy.copy(self)
        other.world_size, other.rank, other._cache = int(world_size), 0, {}
        other._history = history
        return other

    def _served_before(self, epoch: int) -> np.ndarray:
        """Rows of ``epoch`` served before the world-size change(s) in ``_history``."""
        parts = []
        for i, (world, cursor) in enumerate(self._history):
            sched = self._with_world(world, self._history[:i])._build(epoch)
            parts.append(sched.samples[: sched.step_offsets[cursor]])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ schedule
    def _merge_leftovers(
        self, left: np.ndarray, left_bkt: np.ndarray, g: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pool leftovers per compatibility class and cut them into full global batches.

        Leftovers are ordered by the merge rank of their bucket (nearest compatible buckets adjacent,
        random order inside a bucket); walking each class's stream, a global batch starts at the next
        leftover and is served at *its* bucket's resolution with that bucket's ``g = W·b`` samples, so
        the token budget holds for every merged sample. A class's tail shorter than its next batch is
        dropped.

        Returns:
            (stream ``[L]`` rows in merge order, chunk start positions ``[K]``, chunk buckets ``[K]``,
            ``[L]`` bool mask of stream entries placed in a chunk).
        """
        order = np.argsort(self._merge_rank[left_bkt], kind="stable")
        stream, sbkt = left[order], left_bkt[order]
        cls = self._compat[sbkt]
        bounds = np.nonzero(np.diff(cls))[0] + 1
        run_lo = np.concatenate([[0], bounds]).tolist()
        run_hi = np.concatenate([bounds, [cls.size]]).tolist()
        sbkt_l = sbkt.tolist()
        g_l = g.tolist()
        chunk_pos: list[int] = []
        used = np.zeros(stream.size, dtype=bool)
        for lo, hi in zip(run_lo, run_hi):
            p = lo
            while p < hi:
                need = g_l[sbkt_l[p]]
                if p + need > hi:
                    break
                chunk_pos.append(p)
                p += need
            used[lo:p] = True
        pos = np.asarray(chunk_pos, dtype=np.int64)
        return stream, pos, sbkt[pos], used

    def schedule(self, epoch: int | None = None) -> EpochSchedule:
        """The global plan of ``epoch`` (default: the current one); cached per epoch."""
        epoch = self._epoch if epoch is None else int(epoch)
        cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        sched = self._build(epoch)
        if len(self._cache) >= 2:
            self._cache.pop(next(iter(self._cache)))
        self._cache[epoch] = sched
        return sched

    def _build(self, epoch: int) -> EpochSchedule:
        a = self.assignment
        n_b = a.num_buckets
        world = self.world_size
        rows = self._epoch_rows(epoch)
        num_drawn = int(rows.size)
        bkt = a.bucket_of_row[rows]
        if self.shuffle:
            perm = numpy_rng(self.seed, epoch, "shuffle").permutation(rows.size)
            rows, bkt = rows[perm], bkt[perm]
            del perm
        counts = np.bincount(bkt, minlength=n_b).astype(np.int64)
        # Stable sort by bucket keeps the random order inside each bucket; int16 keys get radix sort.
        key_dtype = np.int16 if n_b < 2**15 else np.int32 if n_b < 2**31 else np.int64
        order = np.argsort(bkt.astype(key_dtype), kind="stable")
        rows = rows[order]
        del order, bkt
        start = np.cumsum(counts) - counts
        g = world * self.bucket_batch_size  # [B] global batch size
        nb_full = counts // g
        full = nb_full * g

        # Full global batches straight from each bucket's shuffled segment of `rows`.
        gb_bucket = np.repeat(np.arange(n_b, dtype=np.int64), nb_full)
        within = np.arange(gb_bucket.size, dtype=np.int64) - np.repeat(np.cumsum(nb_full) - nb_full, nb_full)
        gb_start = start[gb_bucket] + within * g[gb_bucket]
        del within

        # Leftovers (each bucket's last counts % g rows, still in shuffled order).
        rem = counts - full
        n_rem = int(rem.sum())
        lpos = np.repeat(start + full - (np.cumsum(rem) - rem), rem) + np.arange(n_rem, dtype=np.int64)
        left = rows[lpos]
        left_bkt = np.repeat(np.arange(n_b, dtype=np.int64), rem)
        del lpos
        merged_rows = merged_to = np.zeros(0, dtype=np.int64)
        dropped_rows = left
        stream = np.zeros(0, dtype=np.int64)
        if self.small_bucket_policy == "merge" and n_rem:
            stream, chunk_pos, chunk_bkt, used = self._merge_leftovers(left, left_bkt, g)
            dropped_rows = stream[~used]
            if chunk_pos.size:
                served = np.repeat(chunk_bkt, g[chunk_bkt])
                covered = stream[used]
                moved = self.assignment.bucket_of_row[covered] != served
                merged_rows, merged_to = covered[moved], served[moved]
                gb_bucket = np.concatenate([gb_bucket, chunk_bkt])
                gb_start = np.concatenate([gb_start, rows.size + chunk_pos])
        source = np.concatenate([rows, stream]) if stream.size else rows
        del rows, left, left_bkt

        # Interleave all global batches in a seeded random order; gather samples in step order.
        n_gb = int(gb_bucket.size)
        if self.shuffle:
            gperm = numpy_rng(self.seed, epoch, world, "order").permutation(n_gb)
            gb_bucket, gb_start = gb_bucket[gperm], gb_start[gperm]
            del gperm
        sizes = g[gb_bucket]
        offsets = np.zeros(n_gb + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        gather = np.repeat(gb_start - offsets[:-1], sizes)
        gather += np.arange(gather.size, dtype=np.int64)
        samples = source[gather]
        del gather, source
        return EpochSchedule(
            epoch=epoch,
            world_size=world,
            step_bucket=gb_bucket,
            step_batch_size=self.bucket_batch_size[gb_bucket],
            step_offsets=offsets,
            samples=samples,
            merged_rows=merged_rows,
            merged_to=merged_to,
            dropped_rows=dropped_rows,
            num_drawn=num_drawn,
        )

    # ------------------------------------------------------------------ per-rank access
    def batch_for(self, step: int, rank: int | None = None, epoch: int | None = None) -> list[int]:
        """Rows served to ``rank`` (default: this rank) at global ``step`` of ``epoch``."""
        sched = self.schedule(epoch)
        return sched.batch(step, self.rank if rank is None else rank).tolist()

    def served_resolution(self, row: int, epoch: int | None = None) -> dict[str, Any]:
        """Shapes ``{"target": (h, w), "references": [...]}`` ``row`` is served at in ``epoch``.

        A merged row is served at its destination bucket's resolution. With task re-weighting a row
        can be drawn more than once; this returns its last merged placement (use ``yield_buckets``
        for per-occurrence shapes).
        """
        sched = self.schedule(epoch)
        hit = np.nonzero(sched.merged_rows == row)[0]
        b = int(sched.merged_to[hit[-1]]) if hit.size else int(self.assignment.bucket_of_row[row])
        return self.assignment.bucket_shapes(b)

    def __len__(self) -> int:
        return len(self.schedule(self._epoch))

    def __iter__(self) -> Iterator[list[Any]]:
        sched = self.schedule(self._epoch)
        if self._cursor > 0 and self._cursor >= len(sched):
            # An exhausted epoch whose generator was not drained (trainer stopped at len batches).
            self._epoch, self._cursor = self._epoch + 1, 0
            sched = self.schedule(self._epoch)
        epoch = self._epoch
        while self._epoch == epoch and self._cursor < len(sched):
            step = self._cursor
            # Count before yielding: a state_dict taken after this batch is consumed resumes after it.
            self._cursor += 1
            batch = sched.batch(step, self.rank)
            if self.yield_buckets:
                yield [(r, int(sched.step_bucket[step])) for r in batch.tolist()]
            else:
                yield batch.tolist()
        if self._epoch == epoch and self._cursor >= len(sched):
            self._epoch, self._cursor = epoch + 1, 0

    # ------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def cursor(self) -> int:
        return self._cursor

    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch`` (cursor 0); a no-op when the sampler is already in ``epoch``."""
        epoch = int(epoch)
        if epoch != self._epoch:
            self._epoch, self._cursor = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Rank-agnostic state: seed, epoch, global steps already yielded in that epoch, the world size
        (a resume on another world size re-plans the rest of the epoch) and that re-planning's history."""
        state: dict[str, Any] = {
            "seed": self.seed,
            "epoch": self._epoch,
            "cursor": self._cursor,
            "world_size": self.world_size,
        }
        if self._history and self._resumed_epoch == self._epoch:
            state["history"] = [list(h) for h in self._history]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore epoch and cursor; a state at the end of an epoch resumes at the next epoch's start."""
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            log.warning("sampler seed %d replaced by the checkpoint's seed %d", self.seed, seed)
            self.seed = seed
            self._cache.clear()
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        history = tuple((int(w), int(c)) for w, c in state.get("history", ()))
        world = int(state.get("world_size", self.world_size))
        writer = self._with_world(world, history)  # the sampler that wrote the state
        writer._resumed_epoch = epoch
        steps = len(writer.schedule(epoch))
        if cursor > steps:
            raise ValueError(
                f"sampler state cursor {cursor} is past the {steps} steps of epoch {epoch}: the checkpoint was "
                "written with a different token budget, bucket set or manifest"
            )
        if cursor == steps and cursor > 0:
            epoch, cursor, history = epoch + 1, 0, ()
        elif world != self.world_size and cursor > 0:
            log.info(
                "sampler: resuming epoch %d at step %d of world size %d on world size %d: re-planning the rest "
                "of the epoch (no sample lost or repeated)",
                epoch,
                cursor,
                world,
                self.world_size,
            )
            history, cursor = (*history, (world, cursor)), 0
        self._resumed_epoch, self._history = (epoch, history) if history else (None, ())
        self._cache.clear()
        self._epoch, self._cursor = epoch, cursor

    # ------------------------------------------------------------------ statistics
    def stats(self, epoch: int | None = None, top: int | None = None) -> dict[str, Any]:
        """Epoch statistics: steps, samples, merged/dropped, batch sizes, tokens per rank-step
        (min/mean/max, vs. the budget), padding waste and rank imbalance (computed from the schedule:
        0 and 1 by construction), crop loss of the served samples.

        Args:
            epoch: default the current epoch.
            top: ``per_bucket`` lists the ``top`` largest served buckets (all when None, none when 0).
        """
        a = self.assignment
        sched = self.schedule(epoch)
        w = self.world_size
        steps = len(sched)
        served = sched.served_bucket()
        tok = a.bucket_tokens[served]
        rank_tokens = sched.step_batch_size * a.bucket_tokens[sched.step_bucket]  # [S] per rank
        if steps:
            # Padding = each rank-batch padded to its longest sample; homogeneous buckets give 0.
            seg = (
                np.repeat(sched.step_offsets[:-1], w)
                + np.tile(np.arange(w), steps) * np.repeat(sched.step_batch_size, w)
            ).astype(np.int64)
            padded = (np.maximum.reduceat(tok, seg) * np.repeat(sched.step_batch_size, w)).sum()
            waste = float(1.0 - tok.sum() / padded)
            real = np.add.reduceat(tok, seg).reshape(steps, w).astype(np.float64)
            imbalance = float((real.max(1) / real.mean(1)).mean())
        else:
            waste, imbalance = 0.0, 1.0
        crop = a.crop_loss[sched.samples].astype(np.float64)
        moved = a.bucket_of_row[sched.samples] != served
        if moved.any():
            crop[moved] = a.crop_loss_at(sched.samples[moved], served[moved])

        def _mmm(x: np.ndarray) -> dict[str, float]:
            if x.size == 0:
                return {"min": 0.0, "mean": 0.0, "max": 0.0}
            return {"min": float(x.min()), "mean": float(x.mean()), "max": float(x.max())}

        out: dict[str, Any] = {
            "epoch": sched.epoch,
            "world_size": w,
            "token_budget": self.token_budget,
            "steps": steps,
            "rows": len(a),
            "drawn": sched.num_drawn,
            "scheduled": sched.num_scheduled,
            "merged": sched.num_merged,
            "dropped": sched.num_dropped,
            "buckets": int((a.bucket_counts > 0).sum()),
            "buckets_served": int(np.unique(sched.step_bucket).size),
            "batch_size": _mmm(sched.step_batch_size.astype(np.float64)),
            "tokens_per_rank_step": _mmm(rank_tokens.astype(np.float64)),
            "budget_utilisation": float(rank_tokens.mean() / self.token_budget) if steps else 0.0,
            "padding_waste": waste,
            "rank_imbalance": imbalance,  # mean over steps of max/mean tokens across ranks
            "crop_loss_mean": float(crop.mean()) if crop.size else 0.0,
        }
        if top != 0:
            n_b = a.num_buckets
            samples = np.bincount(served, minlength=n_b)
            bsteps = np.bincount(sched.step_bucket, minlength=n_b)
            crop_sum = np.bincount(served, weights=crop, minlength=n_b)
            live = np.nonzero(samples)[0]
            live = live[np.lexsort((live, -samples[live]))][:top]
            rows = []
            for b in live.tolist():
                rows.append(
                    {
                        "bucket": b,
                        "key": a.key_str(b),
                        "samples": int(samples[b]),
                        "batch_size": int(self.bucket_batch_size[b]),
                        "steps": int(bsteps[b]),
                        "tokens_per_rank_step": int(self.bucket_batch_size[b] * a.bucket_tokens[b]),
                        "crop_loss": float(crop_sum[b] / samples[b]),
                    }
                )
            out["per_bucket"] = rows
        return out
