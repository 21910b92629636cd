"""Benchmark: training throughput, MFU and peak memory of a ~1B-parameter editor backbone at 1024².

Question (issue 7, report §3.2): with bf16 + FSDP2 (``rededit.parallel.parallelize_backbone``) +
activation checkpointing + ``torch.compile``, how many tokens/s and what model-FLOPs utilisation does
one H100 reach, and what does each ingredient cost in peak memory?

Setup: a fresh ``QwenImageTransformer2DModel`` inside ``EditBackbone`` (same classes as production,
random weights: nothing is downloaded) with ``--layers`` blocks of width ``heads × head_dim``
(default 12 × (16 × 128 = 2048) ≈ 1.0B parameters), 16 latent channels (Qwen-Image VAE, ÷8): a 1024²
target + one 1024² reference = 2 × 64 × 64 = 8192 image tokens, plus ``--text-len`` text tokens.
Per step: forward, rectified-flow MSE, backward, AdamW step (fp32 master weights, sharded state).

Configurations (each a fresh process group of this one process, world size 1 on one GPU):

* ``fp32``         — no FSDP, fp32 (reference; may run out of memory at 1024²)
* ``bf16_fsdp2``   — FSDP2 mixed precision (bf16 compute, fp32 reduce/master)
* ``+ac``          — … + per-block activation checkpointing
* ``+ac+compile``  — … + ``torch.compile`` of each block

MFU = (6 · N_params · S + 12 · n_layers · S² · D) · B / step_time / peak, with S the joint sequence
length, D the width and peak the dense bf16 peak of the device (``--peak-tflops``, 989 for H100 SXM);
recomputation by activation checkpointing is not counted (model FLOPs, not hardware FLOPs).

    torchrun --nproc_per_node 1 experiments/benchmarks/scale_out/run.py --record      # one H100
    python experiments/benchmarks/scale_out/run.py --device cpu --tiny --steps 2       # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
CONFIGS = ("fp32", "bf16_fsdp2", "bf16_fsdp2+ac", "bf16_fsdp2+ac+compile")


def build_backbone(args: argparse.Namespace) -> torch.nn.Module:
    from rededit.models.backbone import EditBackbone

    cfg = {
        "num_layers": args.layers,
        "attention_head_dim": args.head_dim,
        "num_attention_heads": args.heads,
        "joint_attention_dim": args.text_dim,
        "axes_dims_rope": [args.head_dim // 4, 3 * args.head_dim // 8, 3 * args.head_dim // 8],
    }
    return EditBackbone(transformer_config=cfg, latent_channels=16, zero_cond_t=True)


def model_flops_per_step(n_params: int, seq: int, layers: int, width: int, batch: int) -> float:
    return float(batch * (6 * n_params * seq + 12 * layers * seq * seq * width))


def run_config(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from rededit.parallel import ParallelPlan, build_mesh, parallelize_backbone

    torch.manual_seed(0)
    backbone = build_backbone(args)
    n_params = sum(p.numel() for p in backbone.parameters())
    backbone.freeze_unused_text_tail()
    if name == "fp32":
        backbone.to(device)
    else:
        plan = ParallelPlan(
            param_dtype="bf16",
            reduce_dtype="fp32",
            activation_checkpointing="+ac" in name,
        )
        parallelize_backbone(backbone, build_mesh(dist.get_world_size(), device_type=device.type), plan)
    if "+compile" in name:
        for block in backbone.transformer.transformer_blocks:
            block.compile()
    opt = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-5)
    b, f = args.batch, 8
    h = w = args.resolution // f
    x0 = torch.randn(b, 16, h, w, device=device)
    ref = torch.randn(b, 16, h, w, device=device)
    text = torch.randn(b, args.text_len, args.text_dim, device=device)
    mask = torch.ones(b, args.text_len, dtype=torch.bool, device=device)
    seq = 2 * (h // 2) * (w // 2) + args.text_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        sigma = torch.rand(b, device=device)
        eps = torch.randn_like(x0)
        x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
        v_hat = backbone(x_t, [ref], sigma, text, mask)
        loss = (v_hat.float() - (eps - x0)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    width = args.heads * args.head_dim
    flops = model_flops_per_step(n_params, seq, args.layers, width, b)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "config": name,
        "params_B": n_params / 1e9,
        "seq_len": seq,
        "step_s": step_s,
        "tokens_per_s": b * seq / step_s,
        "mfu": flops / step_s / (args.peak_tflops * 1e12),
        "peak_mem_GiB": peak_mem,
        "loss": float(loss.detach()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--text-dim", type=int, default=2048)
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: 2 layers of width 64 at 64²")
    parser.add_argument("--record", action="store_true", help="write results.json beside this script")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.heads, args.head_dim, args.text_dim = 2, 2, 32, 64
        args.resolution, args.text_len, args.warmup = 64, 8, 1
    device = torch.device(args.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rows = []
    for name in args.configs:
        try:
            rows.append(run_config(name, args, device))
        except torch.OutOfMemoryError:
            rows.append({"config": name, "error": "out of memory"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]))
    dist.destroy_process_group()
    print("| config | tokens/s | MFU | peak memory (GiB) | step (s) |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | — | — | {r['error']} | — |")
        else:
            print(
                f"| {r['config']} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f} % | "
                f"{r['peak_mem_GiB']:.1f} | {r['step_s']:.3f} |"
            )
    if args.record:
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "args": vars(args),
        }
        (HERE / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
