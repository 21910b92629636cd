"""Study 6 (§3.2): Multi-Condition Aware Bucket Sampler vs naive padded batching, in training tokens/s.

    python experiments/ablations/bucket_sampler/run.py [--steps 20] [--seeds 0,1,2]

Both arms train the same stage (the ablation CPU recipe: tiny MM-DiT, pixel autoencoder, cached MiniLM text)
on the same corpus (``outputs/ablations/corpus``, built by ``experiments/ablations/run.py``) with the same
mean batch size:

* **bucket**: the batches of :class:`~rededit.data.sampler.MultiConditionBucketSampler` (eq. 1, token budget):
  every image of a batch shares its shape per position, no padding;
* **padded**: the naive alternative: random batches of the same size, each image at its own resolution (its
  bucket's, so both arms see identical pixels), zero-padded to the batch's largest height and width and the
  batch's largest number of references (blank extra references).

Figures per seed: useful tokens/s (tokens of the real images only, §3.2's budget unit) over timed
optimizer steps, the padding waste of the batches trained on (padded tokens / processed tokens), and the
padding waste of one whole epoch of naive batches. The ratio bucket/padded is taken in the same process.
Not a Hydra multirun: the padded arm exists only for this comparison (a padded batch would also be a
training bug for diffusers' transformer, whose RoPE treats the padding as image).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))
CORPUS = REPO / "outputs" / "ablations" / "corpus" / "manifest.parquet"
CACHE = REPO / "outputs" / "ablations" / "text_cache"
PATCH = 8  # pixels per token side in the tiny recipe (pixel autoencoder ×4, 2×2 packing)


def tokens(h: int, w: int) -> int:
    return -(-h * w // PATCH**2)


def build(seed: int):
    from conftest import compose
    from rededit.train import build as build_run

    cfg = compose(
        [
            "experiment=ablation_cpu",
            f"data.manifest={CORPUS}",
            f"data.text_cache={CACHE}",
            "data.sia.permute_prob=0.0",
            "data.sia.drop_prob=0.0",
            f"seed={seed}",
            "~callbacks.progress",
        ],
        output_dir=REPO / "outputs" / "ablations" / "bucket_sampler_tmp",
    )
    model, dm, _ = build_run(cfg)
    model.configure_model()
    dm.setup("fit")
    return model, dm


def pad_sample(sample: dict, hw: tuple[int, int], num_refs: int) -> dict:
    """Zero-pad every image of a sample to ``hw`` and append blank references up to ``num_refs``."""

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, hw[1] - x.shape[-1], 0, hw[0] - x.shape[-2]))

    out = dict(sample)
    out["target"] = pad(sample["target"])
    if "edit_mask" in sample and sample["edit_mask"] is not None:
        out["edit_mask"] = pad(sample["edit_mask"])
    refs = [pad(r) for r in sample["references"]]
    blanks = num_refs - len(refs)
    out["references"] = refs + [torch.zeros(3, *hw) for _ in range(blanks)]
    out["reference_uris"] = list(sample.get("reference_uris") or []) + [""] * blanks
    return out


def naive_batches(dm, batch_size: int, seed: int, n_batches: int | None):
    """Random batches of the training rows (keys at each row's own resolution), as SampleKey lists."""
    from rededit.data.dataset import SampleKey

    assignment = dm.train_sampler.bucket_sampler.assignment
    rng = np.random.default_rng([seed, 6])
    order = rng.permutation(len(assignment.bucket_of_row))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    for step, rows in enumerate(batches[:n_batches] if n_batches else batches):
        keys = []
        for r in rows.tolist():
            refs = assignment.ref_res[assignment.ref_offsets[r] : assignment.ref_offsets[r + 1]]
            keys.append(
                SampleKey(
                    r,
                    0,
                    step,
                    tuple(int(v) for v in assignment.target_res[r]),
                    tuple(tuple(int(v) for v in x) for x in refs),
                )
            )
        yield keys


def key_tokens(keys) -> tuple[int, int]:
    """(real tokens, tokens after naive padding) of one batch of keys."""
    hs = [h for k in keys for h, _ in (k.target_hw, *k.ref_hws)]
    ws = [w for k in keys for _, w in (k.target_hw, *k.ref_hws)]
    real = sum(tokens(*k.target_hw) + sum(tokens(*r) for r in k.ref_hws) for k in keys)
    kmax = max(len(k.ref_hws) for k in keys)
    return real, len(keys) * (1 + kmax) * tokens(max(hs), max(ws))


def timed_steps(model, batches, steps: int, warmup: int = 2) -> tuple[float, int]:
    """Seconds and real tokens of ``steps`` optimizer steps after ``warmup`` untimed ones."""
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    if isinstance(opt, (list, tuple)):
        opt = opt[0][0] if isinstance(opt[0], (list, tuple)) else opt[0]
    seconds, real = 0.0, 0
    for i, (batch, n_real) in enumerate(batches):
        if i >= warmup + steps:
            break
        t0 = time.perf_counter()
        loss = model.flow_loss(batch)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            seconds += time.perf_counter() - t0
            real += n_real
    return seconds, real


def run_seed(seed: int, steps: int) -> dict:
    model, dm = build(seed)
    model.trainer = None  # flow_loss works without a trainer (rank 0, world size 1)
    loader = dm.train_dataloader()
    dataset, collate = loader.dataset, loader.collate_fn
    bucket_keys = [keys for _, keys in zip(range(steps + 2), dm.train_sampler)]
    sizes = [len(k) for k in bucket_keys]
    bs = round(statistics.fmean(sizes))

    def bucket_iter():
        for keys in bucket_keys:
            yield collate([dataset[k] for k in keys]), key_tokens(keys)[0]

    naive_keys = list(naive_batches(dm, bs, seed, steps + 2))

    def padded_iter():
        for keys in naive_keys:
            samples = [dataset[k] for k in keys]
            hw = (max(s["target"].shape[-2] for s in samples), max(s["target"].shape[-1] for s in samples))
            hw = (
                max([hw[0]] + [r.shape[-2] for s in samples for r in s["references"]]),
                max([hw[1]] + [r.shape[-1] for s in samples for r in s["references"]]),
            )
            kmax = max(len(s["references"]) for s in samples)
            yield collate([pad_sample(s, hw, kmax) for s in samples]), key_tokens(keys)[0]

    torch.manual_seed(seed)
    t_b, real_b = timed_steps(model, bucket_iter(), steps)
    t_p, real_p = timed_steps(model, padded_iter(), steps)
    trained = [key_tokens(k) for k in naive_keys[2 : steps + 2]]
    epoch = [key_tokens(k) for k in naive_batches(dm, bs, seed, None)]
    return {
        "seed": seed,
        "batch_size": bs,
        "bucket_tokens_per_s": real_b / t_b,
        "padded_tokens_per_s": real_p / t_p,
        "ratio_bucket_over_padded": (real_b / t_b) / (real_p / t_p),
        "padded_waste_trained": 1 - sum(r for r, _ in trained) / sum(p for _, p in trained),
        "padded_waste_epoch": 1 - sum(r for r, _ in epoch) / sum(p for _, p in epoch),
    }


def plot(result: dict, path: Path) -> None:
    """Padding waste and useful tokens/s per arm, one bar pair per seed (plus the mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["seeds"]
    labels = [f"seed {r['seed']}" for r in rows] + ["mean"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = range(len(labels))
    waste = [100 * r["padded_waste_trained"] for r in rows] + [
        100 * result["summary"]["padded_waste_trained"]["mean"]
    ]
    ax1.bar([x + 0.2 for x in xs], waste, width=0.4, color="tab:red", label="naive padded")
    ax1.bar([x - 0.2 for x in xs], [0] * len(labels), width=0.4, color="tab:blue", label="bucket sampler")
    ax1.set_xticks(list(xs), labels, fontsize=8)
    ax1.set_ylabel("padding, % of tokens")
    ax1.legend(fontsize=7)
    for key, off, colour, name in (
        ("bucket_tokens_per_s", -0.2, "tab:blue", "bucket sampler"),
        ("padded_tokens_per_s", 0.2, "tab:red", "naive padded"),
    ):
        summ = result["summary"][key]
        ax2.bar(
            [x + off for x in xs],
            [r[key] for r in rows] + [summ["mean"]],
            yerr=[0] * len(rows) + [summ["std"] or 0],
            width=0.4,
            color=colour,
            capsize=3,
            label=name,
        )
    ax2.set_xticks(list(xs), labels, fontsize=8)
    ax2.set_ylabel("useful (non-padding) tokens / s")
    ax2.legend(fontsize=7)
    fig.suptitle(f"bucket sampler vs naive padding ({result['steps']} timed steps per arm)", fontsize=9)
    from rededit.utils.io import save_figure

    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--plot-only", action="store_true", help="redraw plot.png from the recorded results.json")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(
            json.loads(Path(__file__).with_name("results.json").read_text()),
            Path(__file__).with_name("plot.png"),
        )
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if not CORPUS.exists():
        raise SystemExit(
            f"{CORPUS} missing: run `python experiments/ablations/run.py timestep_sampling` first"
        )
    rows = [run_seed(int(s), args.steps) for s in args.seeds.split(",")]
    keys = [k for k in rows[0] if k not in ("seed", "batch_size")]
    summary = {
        k: {
            "mean": statistics.fmean(r[k] for r in rows),
            "std": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else None,
        }
        for k in keys
    }
    result = {"steps": args.steps, "threads": torch.get_num_threads(), "seeds": rows, "summary": summary}
    out = Path(__file__).with_name("results.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    plot(result, out.with_name("plot.png"))
    for k, s in summary.items():
        print(f"{k:28s} {s['mean']:.4g}" + (f" ± {s['std']:.2g}" if s["std"] is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
