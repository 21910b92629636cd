"""Benchmark: cost of the §3.7 identity-consistency loss on an SFT step of the tiny config (CPU).

Question (issue 5): does ``loss/consistency=face`` add at most 30 % to a training step of
``experiment=demo_sft`` (tiny MM-DiT, pixel VAE, 64² buckets, token budget 2048, EMA, NaN guard)?

Data: :func:`rededit.datagen.synth.portraits.make_portrait_corpus`: the synthetic corpus layout (128² images)
with every image a real portrait crop (scikit-image's astronaut and cameraman, matplotlib's Grace Hopper;
random scale/shift/mirror; Picture 1 blurred and colour-cast, the target clean) and landmarks from ``rededit-data
faces``, so *every* sample carries a face: the worst case for the loss (a portrait task's share).
The dataset maps the landmarks through the 128 → 64 bucket resize; φ = SFace at 112×112 per face.

Two measurements, each variant differing only in the consistency loss:

1. compute step (``measure``): one SFT stage; each pre-drawn batch (collated, text encoded) goes through
   ``compute_loss`` + ``backward`` + AdamW ``step`` + ``zero_grad`` once per variant in rotating order. Data
   loading is outside the timed region, so the ratio to ``off`` is an upper bound of what the loss adds.
2. ``trainer.fit`` step (``measure_fit``): real ``trainer.fit`` runs of the recipe (data loading in the main
   process as ``num_workers: 0`` configures it, EMA, NaN guard, CSV logger), one per variant and round;
   per-step wall time between consecutive ``on_train_batch_start``. This is what a user of the tiny config
   pays.

Variants: ``off`` (``loss/consistency=none``); ``face`` (every eligible sample, faces and σ < 0.9:
the loss group's default ``max_samples: null``); ``face-K`` (``stage.auxiliary_losses.loss_id.max_samples=K``: φ on K draws ∝ λ_id(σ), weighted
so the loss stays unbiased; see :meth:`rededit.losses.consistency.ConsistencyLoss._draw`). ``demo_sft`` sets
K = 1. The first ``--warmup`` steps are dropped; figures are medians.

    python experiments/benchmarks/consistency_loss/run.py                # prints the table
    python experiments/benchmarks/consistency_loss/run.py --record       # also writes results.json
    python experiments/benchmarks/consistency_loss/run.py --rows 40 --steps 2 --warmup 1 --max-samples 1  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rededit.datagen.synth.portraits import make_portrait_corpus  # noqa: E402
from rededit.train import build  # noqa: E402
from rededit.utils.paths import CONF_DIR  # noqa: E402


# ---------------------------------------------------------------------------------------------- runs
def compose_cfg(
    manifest: Path, out_dir: Path, *, overrides: list[str], consistency: str = "face", logger: bool = False
) -> DictConfig:
    args = [
        "experiment=demo_sft",
        f"loss/consistency={consistency}",
        f"data.manifest={manifest}",
        f"paths.output_dir={out_dir}",
        "export_dir=null",
        *([] if logger else ["logger=[]"]),
        *overrides,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=args)


def step_times(stamps: list[float], warmup: int) -> list[float]:
    """Intervals between consecutive stamps, dropping the first ``warmup`` intervals."""
    return [b - a for a, b in itertools.pairwise(stamps)][warmup:]


def measure(manifest: Path, out_dir: Path, *, steps: int, warmup: int, max_samples: list[int], seed: int = 0):
    """Per-step interleaved timing of one SFT stage with its auxiliary losses swapped per variant.

    The batches (collated, text encoded by the loader) are drawn first, so data loading is excluded and
    the denominator is the bare step: ``compute_loss`` (VAE encode, transformer forward, flow loss, and the
    consistency loss when on), ``backward``, AdamW ``step``, ``zero_grad``. That makes the ratio an upper
    bound of what the loss adds to a real ``trainer.fit`` step. Each batch is run once per variant in a
    rotating order, so load on the shared machine hits every variant alike.
    """
    from rededit.losses.consistency import ConsistencyLoss

    cfg = compose_cfg(manifest, out_dir, overrides=[])
    L.seed_everything(seed, workers=True, verbose=False)
    model, datamodule, _ = build(cfg)
    model.configure_model()
    model.log = lambda *a, **k: None  # no trainer: logging is not part of what is timed
    model.train()
    face = model.auxiliary_losses["loss_id"]
    full = ConsistencyLoss(face.criterion, face.eta, face.sigma_cutoff, max_samples=None, seed=seed)
    variants: dict[str, dict[str, Any]] = {"off": {}, "face": {"loss_id": full}}
    for k in max_samples:
        capped = ConsistencyLoss(face.criterion, face.eta, face.sigma_cutoff, max_samples=k, seed=seed)
        variants[f"face-{k}"] = {"loss_id": capped}
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches: list[dict[str, Any]] = []
    while len(batches) < warmup + steps:  # several epochs if the corpus is small (the sampler moves on)
        batches += list(itertools.islice(iter(loader), warmup + steps - len(batches)))
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    times: dict[str, list[float]] = {v: [] for v in variants}
    stats: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    names = list(variants)
    for i, batch in enumerate(batches):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            model.auxiliary_losses = torch.nn.ModuleDict(variants[name])
            t0 = time.perf_counter()
            loss, _ = model.compute_loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
                for fn in variants[name].values():
                    stats[name].append({k: float(v) for k, v in fn.last_stats.items()})
    sizes = [len(b["ids"]) for b in batches[warmup:]]
    return times, stats, sizes


class StepTimer(L.Callback):
    """Stamps every ``on_train_batch_start``: consecutive intervals are whole loop iterations of
    ``trainer.fit`` (data loading with ``num_workers: 0``, text encoding, the step, callbacks such as EMA)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())


def fit_variant_overrides(max_samples: list[int]) -> dict[str, tuple[str, list[str]]]:
    """variant → (``loss/consistency`` choice, extra overrides) for the ``trainer.fit`` measurement."""
    out = {"off": ("none", []), "face": ("face", [])}
    for k in max_samples:
        out[f"face-{k}"] = ("face", [f"stage.auxiliary_losses.loss_id.max_samples={k}"])
    return out


def measure_fit(
    manifest: Path, out_dir: Path, *, steps: int, warmup: int, max_samples: list[int], rounds: int
):
    """Per-step wall time of real ``trainer.fit`` runs of ``experiment=demo_sft`` (one per variant and
    round, the variants rotated within a round; same seed, so the same batches). This is the step a user
    of the tiny config pays for; the ``measure`` figures isolate the loss's compute."""
    times: dict[str, list[float]] = {}
    variants = fit_variant_overrides(max_samples)
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            consistency, extra = variants[name]
            cfg = compose_cfg(
                manifest,
                out_dir / f"fit-{name}-{r}",
                consistency=consistency,
                logger=True,  # the recipe's own CSV logger and LR monitor: part of a real step
                overrides=[f"trainer.max_steps={warmup + steps + 1}", "~callbacks.progress", *extra],
            )
            L.seed_everything(0, workers=True, verbose=False)
            model, datamodule, trainer = build(cfg)
            timer = StepTimer()
            trainer.callbacks.append(timer)
            trainer.fit(model, datamodule=datamodule)
            times.setdefault(name, []).extend(step_times(timer.stamps, warmup))
    return times


def summarise(times: dict[str, list[float]], stats: dict[str, list[dict[str, float]]] | None = None):
    """Rows of the result table: median per-step seconds and the ratio to ``off``."""
    base = statistics.median(times["off"])
    table = []
    for name, ts in times.items():
        st = (stats or {}).get(name) or []
        frac = [x["id_face_fraction"] for x in st]
        act = [x["id_active_fraction"] for x in st]
        table.append(
            {
                "variant": name,
                "median_step_s": round(statistics.median(ts), 4),
                "ratio_vs_off": round(statistics.median(ts) / base, 3),
                "steps": len(ts),
                "face_fraction": round(float(np.mean(frac)), 3) if frac else None,
                "eligible_fraction": round(float(np.mean(act)), 3) if act else None,
            }
        )
    return table


def print_table(title: str, table: list[dict[str, Any]]) -> None:
    print(
        f"\n{title}\n{'variant':<10} {'median step s':>14} {'ratio vs off':>13} {'steps':>6} {'faces':>6} {'σ<0.9':>6}"
    )
    for r in table:
        ff = "-" if r["face_fraction"] is None else f"{r['face_fraction']:.2f}"
        ef = "-" if r["eligible_fraction"] is None else f"{r['eligible_fraction']:.2f}"
        print(
            f"{r['variant']:<10} {r['median_step_s']:>14.4f} {r['ratio_vs_off']:>13.3f} {r['steps']:>6} {ff:>6} {ef:>6}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--steps", type=int, default=12, help="measured batches (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-samples", type=int, nargs="*", default=[1, 4], help="K of the face-K variants")
    ap.add_argument("--fit-rounds", type=int, default=2, help="trainer.fit runs per variant (0: skip)")
    ap.add_argument("--record", action="store_true", help="write results.json next to this script")
    ap.add_argument("--out", default=None, help="results path (default: results.json here with --record)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="consistency_bench_") as tmp:
        tmp = Path(tmp)
        manifest, faces_report = make_portrait_corpus(tmp / "corpus", args.rows)
        print(faces_report)
        times, stats, sizes = measure(
            manifest, tmp / "run", steps=args.steps, warmup=args.warmup, max_samples=args.max_samples
        )
        fit_times = (
            measure_fit(
                manifest,
                tmp / "fit",
                steps=args.steps,
                warmup=args.warmup,
                max_samples=args.max_samples,
                rounds=args.fit_rounds,
            )
            if args.fit_rounds
            else None
        )
    print(f"batch size: median {statistics.median(sizes)} samples ({min(sizes)}-{max(sizes)})")
    table = summarise(times, stats)
    print_table("compute step (compute_loss + backward + AdamW; data loading excluded)", table)
    fit_table = summarise(fit_times) if fit_times else None
    if fit_table:
        print_table("trainer.fit step (the tiny config as a user runs it)", fit_table)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "args": vars(args),
        "faces": faces_report,
        "batch_sizes": sizes,
        "table": table,
        "fit_table": fit_table,
    }
    out = Path(args.out) if args.out else (HERE / "results.json" if args.record else None)
    if out is not None:
        from rededit.utils.io import atomic_write_text

        atomic_write_text(out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
