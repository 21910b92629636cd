"""Adapter training (issue 20): LoRA / LoKr / LoHa through diffusers' PEFT integration, in every stage.

* The adapter goes on the default targets except the frozen text tail; only adapter (and FireEdit) weights train;
  at init (``init: true``) the adapted backbone predicts exactly what the base does.
* An adapter run's checkpoint holds only the trainable tensors, its EMA only those, and it records the adapter;
  stop + resume equals the uninterrupted run bit for bit (tests/test_resume.py's setting and helpers).
* Export: ``transformer/`` = the base, ``adapter/`` = a PEFT folder that ``PeftModel.from_pretrained`` loads and
  ``adapter.init_from`` starts from; the diffusers LoRA file loaded by ``QwenImageEditPlusPipeline.load_lora_weights``
  edits exactly as rededit's editor with the adapter (tiny pipeline folder of tests/tiny_pipeline.py).
* ``load_editor`` applies the adapter of an export and of a run folder; ``rededit-consolidate --merge-adapter``
  writes a plain editor with the same outputs (atol 1e-5, fp32); ``stage.init_from`` of the export is that model.
* DPO's reference is the same backbone with the adapter off (no second backbone: parameter count) and predicts
  what the base does; NFT's old policy is a second adapter, soft-updated and checkpointed as before.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import compose, read_step_metric, train_overrides, untrained_tiny_stage
from rededit.models import adapters
from rededit.models.backbone import EditBackbone
from rededit.train import run
from test_resume import COMMON, _ckpt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOTAL, STOP = 4, 2
# The tiny preset zero-initialises proj_out (its output ignores the blocks at init): a base for adapters must not.
LIVE = "backbone.zero_init_output=false"
LORA = ("adapter=lora", "adapter.rank=4", "adapter.alpha=8", "optimizer.lr=1e-2")


def _inputs(backbone: EditBackbone, seed: int = 0) -> tuple:
    """A batch of backbone inputs (x_t, [ref], σ, text, mask) for the tiny preset."""
    g = torch.Generator().manual_seed(seed)
    c = backbone.latent_channels
    x, ref = torch.randn(2, c, 4, 6, generator=g), torch.randn(2, c, 4, 6, generator=g)
    dim = backbone.transformer.config.joint_attention_dim
    text = torch.randn(2, 5, dim, generator=g)
    return x, [ref], torch.tensor([0.3, 0.8]), text, torch.ones(2, 5, dtype=torch.bool)


def _plain_base(backbone: EditBackbone, cfg) -> EditBackbone:
    """A plain EditBackbone (no adapter) holding ``backbone``'s base weights."""
    from hydra.utils import instantiate

    plain = instantiate(cfg.backbone)(latent_channels=backbone.latent_channels)
    plain.load_state_dict(adapters.base_state_dict(backbone), strict=True)
    return plain.eval()


@torch.no_grad()
def _perturb_adapter(backbone: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Move the adapter away from its identity init (so adapted ≠ base)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in backbone.named_parameters():
        if name in set(adapters.adapter_parameter_names(backbone)):
            p.add_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_adapter_targets_trainables_and_identity_init(kind, tmp_path) -> None:
    stage, cfg = untrained_tiny_stage(
        tmp_path, LIVE, f"adapter={kind}", "adapter.rank=4", "backbone.tati=true"
    )
    backbone = stage.backbone
    layers = dict(adapters.tuner_layers(backbone.transformer))
    last = len(backbone.transformer.transformer_blocks) - 1
    want = {f"transformer_blocks.{i}.{t}" for i in range(last + 1) for t in adapters.DEFAULT_TARGETS}
    tail = set(adapters.frozen_tail_modules(backbone))
    targets_in_tail = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    assert {f"transformer_blocks.{last}.{m}" for m in targets_in_tail} <= tail
    assert set(layers) == want - tail  # every default target but the frozen text tail
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    own = set(adapters.adapter_parameter_names(backbone))
    assert own and trainable == own | {n for n, _ in backbone.named_parameters() if n.startswith("tati.")}
    groups = stage.configure_optimizers().param_groups
    assert {id(p) for g in groups for p in g["params"]} == {
        id(p) for n, p in backbone.named_parameters() if n in trainable
    }
    # init: true starts from the base exactly
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(*_inputs(backbone)), _plain_base(backbone, cfg)(*_inputs(backbone)), rtol=0, atol=0
        )
        _perturb_adapter(backbone)
        assert (
            backbone(*_inputs(backbone)) - _plain_base(backbone, cfg)(*_inputs(backbone))
        ).abs().max() > 1e-3


def test_modulation_flag_and_bad_options(tmp_path) -> None:
    stage, _ = untrained_tiny_stage(tmp_path, "adapter=lora", "adapter.modulation=true")
    layers = set(dict(adapters.tuner_layers(stage.backbone.transformer)))
    assert {"transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mod.1"} <= layers
    with pytest.raises(adapters.AdapterError, match=r"adapter\.type must be"):
        adapters.adapter_type({"type": "ia3"})
    with pytest.raises(adapters.AdapterError, match="repeats"):
        adapters.build_peft_config({"type": "lora", "rank": 4, "options": {"r": 8}})


# --------------------------------------------------------------------------------------------- training + resume
@pytest.fixture(scope="module")
def base_export(tmp_path_factory) -> Path:
    """An untrained 2-block tiny editor export (live output layer): the adapter runs' base (stage.init_from)."""
    from omegaconf import OmegaConf

    from rededit.stages.checkpoints import export_editor

    root = tmp_path_factory.mktemp("base")
    stage, cfg = untrained_tiny_stage(root / "run", LIVE)
    return export_editor(stage.backbone, root / "export", config_yaml=OmegaConf.to_yaml(cfg, resolve=True))


def _lora_run(corpus: Path, out: Path, base: Path, steps: int, *extra: str) -> Path:
    split = ("data.split=train",)
    overrides = train_overrides(
        corpus, *COMMON, *split, *LORA, f"stage.init_from={base}", *extra, steps=steps, budget=256
    )
    run(compose(overrides, out))
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_corpus, base_export, tmp_path_factory) -> Path:
    """TOTAL steps of LoRA pretraining (EMA, curriculum) from the base export, exported."""
    out = tmp_path_factory.mktemp("lora_A")
    return _lora_run(tiny_corpus, out, base_export, TOTAL, f"export_dir={out}/export")


@pytest.mark.slow  # three CPU runs / a pipeline folder: ~15-40 s
def test_checkpoint_holds_only_trainables_and_resume_is_exact(
    lora_run, tiny_corpus, base_export, tmp_path
) -> None:
    a = _ckpt(lora_run / "checkpoints" / "last.ckpt")
    record = a[adapters.CHECKPOINT_KEY]
    assert record["type"] == "lora" and record["node"]["rank"] == 4 and record["base_fingerprint"] > 0
    keys = set(a["state_dict"])
    assert keys and all(".lora_A.default." in k or ".lora_B.default." in k for k in keys), sorted(keys)[:3]
    assert set(a["callbacks"]["EMA"]["shadow"]) == {k.removeprefix("backbone.") for k in keys}
    assert len(a["optimizer_states"][0]["state"]) == len(keys)
    run_b = _lora_run(tiny_corpus, tmp_path / "B", base_export, STOP)
    run_c = _lora_run(
        tiny_corpus, tmp_path / "C", base_export, TOTAL, f"ckpt_path={run_b}/checkpoints/last.ckpt"
    )
    losses_a, losses_c = read_step_metric(lora_run), read_step_metric(run_c)
    assert losses_c == {s: losses_a[s] for s in range(STOP + 1, TOTAL + 1)}
    assert len(set(losses_a.values())) == TOTAL  # the steps differ: the comparison has teeth
    c = _ckpt(run_c / "checkpoints" / "last.ckpt")
    assert a["state_dict"].keys() == c["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])
    ea, ec = a["callbacks"]["EMA"]["shadow"], c["callbacks"]["EMA"]["shadow"]
    assert all(torch.equal(ea[k], ec[k]) for k in ea)
    oa, oc = a["optimizer_states"][0]["state"], c["optimizer_states"][0]["state"]
    assert all(torch.equal(oa[i][m], oc[i][m]) for i in oa for m in ("exp_avg", "exp_avg_sq"))


def test_checkpoint_hooks_keep_trainables_and_refuse_another_adapter_or_base(tmp_path) -> None:
    stage, _ = untrained_tiny_stage(tmp_path, "adapter=lora", "adapter.rank=4", "adapter.alpha=8")
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in stage.backbone.state_dict().items()}}
    stage.on_save_checkpoint(ckpt)
    trainable = {f"backbone.{n}" for n in adapters.adapter_parameter_names(stage.backbone)}
    assert set(ckpt["state_dict"]) == trainable and ckpt["adapter"]["type"] == "lora"
    stage.on_load_checkpoint(ckpt)  # the same adapter and base: accepted
    stage, _ = untrained_tiny_stage(tmp_path, "adapter=lora", "adapter.rank=8")
    with pytest.raises(adapters.AdapterError, match="differs"):
        adapters.check_checkpoint(ckpt, stage.adapter, stage.backbone, ckpt["adapter"]["base_fingerprint"])
    stage, _ = untrained_tiny_stage(tmp_path, "adapter=lora", "adapter.rank=4", "adapter.alpha=8")
    with pytest.raises(adapters.AdapterError, match="base rebuilt"):
        adapters.check_checkpoint(
            ckpt, stage.adapter, stage.backbone, ckpt["adapter"]["base_fingerprint"] + 1
        )
    plain, _ = untrained_tiny_stage(tmp_path)
    with pytest.raises(adapters.AdapterError, match="only the weights of an adapter"):
        adapters.check_checkpoint(ckpt, None, plain.backbone, None)


# --------------------------------------------------------------------------------------------- export / loading
@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_merge_equals_the_adapted_model(kind, tmp_path) -> None:
    stage, _ = untrained_tiny_stage(tmp_path, LIVE, f"adapter={kind}", "adapter.rank=4")
    backbone = stage.backbone
    inputs = _inputs(backbone, seed=5)
    with torch.no_grad():
        base = backbone(*inputs)
        _perturb_adapter(backbone, scale=0.1)
        want = backbone(*inputs)
        assert (want - base).abs().max() > 1e-3
        merged = adapters.merged_state(backbone)  # copies; the backbone keeps its adapter
        torch.testing.assert_close(backbone(*inputs), want, rtol=0, atol=0)
        adapters.merge_adapter(backbone)
        assert not adapters.has_adapter(backbone) and not list(adapters.tuner_layers(backbone))
        assert backbone.state_dict().keys() == merged.keys()
        torch.testing.assert_close(backbone(*inputs), want, rtol=0, atol=1e-5)


def test_export_and_load_editor_apply_the_adapter(tmp_path) -> None:
    """export_editor of an adapter backbone: base transformer/ + adapter/ (a PEFT folder peft loads, the start of
    adapter.init_from); load_editor puts the adapter back on."""
    from diffusers import QwenImageTransformer2DModel
    from omegaconf import OmegaConf
    from peft import PeftModel
    from safetensors.torch import load_file

    from rededit.inference.editor import load_editor
    from rededit.stages.checkpoints import export_editor

    stage, cfg = untrained_tiny_stage(
        tmp_path / "run", LIVE, "adapter=lora", "adapter.rank=4", "backbone.tati=true"
    )
    backbone = stage.backbone
    _perturb_adapter(backbone)
    with torch.no_grad():
        for p in backbone.tati.parameters():  # a trained FireEdit module travels as today (backbone_extras)
            p.add_(0.1)
    export = export_editor(backbone, tmp_path / "export", config_yaml=OmegaConf.to_yaml(cfg, resolve=True))
    assert sorted(p.name for p in (export / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lora_comfyui.safetensors",
        "lora_kohya.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    assert not (export / "adapter_raw").exists()  # no EMA: adapter/ holds the raw weights
    # the three single-file formats carry the same LoRA as the PEFT folder (weights and alpha/r)
    from rededit.models.lora_formats import read_lora

    peft_lora = read_lora(export / "adapter").lora
    for name in ("pytorch_lora_weights", "lora_comfyui", "lora_kohya"):
        lora = read_lora(export / "adapter" / f"{name}.safetensors").lora
        assert lora.weights.keys() == peft_lora.weights.keys(), name
        assert all(torch.equal(lora.weights[k], peft_lora.weights[k]) for k in lora.weights), name
        assert lora.scales() == peft_lora.scales(), name
    transformer = load_file(export / "transformer" / "diffusion_pytorch_model.safetensors")
    base = adapters.base_state_dict(backbone)
    assert transformer.keys() == {
        k.removeprefix("transformer.") for k in base if k.startswith("transformer.")
    }
    assert all(torch.equal(v, base[f"transformer.{k}"]) for k, v in transformer.items())
    assert adapters.has_adapter(backbone)  # the live model keeps its peft layers after the export
    inputs = _inputs(backbone, seed=6)
    backbone.eval()
    with torch.no_grad():
        want = backbone(*inputs)
        editor = load_editor(export)
        assert adapters.has_adapter(editor.backbone)
        torch.testing.assert_close(editor.backbone(*inputs), want, rtol=0, atol=0)
        # peft itself loads the PEFT folder onto the base transformer
        peft_model = PeftModel.from_pretrained(
            QwenImageTransformer2DModel.from_pretrained(export / "transformer"), export / "adapter"
        )
        editor.backbone.transformer = peft_model.base_model.model
        torch.testing.assert_close(editor.backbone(*inputs), want, rtol=0, atol=1e-6)
    # adapter.init_from: a new run's adapter starts from the folder's weights
    stage2, _ = untrained_tiny_stage(
        tmp_path / "run2",
        "adapter=lora",
        "adapter.rank=4",
        "backbone.tati=true",
        f"stage.init_from={export}",
        f"adapter.init_from={export}/adapter",
    )
    _, want_state = adapters.load_peft_folder(export / "adapter")
    got = adapters.adapter_state_dict(stage2.backbone)
    assert got.keys() == want_state.keys() and all(torch.equal(got[k], want_state[k]) for k in got)
    # ... or from a single LoRA file of another tool's format, with another alpha: the same start (B rescaled)
    for name in ("lora_kohya", "lora_comfyui", "pytorch_lora_weights"):
        stage3, _ = untrained_tiny_stage(
            tmp_path / f"run_{name}",
            "adapter=lora",
            "adapter.rank=4",
            "adapter.alpha=2",
            "backbone.tati=true",
            f"stage.init_from={export}",
            f"adapter.init_from={export}/adapter/{name}.safetensors",
        )
        with torch.no_grad():
            a = stage2.backbone.eval()(*inputs)
            b = stage3.backbone.eval()(*inputs)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    with pytest.raises(adapters.AdapterError, match=r"rank 4, the run's adapter\.rank is 8"):
        untrained_tiny_stage(
            tmp_path / "run_r8",
            "adapter=lora",
            "adapter.rank=8",
            f"adapter.init_from={export}/adapter/lora_kohya.safetensors",
        )
    with pytest.raises(adapters.AdapterError, match="LORA adapter"):
        untrained_tiny_stage(tmp_path / "run3", "adapter=lokr", f"adapter.init_from={export}/adapter")
    (export / "adapter" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(adapters.AdapterError, match=r"adapter_config\.json: peft_type"):
        adapters.load_peft_folder(export / "adapter")


@pytest.mark.slow  # three CPU runs / a pipeline folder: ~15-40 s
def test_run_export_and_run_folder_hold_the_ema_adapter(lora_run, base_export) -> None:
    """The end-of-fit export of an adapter run: the base untouched in transformer/, the EMA adapter in adapter/ (raw
    in adapter_raw/); load_editor of the export and of the run folder (adapter-only checkpoint) agree."""
    from safetensors.torch import load_file

    from rededit.inference.editor import load_editor

    export = lora_run / "export"
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter_raw/adapter_model.safetensors",
        "adapter/pytorch_lora_weights.safetensors",
    ):
        assert (export / name).is_file(), name
    base = load_file(base_export / "transformer" / "diffusion_pytorch_model.safetensors")
    saved = load_file(export / "transformer" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)
    assert all(
        k.startswith("transformer.")
        for k in load_file(export / "adapter" / "pytorch_lora_weights.safetensors")
    )
    editor = load_editor(export)
    ema = _ckpt(lora_run / "checkpoints" / "last.ckpt")["callbacks"]["EMA"]["shadow"]
    params = dict(editor.backbone.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in ema.items())
    raw = load_editor(export, raw=True)
    raw_params = dict(raw.backbone.named_parameters())
    assert any(not torch.equal(raw_params[k], v) for k, v in ema.items())
    inputs = _inputs(editor.backbone)
    with torch.no_grad():
        ours = editor.backbone(*inputs)
        with adapters.adapters_disabled(editor.backbone):
            assert (ours - editor.backbone(*inputs)).abs().max() > 1e-4
        torch.testing.assert_close(load_editor(lora_run).backbone(*inputs), ours, rtol=0, atol=0)
        torch.testing.assert_close(
            load_editor(lora_run, raw=True).backbone(*inputs), raw.backbone(*inputs), rtol=0, atol=0
        )


@pytest.mark.slow  # three CPU runs / a pipeline folder: ~15-40 s
def test_merge_adapter_consolidation_equals_the_adapted_model(lora_run, tmp_path) -> None:
    from rededit.cli.consolidate import main as consolidate_main
    from rededit.inference.editor import load_editor
    from rededit.stages.checkpoints import load_backbone_state

    adapted = load_editor(lora_run / "export")
    out = tmp_path / "merged"
    assert consolidate_main([str(lora_run), "--merge-adapter", "--out", str(out)]) == 0
    merged = load_editor(out)
    assert not adapters.has_adapter(merged.backbone) and not (out / "adapter").exists()
    inputs = _inputs(adapted.backbone, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(merged.backbone(*inputs), adapted.backbone(*inputs), rtol=0, atol=1e-5)
    # stage.init_from of the adapter export is that merged model
    state, _ = load_backbone_state(lora_run / "export")
    own = merged.backbone.state_dict()
    assert state.keys() == own.keys() and max(float((state[k] - own[k]).abs().max()) for k in own) < 1e-6
    # without the flag: base + adapter, the same adapter as the run's export
    plain = tmp_path / "plain"
    assert consolidate_main([str(lora_run), "--out", str(plain)]) == 0
    _, a = adapters.load_peft_folder(plain / "adapter")
    _, b = adapters.load_peft_folder(lora_run / "export" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three CPU runs / a pipeline folder: ~15-40 s
def test_diffusers_lora_file_edits_as_rededit_in_the_pipeline(tmp_path) -> None:
    """QwenImageEditPlusPipeline + load_lora_weights(export's LoRA file) = rededit's editor with the adapter."""
    from diffusers import QwenImageEditPlusPipeline

    from rededit.inference.editor import load_editor
    from rededit.stages.checkpoints import DIFFUSERS_LORA_FILE, export_adapter
    from test_pipeline_parity import TINY_ARCH, _picture, _rededit_edit, pipeline_run
    from tiny_pipeline import build_tiny_pipeline

    torch.set_num_threads(1)
    folder = build_tiny_pipeline(tmp_path / "pipe", zero_cond_t=True)
    editor = load_editor(
        folder, dtype="float32", overrides=[*TINY_ARCH, "adapter=lora", "adapter.rank=4", "adapter.alpha=8"]
    )
    _perturb_adapter(editor.backbone, scale=0.5)
    lora = export_adapter(editor.backbone, tmp_path / "out") / DIFFUSERS_LORA_FILE
    images = [_picture(1, 64, 48)]
    ours = _rededit_edit(editor, images)

    pipe = QwenImageEditPlusPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    without = pipeline_run(pipe, images)
    pipe.load_lora_weights(str(lora))
    theirs = pipeline_run(pipe, images)
    assert float(abs(theirs - without).max()) > 1e-3  # the LoRA changes the edit: the comparison has teeth
    assert float(abs(ours.astype("float64") - theirs.astype("float64")).max()) <= 1e-5


# --------------------------------------------------------------------------------------------- DPO / NFT
def test_dpo_reference_is_the_base_with_the_adapter_off(tmp_path) -> None:
    stage, cfg = untrained_tiny_stage(tmp_path, LIVE, "stage=dpo", "adapter=lora", "adapter.rank=4")
    backbone, ref = stage.backbone, stage.reference
    assert isinstance(ref, adapters.AdapterView) and ref.backbone is backbone
    base = _plain_base(backbone, cfg)
    n_base = sum(p.numel() for p in base.parameters())
    n_adapter = sum(
        p.numel()
        for n, p in backbone.named_parameters()
        if n in set(adapters.adapter_parameter_names(backbone))
    )
    tensors = {id(p): p for m in (stage, ref) for p in m.parameters()}  # every tensor the stage can reach
    assert sum(p.numel() for p in tensors.values()) == n_base + n_adapter  # no second backbone
    _perturb_adapter(backbone)
    inputs = _inputs(backbone, seed=2)
    backbone.train()
    with torch.no_grad():
        torch.testing.assert_close(ref(*inputs), base(*inputs), rtol=0, atol=0)
        assert (backbone(*inputs) - base(*inputs)).abs().max() > 1e-3
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    assert backbone.training and flags == {n: p.requires_grad for n, p in backbone.named_parameters()}


def test_nft_old_policy_is_a_second_adapter(tmp_path) -> None:
    stage, _ = untrained_tiny_stage(
        tmp_path, LIVE, "stage=nft", "adapter=lora", "adapter.rank=4", "stage.old_decay_rate=0.1"
    )
    from rededit.stages.nft import OLD_ADAPTER

    backbone, old = stage.backbone, stage.old_policy
    assert isinstance(old, adapters.AdapterView) and old.backbone is backbone and old.adapter == OLD_ADAPTER
    policy_names = adapters.adapter_parameter_names(backbone)
    old_names = adapters.adapter_parameter_names(backbone, OLD_ADAPTER)
    params = dict(backbone.named_parameters())
    assert len(old_names) == len(policy_names) and not any(params[n].requires_grad for n in old_names)
    assert set(stage.old_ema.shadow) == {n for n, p in params.items() if p.requires_grad} == set(policy_names)
    _perturb_adapter(backbone)  # the policy moves; the old adapter stays where the policy was
    inputs = _inputs(backbone, seed=4)
    with torch.no_grad():
        before = {n: params[n].clone() for n in old_names}
        stage.old_ema.num_updates = 3  # η = min(0.5, 0.1·3) = 0.3
        stage.old_ema.update(stage)
        for n in policy_names:
            o = adapters.renamed_adapter_parameter(n, adapters.ADAPTER_NAME, OLD_ADAPTER)
            torch.testing.assert_close(params[o], 0.3 * before[o] + 0.7 * params[n])
        v_old = old(*inputs)
        with adapters.active_adapter(backbone, OLD_ADAPTER):
            torch.testing.assert_close(v_old, backbone.eval()(*inputs), rtol=0, atol=0)
    # checkpoint round trip: a fresh stage gets the old adapter back
    ckpt: dict = {"state_dict": {}}
    stage.on_save_checkpoint(ckpt)
    L.seed_everything(0)
    fresh, _ = untrained_tiny_stage(tmp_path, LIVE, "stage=nft", "adapter=lora", "adapter.rank=4")
    fresh._load_old_state(ckpt["nft_old_policy"])
    fresh_params = dict(fresh.backbone.named_parameters())
    assert all(torch.equal(fresh_params[n], params[n]) for n in old_names)
    assert fresh.old_ema.num_updates == 4
