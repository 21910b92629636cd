"""LoRA files in and out (issue 20): diffusers, ComfyUI, kohya/musubi and PEFT folders, and ``--lora`` at inference.

Every comparison is against a LoRA merged into the base weights by hand, ``W + strength · alpha/r · B A``
(:meth:`LoraState.delta`), so a wrong alpha, a swapped A/B or a lost module fails it.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file, save_file

from rededit.models import lora_formats as lf
from rededit.models.lora_formats import LoraFormatError, LoraState

# Modules of different kinds, top level and inside blocks (attention, output projection, MLP, modulation).
MODULES = {
    "transformer_blocks.0.attn.to_q": (2, 3.0),
    "transformer_blocks.0.attn.to_out.0": (4, 0.7),
    "transformer_blocks.1.img_mlp.net.0.proj": (4, 8.0),
    "transformer_blocks.1.txt_mod.1": (3, 3.0),
    "proj_out": (4, 4.0),
}


def _transformer(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        in_channels=16,
        out_channels=4,
        axes_dims_rope=(2, 2, 4),
    ).eval()


@pytest.fixture(scope="module")
def base():
    return _transformer()


def _random_lora(model, modules=MODULES, seed: int = 1, use_rslora: bool = False) -> LoraState:
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_modules())
    weights, alphas = {}, {}
    for m, (r, alpha) in modules.items():
        layer = named[m]
        weights[f"{m}.lora_A.weight"] = 0.2 * torch.randn(r, layer.in_features, generator=gen)
        weights[f"{m}.lora_B.weight"] = 0.2 * torch.randn(layer.out_features, r, generator=gen)
        alphas[m] = alpha
    return lf.lora_state(weights, alphas, use_rslora=use_rslora)


def _merged(model, *loras: tuple[LoraState, float], prefix: str = ""):
    """A copy of ``model`` with ``Σ strength · ΔW`` added to its weights by hand."""
    out = copy.deepcopy(model)
    named = dict(out.named_modules())
    with torch.no_grad():
        for lora, strength in loras:
            for m in lora.modules:
                w = named[prefix + m].weight
                w += (strength * lora.delta(m)).to(w.dtype)
    return out


def _run(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 16, generator=gen)
    txt = torch.randn(2, 5, 16, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        return model(
            hidden_states=x,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=torch.tensor([0.3, 0.8]),
            img_shapes=[[(1, 4, 4)]] * 2,
        ).sample


def _with(model, *items: tuple[str | Path, float]):
    out = copy.deepcopy(model)
    lf.apply_loras(out, [(lf.read_lora(p), s) for p, s in items])
    return out


def _save(lora: LoraState, root: Path, fmt: str) -> Path:
    return lf.save_lora(lora, root / ("peft" if fmt == "peft" else f"{fmt}.safetensors"), fmt)


# ----------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("fmt", lf.FORMATS)
def test_save_load_round_trip_keeps_tensors_scales_and_outputs(base, tmp_path, fmt, use_rslora) -> None:
    lora = _random_lora(base, use_rslora=use_rslora)
    loaded = lf.read_lora(_save(lora, tmp_path, fmt))
    assert loaded.format == fmt
    assert loaded.lora.weights.keys() == lora.weights.keys()
    assert all(torch.equal(loaded.lora.weights[k], v) for k, v in lora.weights.items())
    # The effective scale survives exactly, also where an rslora alpha had to be rewritten (kohya, ComfyUI) for
    # these ranks (others: within 1 ulp, test_rslora_alpha_rewrite_...).
    assert loaded.lora.scales() == lora.scales()
    if use_rslora and fmt in ("comfyui", "kohya"):
        assert not loaded.lora.use_rslora and loaded.lora.alphas != lora.alphas
    else:
        assert loaded.lora.alphas == lora.alphas

    ref = _run(_merged(base, (lora, 0.7)))
    got = _run(_with(base, (loaded.path, 0.7)))
    assert not torch.allclose(ref, _run(base), atol=1e-2)  # the LoRA changes the output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # re-saved from what was read: the same file contents in that format
    again = lf.read_lora(_save(loaded.lora, tmp_path / "again", fmt))
    assert all(torch.equal(again.lora.weights[k], v) for k, v in loaded.lora.weights.items())
    assert again.lora.alphas == loaded.lora.alphas


def test_conversion_between_every_pair_of_formats_keeps_the_scale(base, tmp_path) -> None:
    lora = _random_lora(base, use_rslora=True)
    for src in lf.FORMATS:
        first = lf.read_lora(_save(lora, tmp_path / src, src)).lora
        for dst in lf.FORMATS:
            second = lf.read_lora(_save(first, tmp_path / f"{src}-{dst}", dst)).lora
            assert second.scales() == lora.scales(), (src, dst)


def test_export_lora_files_writes_three_loadable_formats(base, tmp_path) -> None:
    lora = _random_lora(base)
    files = lf.export_lora_files(lora.weights, lora.alphas, tmp_path / "export")
    assert {k: p.name for k, p in files.items()} == lf.EXPORT_NAMES
    ref = _run(_merged(base, (lora, 1.0)))
    for fmt, path in files.items():
        assert lf.read_lora(path).format == fmt
        torch.testing.assert_close(_run(_with(base, (path, 1.0))), ref, atol=1e-5, rtol=0)
    # one alpha for every module, and the peft-state spelling with the adapter name
    single = lf.export_lora_files(
        {
            k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default."): v
            for k, v in lora.weights.items()
        },
        16.0,
        tmp_path / "single",
    )
    assert set(lf.read_lora(single["kohya"]).lora.alphas.values()) == {16.0}


def test_diffusers_pipeline_load_lora_weights_reads_our_file(base, tmp_path) -> None:
    """``QwenImageEditPlusPipeline.load_lora_weights`` (the tiny pipeline's transformer) gives the hand-merged
    model: per-module ranks and alphas come through the file's adapter metadata."""
    from diffusers import QwenImageEditPlusPipeline

    from tiny_pipeline import build_transformer

    transformer = build_transformer(zero_cond_t=False)
    modules = {"transformer_blocks.0.attn.to_q": (2, 3.0), "transformer_blocks.0.img_mlp.net.2": (4, 0.5)}
    modules["proj_out"] = (3, 1.5)
    lora = _random_lora(transformer, modules)
    files = lf.export_lora_files(lora.weights, lora.alphas, tmp_path)

    def pipeline():
        return QwenImageEditPlusPipeline(
            scheduler=None,
            vae=None,
            text_encoder=None,
            tokenizer=None,
            processor=None,
            transformer=copy.deepcopy(transformer),
        )

    pipe = pipeline()
    pipe.load_lora_weights(tmp_path)  # the folder: diffusers finds pytorch_lora_weights.safetensors
    gen = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 16, 16, generator=gen), torch.randn(1, 3, 32, generator=gen)

    def run(model):
        with torch.no_grad():
            return model(
                hidden_states=x,
                encoder_hidden_states=txt,
                encoder_hidden_states_mask=torch.ones(1, 3, dtype=torch.bool),
                timestep=torch.tensor([0.5]),
                img_shapes=[[(1, 4, 4)]],
            ).sample

    ref = run(_merged(transformer, (lora, 1.0)))
    torch.testing.assert_close(run(pipe.transformer), ref, atol=1e-5, rtol=0)
    # diffusers' converter also reads the ComfyUI and kohya files (their .alpha folded into the weights)
    for fmt in ("comfyui", "kohya"):
        other = pipeline()
        other.load_lora_weights(str(files[fmt]))
        torch.testing.assert_close(run(other.transformer), ref, atol=1e-5, rtol=0)


def test_peft_folder_is_a_real_peft_folder(base, tmp_path) -> None:
    from peft import PeftModel

    lora = _random_lora(base)
    folder = _save(lora, tmp_path, "peft")
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    torch.testing.assert_close(_run(model), _run(_merged(base, (lora, 1.0))), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ files written by hand as the tools name keys
def _comfy_key_map(model) -> dict[str, str]:
    """The LoRA names ComfyUI's loader maps for a Qwen-Image model (comfy/lora.py, model_lora_keys_unet): its
    model keys are ``diffusion_model.<module>.weight``; the generic map takes ``lora_unet_<module, . → _>``
    and ``diffusion_model.<module>``; the QwenImage branch adds ``<module>``, ``transformer.<module>`` and
    ``lycoris_<module, . → _>``."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            target = f"diffusion_model.{name}.weight"
            flat = name.replace(".", "_")
            for key in (
                f"lora_unet_{flat}",
                f"diffusion_model.{name}",
                name,
                f"transformer.{name}",
                f"lycoris_{flat}",
            ):
                out[key] = target
    return out


def _comfy_apply(model, state: dict[str, torch.Tensor], strength: float = 1.0):
    """ComfyUI's LoRA arithmetic (comfy/weight_adapter/lora.py) on ``model``: for each mapped name x, up/down
    from ``x.lora_up/lora_down.weight``, ``x.lora_B/lora_A.weight`` or ``x.lora_B/lora_A.default.weight``;
    ``W += strength · (alpha / down.shape[0] if x.alpha else 1) · up @ down``."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    pairs = (("lora_up", "lora_down"), ("lora_B", "lora_A"), ("lora_B.default", "lora_A.default"))
    used = set()
    for x, target in _comfy_key_map(model).items():
        for up, down in pairs:
            u, d = f"{x}.{up}.weight", f"{x}.{down}.weight"
            if u in state:
                alpha = state.get(f"{x}.alpha")
                scale = alpha.item() / state[d].shape[0] if alpha is not None else 1.0
                with torch.no_grad():
                    w = params[target[len("diffusion_model.") :]]
                    w += (strength * scale * (state[u].double() @ state[d].double())).to(w.dtype)
                used |= {u, d, f"{x}.alpha"}
    assert set(state) <= used, f"ComfyUI would not load {sorted(set(state) - used)}"
    return out


@pytest.mark.parametrize("fmt", ["comfyui", "kohya", "diffusers"])
def test_our_files_use_names_comfyui_maps_and_mean_the_same_there(base, tmp_path, fmt) -> None:
    lora = _random_lora(base)
    state = load_file(_save(lora, tmp_path, fmt))
    if fmt == "diffusers":  # ComfyUI ignores the header: only alpha = r modules mean the same there
        lora = lf.lora_state(lora.weights, None)
        state = load_file(_save(lora, tmp_path / "plain", fmt))
    torch.testing.assert_close(
        _run(_comfy_apply(base, state, 0.6)), _run(_merged(base, (lora, 0.6))), atol=1e-5, rtol=0
    )


def test_hand_written_kohya_musubi_keys_load(base, tmp_path) -> None:
    """Keys as musubi-tuner's lora_qwen_image names them (prefix lora_unet, module path with dots as _), alpha
    float32 or bf16, one alpha of 0 (= rank, kohya's rule) and one module without alpha (= rank)."""
    gen = torch.Generator().manual_seed(3)
    named = dict(base.named_modules())
    spec = {  # flat name → (module, rank, alpha tensor or None)
        "transformer_blocks_0_attn_to_q": ("transformer_blocks.0.attn.to_q", 4, torch.tensor(2.0)),
        "transformer_blocks_0_attn_add_k_proj": (
            "transformer_blocks.0.attn.add_k_proj",
            2,
            torch.tensor(1.0),
        ),
        "transformer_blocks_1_attn_to_out_0": (
            "transformer_blocks.1.attn.to_out.0",
            4,
            torch.tensor(8.0).bfloat16(),
        ),
        "transformer_blocks_1_img_mlp_net_0_proj": (
            "transformer_blocks.1.img_mlp.net.0.proj",
            3,
            torch.tensor(0.0),
        ),
        "transformer_blocks_1_txt_mlp_net_2": ("transformer_blocks.1.txt_mlp.net.2", 2, None),
        "transformer_blocks_0_img_mod_1": ("transformer_blocks.0.img_mod.1", 2, torch.tensor(1.0)),
        "norm_out_linear": ("norm_out.linear", 2, torch.tensor(4.0)),
        "img_in": ("img_in", 2, torch.tensor(3.0)),
    }
    state, expect = {}, copy.deepcopy(base)
    nexp = dict(expect.named_modules())
    for flat, (module, r, alpha) in spec.items():
        down = 0.2 * torch.randn(r, named[module].in_features, generator=gen)
        up = 0.2 * torch.randn(named[module].out_features, r, generator=gen)
        state[f"lora_unet_{flat}.lora_down.weight"] = down
        state[f"lora_unet_{flat}.lora_up.weight"] = up
        a = r if alpha is None or alpha.item() == 0 else alpha.item()
        if alpha is not None:
            state[f"lora_unet_{flat}.alpha"] = alpha
        with torch.no_grad():
            nexp[module].weight += 0.5 * a / r * (up @ down)
    save_file(state, tmp_path / "musubi.safetensors")
    loaded = lf.read_lora(tmp_path / "musubi.safetensors")
    assert loaded.format == "kohya"
    assert sorted(loaded.lora.modules) == sorted(m for m, _, _ in spec.values())
    torch.testing.assert_close(
        _run(_with(base, (tmp_path / "musubi.safetensors", 0.5))), _run(expect), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "prefix, up, down, flat",
    [
        ("diffusion_model.", "lora_up.weight", "lora_down.weight", False),
        ("diffusion_model.", "lora_B.weight", "lora_A.weight", False),
        ("", "lora_B.default.weight", "lora_A.default.weight", False),  # DiffSynth-style bare names
        ("transformer.", "lora_B.weight", "lora_A.weight", False),
        ("lycoris_", "lora_up.weight", "lora_down.weight", True),  # SimpleTuner LyCORIS-LoRA
    ],
)
def test_hand_written_comfyui_style_keys_load(base, tmp_path, prefix, up, down, flat) -> None:
    lora = _random_lora(base, seed=5)
    state = {}
    for m in lora.modules:
        name = prefix + (m.replace(".", "_") if flat else m)
        state[f"{name}.{down}"] = lora.weights[f"{m}.lora_A.weight"]
        state[f"{name}.{up}"] = lora.weights[f"{m}.lora_B.weight"]
        state[f"{name}.alpha"] = torch.tensor(lora.alphas[m])
    save_file(state, tmp_path / "hand.safetensors")
    got = _run(_with(base, (tmp_path / "hand.safetensors", 1.0)))
    torch.testing.assert_close(got, _run(_merged(base, (lora, 1.0))), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, _run(_comfy_apply(base, state)), atol=1e-5, rtol=0)


def test_a_file_without_alpha_means_alpha_equals_rank(base, tmp_path) -> None:
    lora = _random_lora(base)
    state = {k: v for k, v in load_file(_save(lora, tmp_path, "comfyui")).items() if not k.endswith(".alpha")}
    save_file(state, tmp_path / "no_alpha.safetensors")
    read = lf.read_lora(tmp_path / "no_alpha.safetensors").lora
    assert read.scales() == dict.fromkeys(lora.modules, 1.0)


# ------------------------------------------------------------------------------------------ LoKr/LoHa (PEFT)
@pytest.mark.parametrize("kind", ["LOKR", "LOHA"])
def test_lokr_and_loha_peft_folders_apply_as_peft_does(base, tmp_path, kind) -> None:
    from peft import LoHaConfig, LoKrConfig, get_peft_model_state_dict

    cls = LoKrConfig if kind == "LOKR" else LoHaConfig
    source = copy.deepcopy(base)
    source.add_adapter(cls(r=4, alpha=2, target_modules=["to_q", "img_mlp.net.2"], init_weights=False), "x")
    source.set_adapters(["x"], [0.5])
    state = get_peft_model_state_dict(source, adapter_name="x")
    folder = tmp_path / kind
    folder.mkdir()
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, folder / lf.PEFT_WEIGHTS)
    config = {
        "peft_type": kind,
        "r": 4,
        "alpha": 2,
        "target_modules": ["to_q", "img_mlp.net.2"],
        "init_weights": False,
    }
    (folder / lf.PEFT_CONFIG).write_text(json.dumps(config))
    got = _run(_with(base, (folder, 0.5)))
    assert not torch.allclose(got, _run(base), atol=1e-3)
    torch.testing.assert_close(got, _run(source), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------- refusals
def _file(tmp_path: Path, state: dict, name: str = "bad.safetensors") -> Path:
    save_file({k: v.clone() for k, v in state.items()}, tmp_path / name)
    return tmp_path / name


def test_unreadable_files_are_refused_naming_file_and_key(base, tmp_path) -> None:
    t = torch.zeros(2, 2)
    cases = {
        "unrecognised key 'transformer.foo.weight'": {"transformer.foo.weight": t},
        "several formats": {"diffusion_model.a.lora_A.weight": t, "lora_unet_proj_out.lora_up.weight": t},
        "text-encoder": {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": t},
        "LoKr weights": {"lora_unet_proj_out.lokr_w1": t},
        "lora_B .* missing": {"diffusion_model.proj_out.lora_A.weight": t},
        "names no Linear layer": {
            "lora_unet_foo_bar.lora_down.weight": t,
            "lora_unet_foo_bar.lora_up.weight": t,
        },
        "DoRA": {"diffusion_model.proj_out.dora_scale": t},
    }
    for i, (needle, state) in enumerate(cases.items()):
        path = _file(tmp_path, state, f"bad{i}.safetensors")
        with pytest.raises(LoraFormatError, match=needle) as err:
            lf.read_lora(path)
        assert str(path) in str(err.value)
    pt = tmp_path / "x.ckpt"
    pt.write_bytes(b"\x80\x04not read")
    with pytest.raises(LoraFormatError, match="safetensors only"):
        lf.read_lora(pt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(LoraFormatError, match="not a readable safetensors"):
        lf.read_lora(junk)


def test_lora_that_does_not_fit_the_transformer_names_the_module(base, tmp_path) -> None:
    lora = _random_lora(base)
    wrong = dict(lora.weights)
    wrong["proj_out.lora_A.weight"] = torch.zeros(4, 7)
    path = _file(tmp_path, lf.to_comfyui(lf.lora_state(wrong, lora.alphas)))
    with pytest.raises(LoraFormatError, match=r"proj_out is Linear\(16 → 16\)"):
        _with(base, (path, 1.0))
    norm = _file(
        tmp_path,
        {
            "diffusion_model.txt_norm.lora_A.weight": torch.zeros(2, 16),
            "diffusion_model.txt_norm.lora_B.weight": torch.zeros(16, 2),
        },
        "norm.safetensors",
    )
    with pytest.raises(LoraFormatError, match="txt_norm: a RMSNorm, not a Linear"):
        _with(base, (norm, 1.0))
    # a failed load leaves no half-built adapter behind
    model = copy.deepcopy(base)
    with pytest.raises(LoraFormatError):
        lf.apply_loras(model, [(lf.read_lora(norm), 1.0)])
    assert not getattr(model, "peft_config", None)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"modules_to_save": ["proj_out"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"something_new": 1}, "unknown setting 'something_new'"),
        ({"r": "4"}, "r must be a positive integer"),
        ({"rank_pattern": {"proj_out": 3}}, "has rank 4 but its config says 3"),
    ],
)
def test_peft_config_is_validated(base, tmp_path, change, needle) -> None:
    folder = _save(_random_lora(base), tmp_path, "peft")
    config = json.loads((folder / lf.PEFT_CONFIG).read_text())
    config.update(change)
    (folder / lf.PEFT_CONFIG).write_text(json.dumps(config))
    with pytest.raises(LoraFormatError, match=needle) as err:
        lf.read_lora(folder)
    assert lf.PEFT_CONFIG in str(err.value)


def test_a_peft_folder_linking_outside_is_refused(base, tmp_path) -> None:
    outside = _save(_random_lora(base), tmp_path / "elsewhere", "peft")
    folder = tmp_path / "handed"
    folder.mkdir()
    (folder / lf.PEFT_CONFIG).write_text((outside / lf.PEFT_CONFIG).read_text())
    (folder / lf.PEFT_WEIGHTS).symlink_to(outside / lf.PEFT_WEIGHTS)
    with pytest.raises(LoraFormatError, match="links outside"):
        lf.read_lora(folder)


def test_rslora_alpha_rewrite_keeps_the_scale_to_the_last_bit_or_one_ulp() -> None:
    gen = np.random.default_rng(0)
    exact = 0
    for _ in range(500):
        r = int(gen.integers(1, 257))
        scale = float(gen.uniform(0.1, 300)) / math.sqrt(r)
        got = lf._alpha_for_scale(scale, r) / r
        assert abs(got - scale) <= math.ulp(scale)
        exact += got == scale
        if r & (r - 1) == 0:  # a power of 2 divides exactly
            assert got == scale
    assert exact > 400


# ------------------------------------------------------------------------------------------ editor and CLIs
@pytest.fixture(scope="module")
def editors(tmp_path_factory):
    """A tiny export with perturbed weights (its zero-initialised output layer would hide any LoRA), two LoRAs
    in every format, and exports of the hand-merged weights."""
    from omegaconf import OmegaConf

    from conftest import untrained_tiny_stage
    from rededit.stages.checkpoints import export_editor

    root = tmp_path_factory.mktemp("lora_editor")
    stage, cfg = untrained_tiny_stage(root / "run")
    gen = torch.Generator().manual_seed(1)
    state = {
        k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in stage.backbone.state_dict().items()
    }
    stage.backbone.load_state_dict(state)
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    transformer = stage.backbone.transformer
    one = _random_lora(
        transformer, {"transformer_blocks.0.attn.to_q": (4, 2.0), "proj_out": (2, 4.0)}, seed=7
    )
    two = _random_lora(
        transformer, {"transformer_blocks.1.img_mlp.net.2": (3, 6.0), "proj_out": (4, 1.0)}, seed=8
    )
    files = {fmt: _save(one, root / "one", fmt) for fmt in lf.FORMATS}
    files["two"] = _save(two, root / "two", "kohya")

    def export(name: str, *loras: tuple[LoraState, float]) -> Path:
        merged = dict(state)
        for lora, strength in loras:
            for m in lora.modules:
                merged[f"transformer.{m}.weight"] = (
                    merged[f"transformer.{m}.weight"] + (strength * lora.delta(m)).float()
                )
        return export_editor(stage.backbone, root / name, config_yaml=yaml, ema_state=merged)

    return {
        "base": export("base"),
        "merged_one": export("merged_one", (one, 0.8)),
        "merged_both": export("merged_both", (one, 0.8), (two, -0.5)),
        "files": files,
        "root": root,
    }


def _edit(editor) -> torch.Tensor:
    from rededit.inference.edit_loop import EditRequest, edit_batch

    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 32, 32, generator=gen) * 2 - 1
    request = EditRequest(id="a", text="make it red", references=[ref], hw=(32, 32))
    return edit_batch(editor, [request], seed=0, steps=2, cfg_scale=1.0)


def test_lora_in_each_format_edits_as_the_hand_merged_editor(editors) -> None:
    from rededit.inference.editor import load_editor, load_loras

    want = _edit(load_editor(editors["merged_one"]))
    editor = load_editor(editors["base"])
    base = _edit(editor)
    assert not torch.allclose(want, base, atol=1e-3)
    transformer = editor.backbone.transformer
    for fmt in lf.FORMATS:
        records = load_loras(editor, [f"{editors['files'][fmt]}:0.8"])
        assert records[0]["format"] == fmt and records[0]["scale"] == 0.8 and len(records[0]["sha256"]) == 64
        torch.testing.assert_close(_edit(editor), want, atol=1e-5, rtol=0)
        transformer.delete_adapters([r["adapter"] for r in records])
        torch.testing.assert_close(_edit(editor), base, atol=0, rtol=0)
    load_loras(editor, [f"{editors['files']['diffusers']}:0.8", f"{editors['files']['two']}:-0.5"])
    torch.testing.assert_close(_edit(editor), _edit(load_editor(editors["merged_both"])), atol=1e-5, rtol=0)


def test_parse_lora_spec(tmp_path) -> None:
    from rededit.inference.editor import parse_lora_spec

    assert parse_lora_spec("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert parse_lora_spec("a/b.safetensors:0.5") == (Path("a/b.safetensors"), 0.5)
    assert parse_lora_spec("C:/x/b.safetensors:-1e-1") == (Path("C:/x/b.safetensors"), -0.1)
    odd = tmp_path / "a:2"  # a file whose own name ends in :<number>
    odd.write_bytes(b"")
    assert parse_lora_spec(str(odd)) == (odd, 1.0)


def test_cli_edit_lora_matches_merged_export_and_refuses_bad_files(editors, tmp_path, capsys) -> None:
    from rededit.cli.edit import main

    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    common = ["--image", str(img), "--instruction", "make it red", "--steps", "2", "--cfg", "1"]
    files = editors["files"]
    args = ["--lora", f"{files['comfyui']}:0.8", "--lora", f"{files['two']}:-0.5"]
    assert main(["--checkpoint", str(editors["base"]), *common, *args, "--out", str(tmp_path / "l.png")]) == 0
    assert main(["--checkpoint", str(editors["merged_both"]), *common, "--out", str(tmp_path / "m.png")]) == 0
    assert main(["--checkpoint", str(editors["base"]), *common, "--out", str(tmp_path / "b.png")]) == 0
    lora_png, merged_png, base_png = (
        np.asarray(Image.open(tmp_path / n), dtype=int) for n in ("l.png", "m.png", "b.png")
    )
    assert np.abs(lora_png - merged_png).max() <= 1  # 8-bit rounding of equal edits
    assert np.abs(lora_png - base_png).max() > 5
    bad = _file(tmp_path, {"lora_unet_nothing.lora_down.weight": torch.zeros(1)})
    for spec, needle in (
        (str(tmp_path / "missing.safetensors"), "no such file"),
        (str(bad), "names no Linear"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(
                [
                    "--checkpoint",
                    str(editors["base"]),
                    *common,
                    "--lora",
                    spec,
                    "--out",
                    str(tmp_path / "x.png"),
                ]
            )
        assert exit_.value.code == 2
        assert needle in capsys.readouterr().err


def test_eval_lora_is_applied_pinned_and_recorded(editors, tmp_path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rededit.datagen.synth.writer import synthesize
    from rededit.eval.harness import evaluate
    from rededit.utils.paths import CONF_DIR

    manifest = synthesize(tmp_path / "corpus", n=4, seed=0, bench_n=2, min_side=32, max_side=32)

    def cfg(checkpoint: Path, out: Path, *extra: str):
        GlobalHydra.instance().clear()
        light = ("metrics.reference_rows=false", "metrics.programmatic=false", "metrics.reference=false")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                "eval",
                overrides=[
                    f"checkpoint={checkpoint}",
                    f"benchmark.manifest_path={manifest}",
                    f"out_dir={out}",
                    "sampler.steps=2",
                    "sampler.cfg=1",
                    "max_items=1",
                    "grid_per_category=1",
                    *light,
                    *extra,
                ],
            )

    spec = f"{editors['files']['peft']}:0.8"
    result = evaluate(cfg(editors["base"], tmp_path / "lora", f"lora=[{spec}]"))
    assert [(r["format"], r["scale"]) for r in result["loras"]] == [("peft", 0.8)]
    pinned = json.loads((tmp_path / "lora" / "generation.json").read_text())["loras"]
    assert pinned == [{"sha256": result["loras"][0]["sha256"], "scale": 0.8}]
    evaluate(cfg(editors["merged_one"], tmp_path / "merged"))
    pngs = sorted((tmp_path / "lora" / "images").rglob("*.png"))
    assert pngs
    for png in pngs:
        other = tmp_path / "merged" / png.relative_to(tmp_path / "lora")
        assert (
            np.abs(np.asarray(Image.open(png), dtype=int) - np.asarray(Image.open(other), dtype=int)).max()
            <= 1
        )
    with pytest.raises(ValueError, match="other settings"):  # the same folder without the LoRA: not mixed
        evaluate(cfg(editors["base"], tmp_path / "lora"))


def test_cli_eval_refuses_a_missing_lora_before_loading_anything(tmp_path, monkeypatch, capsys) -> None:
    from rededit.cli.eval import main

    argv = [
        "rededit-eval",
        f"checkpoint={tmp_path}",
        f"out_dir={tmp_path / 'out'}",
        "benchmark.manifest_path=x",
    ]
    monkeypatch.setattr("sys.argv", [*argv, f"lora=[{tmp_path / 'missing.safetensors'}:0.5]"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "no such file or folder" in capsys.readouterr().err
