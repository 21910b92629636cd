"""Benchmark: one training step of the tiny config through the Lightning stage vs a hand-written loop.

Two questions of issue 3, answered in one process so that the machine's load affects both sides alike:

1. **Lightning overhead.** ``rededit.train.build(cfg)`` of ``experiment=demo_pretrain`` (tiny MM-DiT,
   pixel VAE, MiniLM text in the loader, stratified σ + curriculum, logit-normal weighting, EMA, NaN
   guard, grad clip 1.0, AdamW) is trained with ``trainer.fit(max_steps=W+N)``, and a plain PyTorch loop
   does the same work on objects built from the same config: the same datamodule loader, VAE encode,
   σ and ε drawn from the same (seed, epoch, data step) streams, backbone forward, weighted MSE (§3.3
   eq. of the path, §3.8 weighting), ``backward``, ``clip_grad_norm_(1.0)``, a finite check, AdamW step,
   ``zero_grad``, the EMA callback's own ``update()``. Both start from the same weights; the per-step
   losses are compared, so the loop provably does the same work (``max |Δloss|`` in the table).
2. **Text conditioning.** The Lightning path with text encoded online in the loader vs read from a
   pre-computed cache (``rededit-data encode-text``); SIA re-indexed texts miss the cache and are
   encoded online, so the hit rate is reported.

Timing: a step's time is the interval between consecutive step ends (Lightning: a callback's
``on_train_batch_end``, listed last; loop: after the EMA update), so data loading, collation and text
encoding, and whatever Lightning does between steps (logging, hooks) fall inside it for both paths. The
first ``W`` intervals are warm-up and dropped. Repetitions are interleaved (A B A B …) and each side's
figure is the median over all its measured steps; the ratio Lightning / loop from the same run is the
meaningful number on a shared machine.

    python experiments/benchmarks/train_step/run.py                      # defaults, prints the table
    python experiments/benchmarks/train_step/run.py --record             # also writes results.json
    python experiments/benchmarks/train_step/run.py --steps 3 --warmup 1 --reps 1   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from rededit.callbacks.ema import EMA  # noqa: E402
from rededit.data.text_cache import TextEmbeddingCache  # noqa: E402
from rededit.flow.path import interpolate  # noqa: E402
from rededit.flow.weighting import loss_weight  # noqa: E402
from rededit.stages.base import STEPS_PER_EPOCH_STRIDE  # noqa: E402
from rededit.train import build  # noqa: E402
from rededit.utils.paths import CONF_DIR  # noqa: E402
from rededit.utils.seeding import torch_generator  # noqa: E402


# ---------------------------------------------------------------------------------------------- setup
def make_corpus(out_dir: str | Path, n: int, seed: int = 0, side: int = 64) -> Path:
    """Synthetic corpus (report §2.3 templates) at ``side`` px; returns the manifest path."""
    from rededit.datagen.synth.writer import synthesize

    return synthesize(out_dir, n=n, seed=seed, bench_n=8, min_side=side, max_side=side)


def compose_cfg(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    steps: int,
    logger: str = "csv",
    text_cache: str | None = None,
    overrides: Sequence[str] = (),
) -> DictConfig:
    """``conf/train.yaml`` with ``experiment=demo_pretrain``, timing-neutral callbacks (EMA + NaN guard:
    no progress bar, no checkpointing, no LR monitor) and the given manifest / cache."""
    args = [
        "experiment=demo_pretrain",
        "callbacks=[ema,nan_guard]",
        f"data.manifest={manifest}",
        f"paths.output_dir={out_dir}",
        f"trainer.max_steps={steps}",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_checkpointing=false",
        "export_dir=null",
        *list(overrides),
    ]
    if text_cache is not None:
        args.append(f"data.text_cache={text_cache}")
    if logger == "none":
        args.append("logger=[]")
    elif logger != "csv":
        args.append(f"logger={logger}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args)
    with open_dict(cfg):
        cfg.callbacks = {k: v for k, v in (cfg.callbacks or {}).items() if k in ("ema", "nan_guard")}
    return cfg


def build_seeded(cfg: DictConfig) -> tuple[Any, Any, L.Trainer]:
    """``build(cfg)`` under ``seed_everything(cfg.seed)`` with the backbone created right away, so every
    run of either path starts from identical weights (``configure_model`` is idempotent inside fit)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, datamodule, trainer = build(cfg)
    model.configure_model()
    return model, datamodule, trainer


# ---------------------------------------------------------------------------------------------- paths
class StepClock(L.Callback):
    """Wall-clock time and loss at the end of every training batch."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())


def run_lightning(cfg: DictConfig) -> dict[str, Any]:
    """``trainer.fit`` of the built stage; returns step-end stamps and losses."""
    model, datamodule, trainer = build_seeded(cfg)
    clock = StepClock()
    trainer.callbacks.append(clock)  # last: its stamp follows the EMA update of the same step
    trainer.fit(model, datamodule=datamodule)
    return {"stamps": clock.stamps, "cpu_stamps": clock.cpu_stamps, "losses": clock.losses}


def run_hand(cfg: DictConfig) -> dict[str, Any]:
    """The same work as :func:`run_lightning` in plain PyTorch (no Trainer, no LightningModule hooks).

    The stage object only serves as a container for the parts built from the config (backbone, VAE,
    timestep sampler, curriculum, weighting); the loss math below is written out.
    """
    stage, datamodule, trainer = build_seeded(cfg)
    ema_cb = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    max_steps = int(cfg.trainer.max_steps)
    clip = float(cfg.trainer.gradient_clip_val or 0.0)
    del trainer

    backbone, vae = stage.backbone, stage.vae
    timesteps, curriculum, seed = stage.timesteps, stage.curriculum, stage.seed
    backbone.train()
    opt_cfg = stage.configure_optimizers()
    optimizer = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    scheduler = opt_cfg["lr_scheduler"]["scheduler"] if isinstance(opt_cfg, dict) else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if ema_cb is not None:
        ema_cb._init_shadow(stage)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()

    stamps: list[float] = []
    cpu_stamps: list[float] = []
    losses: list[float] = []
    global_step, epoch = 0, 0
    while global_step < max_steps:
        loader.batch_sampler.set_epoch(epoch)  # as Lightning's fit loop does at every epoch start
        for batch in loader:
            with torch.no_grad():
                x0 = vae.encode(batch["target"]).float()
                refs = [vae.encode(r).float() for r in batch["references"]]
            text_emb, text_mask = batch["text_emb"], batch["text_mask"]
            micro_step = int(batch["epoch"]) * STEPS_PER_EPOCH_STRIDE + int(batch["step"])
            p = backbone.patch_size
            seq_len = (x0.shape[-2] // p) * (x0.shape[-1] // p)
            sigma = timesteps.sample(
                x0.shape[0], step=micro_step, rank=0, world_size=1, seed=seed, seq_len=seq_len
            )
            if curriculum is not None:
                sigma = curriculum.apply(sigma, global_step)
            eps = torch.randn(x0.shape, generator=torch_generator(seed, "noise", micro_step, 0))
            x_t = interpolate(x0, eps, sigma)  # x_t = (1 − σ) x0 + σ ε
            v_hat = backbone(x_t, refs, sigma, text_emb, text_mask)
            v = backbone.velocity_target(x0, eps, sigma)
            mse = (v_hat.float() - v).pow(2).flatten(1).mean(1)
            loss = (loss_weight(sigma, **stage.weighting) * mse).mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else None
            if norm is None or torch.isfinite(norm):  # the NaN guard's job: skip non-finite updates
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            global_step += 1
            if ema_cb is not None and global_step % ema_cb.update_every == 0:
                if global_step < ema_cb.start_step:
                    ema_cb._init_shadow(stage)
                else:
                    ema_cb.update(stage)
            losses.append(float(loss.detach()))
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            if global_step >= max_steps:
                break
        epoch += 1
    return {"stamps": stamps, "cpu_stamps": cpu_stamps, "losses": losses}


@contextlib.contextmanager
def count_cache_lookups() -> Iterator[dict[str, int]]:
    """Count hits / misses of every :meth:`TextEmbeddingCache.get_many` call in the block."""
    counts = {"hits": 0, "misses": 0}
    original = TextEmbeddingCache.get_many

    def counted(self: TextEmbeddingCache, keys: Sequence[str]) -> dict[str, torch.Tensor | None]:
        out = original(self, keys)
        found = sum(out[k] is not None for k in keys)
        counts["hits"] += found
        counts["misses"] += len(keys) - found
        return out

    TextEmbeddingCache.get_many = counted
    try:
        yield counts
    finally:
        TextEmbeddingCache.get_many = original


def encode_cache(cfg: DictConfig, cache_dir: str | Path, columns: list[str] | None = None) -> dict[str, int]:
    """``rededit-data encode-text`` of the manifest into ``cache_dir`` with the config's encoder."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from rededit.cli.data_encode_text import encode_manifest
    from rededit.data.manifest import Manifest

    encoder = instantiate(cfg.text_encoder)
    cache = TextEmbeddingCache(cache_dir, cache_id=encoder.cache_id)
    # a VL encoder sees each reference cropped to the run's buckets (what the loader will look up)
    buckets = OmegaConf.to_container(cfg.data.buckets, resolve=True) if cfg.data.get("buckets") else "tiny"
    return encode_manifest(Manifest.open(cfg.data.manifest), encoder, cache, columns=columns, buckets=buckets)


# ---------------------------------------------------------------------------------------------- stats
def step_times(stamps: Sequence[float], warmup: int) -> list[float]:
    """Intervals between consecutive step ends, without the first ``warmup`` ones."""
    return [b - a for a, b in itertools.pairwise(stamps)][warmup:]


def summarise(times: Sequence[float]) -> dict[str, float]:
    qs = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": qs[0], "q3_s": qs[2], "n": len(times)}


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=None, help="folder with manifest.parquet (default: synthesise one)")
    p.add_argument("--rows", type=int, default=300, help="synthetic train rows (before inverse rows)")
    p.add_argument("--side", type=int, default=64, help="synthetic image side (px)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per repetition (not measured)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per path")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--logger", default="csv", help="csv | none | tensorboard")
    p.add_argument("--skip-cache", action="store_true", help="skip the cached vs online comparison")
    p.add_argument(
        "--encode-columns", default=None, help="comma-separated text columns to cache (default: all)"
    )
    p.add_argument("--record", action="store_true", help=f"write {HERE / 'results.json'}")
    p.add_argument("--out", default=None, help="write the results JSON here instead")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.token_budget=2048")
    return p.parse_args(argv)


def _times(out: dict[str, Any], warmup: int) -> dict[str, list[float]]:
    return {"wall": step_times(out["stamps"], warmup), "cpu": step_times(out["cpu_stamps"], warmup)}


def _ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["run.py", *(sys.argv[1:] if argv is None else argv)])
    info = machine_info() | {"threads": args.threads, "command": command}
    total = args.warmup + 1 + args.steps  # W warm-up intervals + N measured intervals need W+N+1 steps
    results: dict[str, Any] = {"machine": info, "settings": vars(args) | {"steps_per_run": total}}

    with tempfile.TemporaryDirectory(prefix="rededit-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.corpus:
            manifest = Path(args.corpus) / "manifest.parquet"
        else:
            t0 = time.perf_counter()
            manifest = make_corpus(tmp_path / "corpus", n=args.rows, side=args.side)
            print(f"corpus: {manifest} ({time.perf_counter() - t0:.1f} s)")
        base = compose_cfg(
            manifest, tmp_path / "runs", steps=total, logger=args.logger, overrides=args.overrides
        )

        def cfg_for(tag: str, text_cache: str | None = None) -> DictConfig:
            cfg = copy.deepcopy(base)
            cfg.paths.output_dir = str(tmp_path / "runs" / tag)
            cfg.data.text_cache = text_cache
            return cfg

        # 1. Lightning vs hand-written loop, interleaved A B A B ...
        runs: dict[str, list[dict[str, Any]]] = {"lightning": [], "hand": []}
        for rep in range(args.reps):
            for name, fn in (("lightning", run_lightning), ("hand", run_hand)):
                t0 = time.perf_counter()
                out = fn(cfg_for(f"{name}{rep}"))
                runs[name].append(out | _times(out, args.warmup))
                print(
                    f"rep {rep} {name:9s}: median {statistics.median(runs[name][-1]['wall']) * 1e3:7.1f} ms/step "
                    f"wall, {statistics.median(runs[name][-1]['cpu']) * 1e3:7.1f} ms/step CPU "
                    f"({len(out['losses'])} steps, {time.perf_counter() - t0:.1f} s incl. setup)"
                )
        pooled = {n: {k: [t for r in runs[n] for t in r[k]] for k in ("wall", "cpu")} for n in runs}
        dloss = max(
            abs(a - b)
            for rl, rh in zip(runs["lightning"], runs["hand"])
            for a, b in zip(rl["losses"], rh["losses"])
        )
        results["lightning_vs_hand"] = {
            "lightning": {k: summarise(v) for k, v in pooled["lightning"].items()},
            "hand": {k: summarise(v) for k, v in pooled["hand"].items()},
            "ratio": _ratio(pooled["lightning"]["wall"], pooled["hand"]["wall"]),
            "ratio_cpu": _ratio(pooled["lightning"]["cpu"], pooled["hand"]["cpu"]),
            "ratio_per_rep": [_ratio(a["wall"], b["wall"]) for a, b in zip(runs["lightning"], runs["hand"])],
            "ratio_cpu_per_rep": [
                _ratio(a["cpu"], b["cpu"]) for a, b in zip(runs["lightning"], runs["hand"])
            ],
            "max_abs_loss_diff": dloss,
            "losses_lightning": runs["lightning"][0]["losses"],
            "losses_hand": runs["hand"][0]["losses"],
        }

        # 2. Cached vs online text encoding (Lightning path), interleaved.
        if not args.skip_cache:
            cache_dir = tmp_path / "text_cache"
            columns = args.encode_columns.split(",") if args.encode_columns else None
            t0 = time.perf_counter()
            enc_counts = encode_cache(cfg_for("encode"), cache_dir, columns=columns)
            enc_s = time.perf_counter() - t0
            print(f"encode-text: {enc_counts} in {enc_s:.1f} s")
            text_runs: dict[str, dict[str, list[float]]] = {
                m: {"wall": [], "cpu": []} for m in ("online", "cached")
            }
            lookups = {"hits": 0, "misses": 0}
            for rep in range(args.reps):
                # Part 1's last Lightning run (same config, online text) is the first online repetition.
                out = runs["lightning"][-1] if rep == 0 else run_lightning(cfg_for(f"online{rep}"))
                for k, v in _times(out, args.warmup).items():
                    text_runs["online"][k] += v
                with count_cache_lookups() as counts:
                    out = run_lightning(cfg_for(f"cached{rep}", text_cache=str(cache_dir)))
                lookups = {k: lookups[k] + counts[k] for k in lookups}
                for k, v in _times(out, args.warmup).items():
                    text_runs["cached"][k] += v
                print(
                    f"rep {rep} cached   : median {statistics.median(text_runs['cached']['wall']) * 1e3:7.1f} "
                    f"ms/step wall (all reps so far)"
                )
            n_look = lookups["hits"] + lookups["misses"]
            results["text_encoding"] = {
                "online": {k: summarise(v) for k, v in text_runs["online"].items()},
                "cached": {k: summarise(v) for k, v in text_runs["cached"].items()},
                "ratio_cached_over_online": _ratio(text_runs["cached"]["wall"], text_runs["online"]["wall"]),
                "ratio_cpu_cached_over_online": _ratio(
                    text_runs["cached"]["cpu"], text_runs["online"]["cpu"]
                ),
                "cache_hits": lookups["hits"],
                "cache_misses": lookups["misses"],
                "hit_rate": lookups["hits"] / n_look if n_look else float("nan"),
                "encode_text": enc_counts | {"seconds": enc_s},
            }

    results["machine"]["loadavg_end"] = os.getloadavg()
    print_table(results)
    out_path = Path(args.out) if args.out else (HERE / "results.json" if args.record else None)
    if out_path is not None:
        out_path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out_path}")
    return results


def _row(name: str, s: dict[str, dict[str, float]]) -> str:
    w, c = s["wall"], s["cpu"]
    return (
        f"| {name} | {w['median_s'] * 1e3:.1f} | {w['q1_s'] * 1e3:.1f}–{w['q3_s'] * 1e3:.1f} "
        f"| {c['median_s'] * 1e3:.1f} | {w['n']} |"
    )


def print_table(results: dict[str, Any]) -> None:
    head = "| {} | median wall ms/step | wall IQR ms | median CPU ms/step | steps |\n|---|---|---|---|---|"
    lh = results["lightning_vs_hand"]
    print("\n" + head.format("path"))
    for name in ("lightning", "hand"):
        print(_row(name, lh[name]))
    reps = ", ".join(f"{r:.3f}" for r in lh["ratio_per_rep"])
    reps_cpu = ", ".join(f"{r:.3f}" for r in lh["ratio_cpu_per_rep"])
    print(
        f"\nratio Lightning / hand: wall {lh['ratio']:.3f} (per rep {reps}), CPU {lh['ratio_cpu']:.3f} "
        f"(per rep {reps_cpu}); max |Δloss| = {lh['max_abs_loss_diff']:.2e}"
    )
    te = results.get("text_encoding")
    if te:
        print("\n" + head.format("text"))
        for name in ("online", "cached"):
            print(_row(name, te[name]))
        print(
            f"\nratio cached / online: wall {te['ratio_cached_over_online']:.3f}, CPU "
            f"{te['ratio_cpu_cached_over_online']:.3f}; cache hit rate {te['hit_rate']:.1%} "
            f"({te['cache_hits']} hits, {te['cache_misses']} misses)"
        )


if __name__ == "__main__":
    main()
