"""Benchmark: step time and peak memory of full fine-tuning vs LoRA vs LoRA on a quantised base (issue 20).

One run, one config, the variants one after another (one model in memory at a time; the machine is shared:
only ratios within a run compare, and the load average is recorded beside them). Each variant builds the backbone as the stage does (preset, frozen text tail, adapter, reduced frozen
base), its optimizer (AdamW / 8-bit AdamW on the trainable tensors) and times forward + backward + step +
zero_grad on the same random batch (``rededit.stages.memory.step_inputs``: ``--image-tokens`` visual tokens,
target + 1 reference). Peak memory: CPU, torch's memory profiler timeline of one step (parameters, gradients,
optimizer state, activations and temporaries; max over time); CUDA, ``torch.cuda.max_memory_allocated``. The
``rededit-memory`` estimate of the same config is printed beside it.

    python experiments/benchmarks/adapter/run.py                     # tiny config, CPU, 1 torch thread
    python experiments/benchmarks/adapter/run.py --record            # also writes results.json
    # GPU (a machine that is lent one): a 20B-shaped Qwen-Image backbone with few blocks, bf16 base
    python experiments/benchmarks/adapter/run.py --device cuda --preset qwen20b --blocks 4 \\
        --image-tokens 8192 --text-tokens 512 --steps 10 --warmup 3 --record
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from rededit.models import adapters, frozen_base
from rededit.stages.memory import estimate, step_inputs, transformer_config
from rededit.utils.paths import CONF_DIR

HERE = Path(__file__).resolve().parent
LORA = ["adapter=lora", "adapter.rank=16"]
VARIANTS: dict[str, list[str]] = {
    "full (AdamW)": [],
    "full (8-bit AdamW)": ["optimizer=adamw8bit"],
    "LoRA r16": LORA,
    "LoRA r16, int8 base": [*LORA, "adapter.quantize=int8_weight_only"],
    "LoRA r16, int8 base, ckpt": [
        *LORA,
        "adapter.quantize=int8_weight_only",
        "backbone.gradient_checkpointing=true",
    ],
}
PRESETS = {
    "tiny": ["backbone=tiny", "backbone.zero_init_output=false"],
    # the 20B transformer's shape (conf/backbone/qwen_image.yaml's expected_config), random weights, bf16
    "qwen20b": [
        "backbone=qwen_image",
        "backbone.pretrained_path=null",
        "trainer=gpu",
        "trainer.precision=bf16-true",
    ],
}


def config(preset: str, blocks: int | None, variant: list[str], args: argparse.Namespace) -> Any:
    over = [*PRESETS[preset], *variant, f"memory.image_tokens={args.image_tokens}"]
    if args.text_tokens:
        over.append(f"memory.text_tokens={args.text_tokens}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("memory", overrides=over)
    node = OmegaConf.to_container(cfg.backbone, resolve=True)
    tc = transformer_config(node)
    if blocks:
        tc["num_layers"] = blocks
    node.update(transformer_config=tc, pretrained_path=None, expected_config=None)
    with open_dict(cfg):
        cfg.backbone = node
    return cfg


def build(cfg: Any, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if str(cfg.trainer.precision).startswith("bf16") else None
    tc = cfg.backbone.transformer_config
    with torch.device(device):
        backbone = instantiate(cfg.backbone)(latent_channels=int(tc.in_channels) // 4)
        if dtype is not None:
            backbone.to(dtype)  # bf16-true: Lightning casts the module
        backbone.freeze_unused_text_tail()
        node = adapters.plain(cfg.adapter)
        if adapters.is_enabled(node):
            adapters.apply_adapter(backbone, {**node, "init_from": None})
            base_dtype, scheme = frozen_base.options(node)
            if base_dtype is not None or scheme is not None:
                frozen_base.reduce_frozen_base(backbone, dtype=base_dtype, quantize=scheme)
    optimizer = instantiate(cfg.optimizer)(backbone.trainable_parameter_groups(0.01))
    return backbone.train(), optimizer


def batch(cfg: Any, backbone: torch.nn.Module, device: str) -> tuple:
    meta, shapes = step_inputs(cfg, backbone, next(backbone.parameters()).dtype)
    g = torch.Generator().manual_seed(0)

    def real(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bool:
            return torch.ones(t.shape, dtype=torch.bool, device=device)
        return torch.rand(t.shape, generator=g).to(device=device, dtype=t.dtype)

    return tuple([real(r) for r in x] if isinstance(x, list) else real(x) for x in meta), shapes


def step(backbone: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: tuple) -> None:
    backbone(*inputs).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def cpu_peak(backbone: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: tuple) -> int:
    """Peak bytes of every tensor (parameters included) during one step, from torch's CPU memory profiler."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        step(backbone, optimizer, inputs)
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.asarray(sizes).sum(1).max())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks (default: the preset's)")
    ap.add_argument("--image-tokens", type=int, default=2048)
    ap.add_argument("--text-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cfgs = {v: config(args.preset, args.blocks, VARIANTS[v], args) for v in args.variants}
    estimates = {v: estimate(cfg).counts.total for v, cfg in cfgs.items()}
    times: dict[str, list[float]] = {v: [] for v in cfgs}
    peaks: dict[str, int] = {}
    shapes = None
    # One variant's model at a time (the GPU holds one 20B-shaped model): build, warm up, time, measure, free.
    for v, cfg in cfgs.items():
        backbone, optimizer = build(cfg, args.device)
        inputs, shapes = batch(cfg, backbone, args.device)
        for _ in range(args.warmup):
            step(backbone, optimizer, inputs)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            sync(args.device)
            t = time.perf_counter()
            step(backbone, optimizer, inputs)
            sync(args.device)
            times[v].append(time.perf_counter() - t)
        peaks[v] = (
            torch.cuda.max_memory_allocated()
            if args.device == "cuda"
            else cpu_peak(backbone, optimizer, inputs)
        )
        del backbone, optimizer, inputs
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    load_after = os.getloadavg()
    base = args.variants[0]
    rows = []
    for v in cfgs:
        med = statistics.median(times[v])
        rows.append(
            {
                "variant": v,
                "s_per_step": med,
                "time_ratio": med / statistics.median(times[base]),
                "peak_bytes": peaks[v],
                "peak_ratio": peaks[v] / peaks[base],
                "estimate_bytes": estimates[v],
            }
        )
    print(
        f"{args.preset} on {args.device}, step {shapes}, {args.threads} thread(s), load {load_before} -> {load_after}"
    )
    print(f"{'variant':<28} {'s/step':>8} {'time ×':>7} {'peak MB':>9} {'peak ×':>7} {'estimate MB':>12}")
    for r in rows:
        print(
            f"{r['variant']:<28} {r['s_per_step']:>8.3f} {r['time_ratio']:>7.2f} {r['peak_bytes'] / 1e6:>9.1f} "
            f"{r['peak_ratio']:>7.2f} {r['estimate_bytes'] / 1e6:>12.1f}"
        )
    if args.record:
        out = HERE / f"results_{args.device}_{args.preset}.json"
        device = (
            torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or platform.machine()
        )
        meta = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device,
            "torch": torch.__version__,
            "threads": args.threads,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "cpu_count": os.cpu_count(),
            "args": vars(args),
            "shapes": shapes,
        }
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
