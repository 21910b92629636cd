"""Memory options for one-GPU users (issue 20): a reduced frozen base under an adapter, 8-bit AdamW, block swap and
``rededit-memory``'s estimate, each checked on the CPU.

* ``adapter.quantize`` (int8 / fp8 weight-only, torchao) and ``adapter.base_dtype``: the quantised model is exactly the
  full-precision model with the dequantised weights (outputs and adapter gradients), no dequantised weight is saved for
  the backward, only the adapter gets gradients, and the outputs stay within the format's measured error of the
  original model (tolerances below).
* ``optimizer=adamw8bit``: trains (loss decreases), its state is ≈ 4× smaller than AdamW's, and a checkpoint resumes
  it exactly (``torch.load(weights_only=True)`` and a Lightning run).
* ``backbone.block_swap``: outputs and gradients equal the unswapped model's, with and without gradient checkpointing,
  and the streamed blocks run on copies while their weights stay on the host (through ``.to()`` too). On this
  CPU-only machine the CPU is both sides of the copy; the CUDA stream / pinned-memory path needs a GPU.
* ``rededit-memory``: parameter, gradient and optimizer bytes equal the real tensors' exactly; the activation count is
  within [0.8, 1.5] of the peak measured by torch's CPU memory profiler (measured 0.95-1.29 on the tiny configs).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from conftest import compose, untrained_tiny_stage
from rededit.models import adapters, frozen_base
from rededit.models.block_swap import BlockSwap

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
torchao = pytest.importorskip("torchao")  # the [memory] extra: quantised base and 8-bit AdamW

LIVE = ("backbone.zero_init_output=false",)  # the tiny preset's zero proj_out would hide the blocks
LORA = ("adapter=lora", "adapter.rank=4")
# v-prediction: the output is the transformer's (x0-mode's σ division and source residual would rescale the error)
V_PRED = ("backbone.prediction=v", "backbone.source_residual=false")


def _inputs(backbone, seed: int = 0, b: int = 2) -> tuple:
    g = torch.Generator().manual_seed(seed)
    c = backbone.latent_channels
    dim = backbone.transformer.config.joint_attention_dim
    x, ref = torch.randn(b, c, 4, 6, generator=g), torch.randn(b, c, 4, 6, generator=g)
    return (
        x,
        [ref],
        torch.tensor([0.3, 0.8])[:b],
        torch.randn(b, 5, dim, generator=g),
        torch.ones(b, 5, dtype=bool),
    )


@torch.no_grad()
def _perturb_adapter(backbone, scale: float = 0.05) -> None:
    """Move the adapter off its identity init by a realistic amount (a trained LoRA's update)."""
    g = torch.Generator().manual_seed(1)
    for name, p in backbone.named_parameters():
        if name in set(adapters.adapter_parameter_names(backbone)):
            p.add_(scale * torch.randn(p.shape, generator=g))


def _forward_backward(backbone, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    backbone.zero_grad(set_to_none=True)
    out = backbone(*inputs)
    out.float().square().mean().backward()
    return out.detach().float(), {
        n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def lora_backbone(tmp_path_factory):
    stage, _ = untrained_tiny_stage(tmp_path_factory.mktemp("q"), *LIVE, *LORA, *V_PRED)
    backbone = stage.backbone.train()
    _perturb_adapter(backbone)
    return backbone


# --------------------------------------------------------------------------------------------- frozen base
@pytest.mark.parametrize("scheme", ["int8_weight_only", "float8_weight_only"])
def test_quantised_base_is_the_dequantised_model_and_only_the_adapter_learns(lora_backbone, scheme) -> None:
    inputs = _inputs(lora_backbone)
    out0, _ = _forward_backward(lora_backbone, inputs)
    quant = copy.deepcopy(lora_backbone)
    done = frozen_base.reduce_frozen_base(quant, quantize=scheme)
    linears = [(n, m) for n, m in quant.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    quantised = {n for n, m in linears if frozen_base.is_quantized(m.weight)}
    assert done["quantized"] == len(quantised) > 0
    assert all(n.startswith("transformer_blocks.") for n in quantised)  # embedders / output head stay exact
    assert not any(".lora_" in n for n in quantised)  # the adapter is never quantised and stays fp32
    assert {p.dtype for p in quant.parameters() if p.requires_grad} == {torch.float32}
    # Reference: the full-precision model holding deq(Q(W)) in every quantised layer.
    dequant = copy.deepcopy(lora_backbone)
    with torch.no_grad():
        for name in quantised:
            dequant.transformer.get_submodule(name).weight.copy_(
                quant.transformer.get_submodule(name).weight.dequantize()
            )
    out_q, grads_q = _forward_backward(quant, inputs)
    out_d, grads_d = _forward_backward(dequant, inputs)
    torch.testing.assert_close(out_q, out_d, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in quant.named_parameters() if p.requires_grad}
    assert set(grads_q) == trainable == set(adapters.adapter_parameter_names(quant))
    for n in trainable:
        torch.testing.assert_close(grads_q[n], grads_d[n], rtol=1e-4, atol=1e-6)
    # Error against the original model, within the storage format's rounding (measured 2.1e-3 for int8's per-row
    # 8-bit grid, 1.4e-2 for fp8 e4m3's 3 mantissa bits); and it is not zero: the weights did change.
    limit = {"int8_weight_only": 1e-2, "float8_weight_only": 5e-2}[scheme]
    assert 1e-5 < _rel(out_q, out0) < limit
    # No dequantised weight is kept for the backward (torchao's own linear saves one per layer).
    weight_shapes = {tuple(m.weight.shape) for n, m in linears if n in quantised}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        quant(*inputs)
    assert not weight_shapes & set(saved)


def test_bf16_base_keeps_the_adapter_fp32_within_bf16_error(lora_backbone) -> None:
    inputs = _inputs(lora_backbone)
    out0, _ = _forward_backward(lora_backbone, inputs)
    half = copy.deepcopy(lora_backbone)
    frozen_base.reduce_frozen_base(half, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}
    out_h, grads = _forward_backward(half, inputs)
    assert set(grads) == set(adapters.adapter_parameter_names(half))
    # bf16 keeps 8 mantissa bits: the whole model in bf16 (what Qwen-Image ships) is the yardstick.
    whole = copy.deepcopy(lora_backbone).to(torch.bfloat16)
    with torch.no_grad():
        err_whole = _rel(whole(*inputs).float(), out0)
    assert 0 < _rel(out_h, out0) <= 1.2 * err_whole + 1e-3


def test_stage_reduces_the_base_after_the_adapter_and_refuses_bad_options(tmp_path) -> None:
    stage, _ = untrained_tiny_stage(tmp_path, *LIVE, *LORA, "adapter.quantize=int8_weight_only")
    backbone = stage.backbone
    assert frozen_base.is_reduced(backbone)
    q = backbone.transformer.transformer_blocks[0].attn.to_q
    assert frozen_base.is_quantized(q.base_layer.weight) and not frozen_base.is_quantized(
        q.lora_A.default.weight
    )
    plain, _ = untrained_tiny_stage(tmp_path / "plain", *LIVE, *LORA)
    assert stage._base_fingerprint == pytest.approx(plain._base_fingerprint)  # recorded before quantising
    from hydra.errors import InstantiationException

    refused = (frozen_base.FrozenBaseError, InstantiationException)  # Hydra wraps the stage's error
    with pytest.raises(refused, match="adapter=none"):
        untrained_tiny_stage(tmp_path / "none", "+adapter.quantize=int8_weight_only")
    with pytest.raises(refused, match=r"adapter\.quantize must be"):
        untrained_tiny_stage(tmp_path / "bad", *LORA, "adapter.quantize=int4")


# --------------------------------------------------------------------------------------------- 8-bit AdamW
def _adamw8bit(params, **kw):
    from rededit.utils.adamw8bit import AdamW8bit

    return AdamW8bit(params, lr=kw.pop("lr", 3e-3), weight_decay=0.0, **kw)


def test_adamw8bit_trains_with_a_quarter_of_the_state_and_resumes_exactly(tmp_path) -> None:
    from rededit.utils.adamw8bit import quantized_state, state_bytes

    stage, _ = untrained_tiny_stage(tmp_path, *LIVE, *V_PRED)
    model = stage.backbone.train()
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = _inputs(model)
    target = torch.randn_like(model(*inputs).detach())

    def step(m, opt) -> float:
        opt.zero_grad(set_to_none=True)
        loss = (m(*inputs) - target).square().mean()
        loss.backward()
        opt.step()
        return float(loss)

    opt = _adamw8bit(params)
    losses = [step(model, opt) for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0]
    # State: exactly the formula; ≈ 4× smaller than AdamW's on the tensors it quantises.
    real = {id(p): sum(frozen_base.tensor_nbytes(v) for v in opt.state[p].values()) for p in params}
    assert all(real[id(p)] == state_bytes(p.numel()) for p in params)
    big = [p for p in params if quantized_state(p.numel(), 256)]
    assert big, "the tiny model has tensors the 8-bit state applies to"
    adamw = sum(2 * 4 * p.numel() + 4 for p in big)
    assert 3.8 < adamw / sum(real[id(p)] for p in big) < 4.0
    # Round trip through a checkpoint file read with weights_only=True: the next steps are identical.
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = copy.deepcopy(model)
    twin.load_state_dict(saved["model"])
    opt2 = _adamw8bit([p for p in twin.parameters() if p.requires_grad])
    opt2.load_state_dict(saved["opt"])
    assert [step(model, opt) for _ in range(2)] == [step(twin, opt2) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


@pytest.mark.slow  # three short CPU runs (~20 s)
def test_adamw8bit_lightning_checkpoint_resumes_exactly(tiny_corpus, tmp_path) -> None:
    from conftest import read_step_metric, train_overrides
    from rededit.train import run
    from rededit.utils.adamw8bit import PLAIN_KEY
    from test_resume import COMMON

    def train(out, steps, *extra):
        run(
            compose(
                train_overrides(tiny_corpus, *COMMON, "optimizer=adamw8bit", *extra, steps=steps, budget=256),
                out,
            )
        )
        return out

    a = train(tmp_path / "A", 3, "data.split=train")
    b = train(tmp_path / "B", 2, "data.split=train")
    c = train(tmp_path / "C", 3, "data.split=train", f"ckpt_path={b}/checkpoints/last.ckpt")
    la, lc = read_step_metric(a), read_step_metric(c)
    assert lc[3] == la[3] and len(set(la.values())) == 3
    ka = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    kc = torch.load(c / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(ka["state_dict"][k], kc["state_dict"][k]) for k in ka["state_dict"])
    sa, sc = ka["optimizer_states"][0]["state"], kc["optimizer_states"][0]["state"]
    # 8-bit moments are written as plain tensors (weights_only reads them; no class is rebuilt from the file)
    assert any(isinstance(s["exp_avg"], dict) and s["exp_avg"][PLAIN_KEY] for s in sa.values())
    for i in sa:
        for m in ("exp_avg", "exp_avg_sq"):
            a, c = sa[i][m], sc[i][m]
            if isinstance(a, dict):
                assert all(torch.equal(a[k], c[k]) for k in ("codes", "scale", "qmap"))
            else:
                assert torch.equal(a, c)


# --------------------------------------------------------------------------------------------- block swap
@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_equals_no_swap_and_streams_copies(lora_backbone, checkpointing) -> None:
    ref = copy.deepcopy(lora_backbone)
    ref.set_gradient_checkpointing(checkpointing)
    inputs = _inputs(ref)
    out_ref, grads_ref = _forward_backward(ref, inputs)
    swapped = copy.deepcopy(ref)
    swap = BlockSwap(swapped.transformer, 1, device="cpu")  # device="cpu": a real copy on a CPU-only machine
    layer = swapped.transformer.transformer_blocks[-1].attn.to_q.base_layer
    host = layer.weight
    used = []
    layer.register_forward_hook(lambda m, a, o: used.append(m.weight))
    out, grads = _forward_backward(swapped, inputs)
    assert torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys() and all(torch.equal(grads[k], grads_ref[k]) for k in grads)
    # Forward (and, under checkpointing, the backward's recompute) ran on copies, one per pass; the host is back.
    assert len(used) == 1 + checkpointing and all(
        u is not host and u.data_ptr() != host.data_ptr() for u in used
    )
    assert swap.copies == 1 + checkpointing and layer.weight is host and not swap._restore


def test_block_swap_keeps_frozen_weights_on_the_host_through_to(lora_backbone) -> None:
    model = copy.deepcopy(lora_backbone)
    BlockSwap(model.transformer, 1)
    model.to("meta")  # stands for .to("cuda"): every tensor moves but the streamed blocks' frozen weights
    blocks = model.transformer.transformer_blocks
    last = blocks[-1]
    assert {p.device.type for p in last.parameters() if not p.requires_grad} == {"cpu"}
    assert {p.device.type for p in last.parameters() if p.requires_grad} == {"meta"}
    assert {p.device.type for p in blocks[0].parameters()} == {"meta"}
    twin = copy.deepcopy(lora_backbone)
    BlockSwap(twin.transformer, 1)
    twin.double()  # a dtype change reaches the host copies
    assert {p.dtype for p in twin.transformer.transformer_blocks[-1].parameters()} == {torch.float64}


def test_block_swap_with_a_quantised_base_and_a_deepcopy(lora_backbone) -> None:
    quant = copy.deepcopy(lora_backbone)
    frozen_base.reduce_frozen_base(quant, quantize="int8_weight_only")
    quant.set_gradient_checkpointing(True)
    inputs = _inputs(quant)
    out_ref, grads_ref = _forward_backward(quant, inputs)
    swapped = copy.deepcopy(quant)
    BlockSwap(swapped.transformer, 2, device="cpu")
    twin = copy.deepcopy(swapped)  # hooks bound to a copied BlockSwap over the copied blocks
    for model in (swapped, twin):
        out, grads = _forward_backward(model, inputs)
        assert torch.equal(out, out_ref) and all(torch.equal(grads[k], grads_ref[k]) for k in grads_ref)
    assert twin.transformer.transformer_blocks[0]._forward_pre_hooks  # the copy has its own hooks


def test_backbone_option_and_stage(tmp_path) -> None:
    stage, _ = untrained_tiny_stage(tmp_path, *LIVE, *LORA, "backbone.block_swap=1")
    swap = stage.backbone.block_swap
    assert isinstance(swap, BlockSwap) and swap.swapped == {1}
    with pytest.raises(ValueError, match="block_swap must be in"):
        untrained_tiny_stage(tmp_path / "bad", "backbone.block_swap=3")


# --------------------------------------------------------------------------------------------- rededit-memory
def _compose_memory(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rededit.utils.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("memory", overrides=["backbone.transformer_config.num_layers=2", *overrides])


def _real_bytes(stage, optimizer) -> dict[str, int]:
    from rededit.models.memory_estimate import unique_parameters

    params = [p for _, p in unique_parameters(stage.backbone)]
    return {
        "parameters": sum(frozen_base.tensor_nbytes(p) for p in params),
        "gradients": sum(frozen_base.tensor_nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer_state": sum(
            frozen_base.tensor_nbytes(v) for s in optimizer.state.values() for v in s.values()
        ),
    }


@pytest.mark.parametrize(
    "overrides",
    [
        (),  # full fine-tune, AdamW
        ("optimizer=adamw8bit",),
        (*LORA, "adapter.quantize=int8_weight_only"),
        (*LORA, "adapter.base_dtype=bfloat16", "adapter.quantize=float8_weight_only"),
    ],
    ids=["full-adamw", "full-adamw8bit", "lora-int8", "lora-bf16-fp8"],
)
def test_estimate_equals_the_real_tensors(overrides, tmp_path) -> None:
    from rededit.stages.memory import estimate

    est = estimate(_compose_memory(*LIVE, *overrides)).counts
    stage, _ = untrained_tiny_stage(tmp_path, *LIVE, *overrides)
    optimizer = stage.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    backbone = stage.backbone.train()
    backbone(*_inputs(backbone)).float().square().mean().backward()
    optimizer.step()
    real = _real_bytes(stage, optimizer)
    assert (est.parameters, est.gradients, est.optimizer_state) == (
        real["parameters"],
        real["gradients"],
        real["optimizer_state"],
    )


def test_estimate_shards_and_streams() -> None:
    from rededit.stages.memory import estimate

    one = estimate(_compose_memory(*LIVE)).counts
    fsdp = estimate(_compose_memory(*LIVE, "strategy=fsdp2", "memory.world_size=4")).counts
    assert one.parameters / 4 <= fsdp.parameters < one.parameters / 3.5  # dim-0 shards, padded
    swap = estimate(
        _compose_memory(*LIVE, *LORA, "backbone.transformer_config.num_layers=4", "backbone.block_swap=3")
    )
    full = estimate(_compose_memory(*LIVE, *LORA, "backbone.transformer_config.num_layers=4"))
    # Three streamed blocks, two of them on the device at a time: one block's frozen weights move to the host.
    assert swap.counts.host > 0 and swap.counts.parameters + swap.counts.host == full.counts.parameters


def _measured_activation_peak(backbone, inputs) -> int:
    """Peak bytes of everything but parameters, gradients and optimizer state during a forward + backward,
    from torch's CPU memory profiler (its categorised memory timeline)."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Category, MemoryProfileTimeline

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        backbone(*inputs).float().square().mean().backward()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
    order = [
        Category.PARAMETER,
        Category.OPTIMIZER_STATE,
        Category.INPUT,
        Category.TEMPORARY,
        Category.ACTIVATION,
        Category.GRADIENT,
        Category.AUTOGRAD_DETAIL,
        None,
    ]  # the timeline's columns 1..8
    keep = [
        1 + order.index(c)
        for c in (Category.INPUT, Category.TEMPORARY, Category.ACTIVATION, Category.AUTOGRAD_DETAIL, None)
    ]
    return int(np.asarray(sizes)[:, keep].sum(1).max())


@pytest.mark.parametrize(
    "overrides",
    [
        ("backbone.gradient_checkpointing=false",),
        pytest.param((*LORA, "backbone.gradient_checkpointing=true"), marks=pytest.mark.slow),
        pytest.param(
            (*LORA, "adapter.quantize=int8_weight_only", "backbone.gradient_checkpointing=true"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["full", "lora-ckpt", "lora-int8-ckpt"],
)
def test_activation_estimate_against_the_cpu_memory_profiler(overrides, tmp_path) -> None:
    from rededit.models.memory_estimate import activation_bytes
    from rededit.stages.memory import build_meta_backbone, step_inputs

    cfg = _compose_memory(
        *LIVE, *overrides, "backbone.transformer_config.num_layers=4", "memory.image_tokens=1024"
    )
    meta = build_meta_backbone(cfg)
    meta_inputs, _ = step_inputs(cfg, meta, torch.float32)
    checkpointing = bool(meta.transformer.gradient_checkpointing)
    est, _ = activation_bytes(meta.train(), meta_inputs, checkpointing=checkpointing)
    stage, _ = untrained_tiny_stage(tmp_path, *LIVE, *overrides, "backbone.transformer_config.num_layers=4")
    g = torch.Generator().manual_seed(0)
    inputs = tuple(
        [torch.randn(r.shape, generator=g) for r in x]
        if isinstance(x, list)
        else torch.ones(x.shape, dtype=torch.bool)
        if x.dtype == torch.bool
        else torch.rand(x.shape, generator=g)
        for x in meta_inputs
    )
    measured = _measured_activation_peak(stage.backbone.train(), inputs)
    assert 0.8 <= measured / est <= 1.5, (measured, est)


@pytest.mark.slow  # a short CPU run with export (~10 s)
def test_quantised_run_exports_the_original_base(tiny_corpus, tmp_path) -> None:
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from conftest import train_overrides
    from rededit.stages.checkpoints import export_editor
    from rededit.train import run
    from test_resume import COMMON

    stage, cfg = untrained_tiny_stage(tmp_path / "base_run", *LIVE)
    base = export_editor(stage.backbone, tmp_path / "base", config_yaml=OmegaConf.to_yaml(cfg, resolve=True))
    out = tmp_path / "run"
    extra = (*LORA, "adapter.quantize=int8_weight_only", "backbone.block_swap=1", f"stage.init_from={base}")
    overrides = train_overrides(
        tiny_corpus, *COMMON, "data.split=train", *extra, f"export_dir={out}/export", steps=2
    )
    run(compose(overrides, out))
    # The export's base is the source's full-precision base (not a dequantised one), the adapter beside it.
    want, got = (
        load_file(base / "backbone_raw.safetensors"),
        load_file(out / "export" / "backbone_raw.safetensors"),
    )
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (out / "export" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # a subprocess building two tiny variants (~15 s)
def test_adapter_benchmark_smoke() -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "adapter" / "run.py"
    args = [
        "--steps",
        "1",
        "--warmup",
        "0",
        "--image-tokens",
        "256",
        "--variants",
        "full (AdamW)",
        "LoRA r16",
    ]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=True
    ).stdout
    assert "LoRA r16" in out and "estimate MB" in out
