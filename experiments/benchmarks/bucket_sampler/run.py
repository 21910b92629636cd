"""Benchmark: Multi-Condition Aware Bucket Sampler vs. naive padded batching (report §3.2).

Synthesises a sizes-only manifest (mixed aspect ratios, 0-3 references, jittered sizes) in memory,
times bucket assignment and one epoch schedule, records peak RSS, and compares per-rank token
balance and padding waste against naive random batching padded to the batch maximum.

    python experiments/benchmarks/bucket_sampler/run.py                 # 10M rows, W=8, ct buckets
    python experiments/benchmarks/bucket_sampler/run.py --rows 20000    # smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

import numpy as np

from rededit.data.buckets import ResolutionSet, assign_buckets, load_bucket_config
from rededit.data.manifest import ManifestSizes
from rededit.data.sampler import MultiConditionBucketSampler
from rededit.utils.seeding import numpy_rng

# (task, number of references, share of rows)
TASKS: tuple[tuple[str, int, float], ...] = (
    ("t2i", 0, 0.45),
    ("edit", 1, 0.40),
    ("compose2", 2, 0.10),
    ("compose3", 3, 0.05),
)
# Common photo aspect ratios (w/h) and their frequencies.
RATIOS = np.array([1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 0.5])
RATIO_P = np.array([0.30, 0.15, 0.15, 0.08, 0.08, 0.08, 0.08, 0.04, 0.04])


def _sizes(rng: np.random.Generator, k: int, min_side: int, max_side: int) -> np.ndarray:
    """``[k, 2]`` (h, w): a common ratio with ~3% log jitter, log-uniform area."""
    ratio = RATIOS[rng.choice(RATIOS.size, size=k, p=RATIO_P)] * np.exp(rng.normal(0.0, 0.03, k))
    area = np.exp(rng.uniform(2 * np.log(min_side), 2 * np.log(max_side), k))
    h = np.maximum(16, np.round(np.sqrt(area / ratio))).astype(np.int32)
    w = np.maximum(16, np.round(np.sqrt(area * ratio))).astype(np.int32)
    return np.stack([h, w], 1)


def synthetic_sizes(
    rows: int,
    seed: int = 0,
    min_side: int = 448,
    max_side: int = 1600,
    num_clusters: int = 64,
) -> ManifestSizes:
    """Sizes-only manifest: tasks of :data:`TASKS`; one-reference edits keep the target's size 80% of
    the time (edit pairs), other references are drawn independently; Zipf-like clusters."""
    rng = numpy_rng(seed, "synthetic_sizes", rows)
    shares = np.array([t[2] for t in TASKS])
    task = rng.choice(len(TASKS), size=rows, p=shares / shares.sum()).astype(np.int32)
    n_refs = np.array([t[1] for t in TASKS], dtype=np.int64)[task]
    target = _sizes(rng, rows, min_side, max_side)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(n_refs, out=offsets[1:])
    m = int(offsets[-1])
    owner = np.repeat(np.arange(rows), n_refs)
    ref = _sizes(rng, m, min_side, max_side)
    same = (n_refs[owner] == 1) & (rng.random(m) < 0.8)
    ref[same] = target[owner[same]]
    zipf = 1.0 / np.arange(1, num_clusters + 1)
    cluster = rng.choice(num_clusters, size=rows, p=zipf / zipf.sum()).astype(np.int64)
    return ManifestSizes(
        target_hw=target,
        ref_offsets=offsets,
        ref_hw=ref,
        task_codes=task,
        task_names=tuple(t[0] for t in TASKS),
        cluster=cluster,
    )


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a phase's own peak can be read; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    """Peak RSS since the last :func:`reset_peak` (VmHWM), else since process start (ru_maxrss)."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    rss = _status_mib("VmRSS")
    if rss is None:  # pragma: no cover - non-Linux
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
    return rss


def _phase(fn, *args, **kwargs):
    """Run ``fn`` and return (result, seconds, rss before MiB, peak during MiB)."""
    import gc

    gc.collect()
    before = rss_mib()
    reset_peak()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, before, peak_mib()


def naive_baseline(tokens: np.ndarray, batch_size: int, world_size: int, seed: int) -> dict[str, float]:
    """Random batches of a fixed size, each sample padded to the longest in its rank-batch.

    Args:
        tokens: ``[N]`` tokens per sample (at the same bucket resolution the sampler serves).
        batch_size: fixed per-rank batch size.
        world_size: ranks per step.

    Returns:
        padding waste (padding / padded tokens) and rank imbalance (mean over steps of
        max/mean real tokens across ranks).
    """
    per_step = batch_size * world_size
    steps = tokens.size // per_step
    perm = numpy_rng(seed, "naive").permutation(tokens.size)[: steps * per_step]
    t = tokens[perm].reshape(steps, world_size, batch_size)
    real = t.sum(-1)  # [S, W]
    padded = t.max(-1) * batch_size
    return {
        "batch_size": float(batch_size),
        "steps": float(steps),
        "padding_waste": float(1.0 - real.sum() / padded.sum()),
        "rank_imbalance_real": float((real.max(1) / real.mean(1)).mean()),
        "rank_imbalance_padded": float((padded.max(1) / padded.mean(1)).mean()),
        "tokens_per_rank_step_max": float(padded.max()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--buckets", default="ct")
    parser.add_argument("--token-budget", type=int, default=20480)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    sizes, t_synth, _, _ = _phase(synthetic_sizes, args.rows, seed=args.seed)
    resset = ResolutionSet.from_config(load_bucket_config(args.buckets))
    assignment, t_assign, rss_a, peak_a = _phase(assign_buckets, sizes, resset)
    sampler = MultiConditionBucketSampler(
        assignment, token_budget=args.token_budget, world_size=args.world_size, seed=args.seed
    )
    sched, t_schedule, rss_s, peak_s = _phase(sampler.schedule, 0)
    _, t_schedule2, _, _ = _phase(sampler.schedule, 1)
    stats = sampler.stats(0, top=0)

    # Naive: fixed batch size with the sampler's mean tokens per rank-step, same per-sample tokens.
    tokens = assignment.tokens_per_sample
    fixed_bs = max(1, round(stats["tokens_per_rank_step"]["mean"] / float(tokens.mean())))
    naive = naive_baseline(tokens, fixed_bs, args.world_size, args.seed)

    result = {
        "rows": args.rows,
        "world_size": args.world_size,
        "buckets": args.buckets,
        "token_budget": args.token_budget,
        "resolutions": len(resset),
        "bucket_keys": assignment.num_buckets,
        "time_s": {
            "synthesise": round(t_synth, 3),
            "assign_buckets": round(t_assign, 3),
            "schedule_epoch0": round(t_schedule, 3),
            "schedule_epoch1": round(t_schedule2, 3),
        },
        "rss_mib": {
            "peak_is_per_phase": reset_peak(),
            "assign_before": round(rss_a, 1),
            "assign_peak": round(peak_a, 1),
            "assign_increase": round(peak_a - rss_a, 1),
            "schedule_before": round(rss_s, 1),
            "schedule_peak": round(peak_s, 1),
            "schedule_increase": round(peak_s - rss_s, 1),
        },
        "sampler": {
            "steps": len(sched),
            "scheduled": stats["scheduled"],
            "merged": stats["merged"],
            "dropped": stats["dropped"],
            "padding_waste": stats["padding_waste"],
            "rank_imbalance": stats["rank_imbalance"],
            "tokens_per_rank_step": stats["tokens_per_rank_step"],
            "budget_utilisation": stats["budget_utilisation"],
            "crop_loss_mean": stats["crop_loss_mean"],
        },
        "naive": naive,
    }
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        from rededit.utils.io import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return result


if __name__ == "__main__":
    main()
