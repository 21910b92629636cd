"""``experiment=demo_lora`` (issue 20's adapter acceptance): the recipe, and that its export is usable three ways.

A tiny run of the recipe (2 blocks, 3 steps, from an untrained base export) must export the adapter in the three
LoRA formats, and ``rededit-edit --checkpoint <base export> --lora <export>/adapter/pytorch_lora_weights.safetensors``
must edit as the editor ``rededit-consolidate <run> --merge-adapter`` writes. The measured run (base vs LoRA on
the held-out bench) is experiments/demo_lora/README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose, train_overrides, untrained_tiny_stage
from rededit.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TINY = ("backbone.transformer_config.num_layers=2", "data.val_split=null")


def test_recipe_is_the_demo_with_a_lora_from_the_demo_export() -> None:
    cfg = compose(["experiment=demo_lora"])
    demo = compose(["experiment=demo"])
    assert cfg.stage_name == "demo_lora" and cfg.adapter.type == "lora" and cfg.adapter.rank == 16
    assert cfg.stage.init_from == "outputs/demo/export"
    # the demo's loss settings and world, unchanged
    assert cfg.stage.weighting == demo.stage.weighting and cfg.stage.lr_decay == demo.stage.lr_decay
    assert cfg.timestep.sampler.shift_mu == demo.timestep.sampler.shift_mu
    assert cfg.data.token_budget == demo.data.token_budget and cfg.data.text_mix == demo.data.text_mix
    assert cfg.callbacks.ema.decay == demo.callbacks.ema.decay
    assert cfg.trainer.max_steps < demo.trainer.max_steps


def _edit_png(main, checkpoint: Path, image: Path, out: Path, *extra: str) -> np.ndarray:
    args = ["--checkpoint", str(checkpoint), "--image", str(image), "--instruction", "invert the red circle"]
    assert main([*args, "--steps", "2", "--cfg", "1", "--seed", "0", *extra, "--out", str(out)]) == 0
    return np.asarray(Image.open(out), dtype=int)


def test_edit_lora_reproduces_the_merged_model_of_a_tiny_run(tiny_corpus, tmp_path) -> None:
    from omegaconf import OmegaConf

    from rededit.cli.consolidate import main as consolidate_main
    from rededit.cli.edit import main as edit_main
    from rededit.stages.checkpoints import export_editor

    # The base: an untrained demo editor whose output layer is live (the tiny preset zero-initialises it, and an
    # adapter on the blocks would then change nothing).
    stage, cfg = untrained_tiny_stage(
        tmp_path / "base_run", "experiment=demo", "backbone.zero_init_output=false"
    )
    base = export_editor(stage.backbone, tmp_path / "base", config_yaml=OmegaConf.to_yaml(cfg, resolve=True))
    run_dir = tmp_path / "lora"
    overrides = train_overrides(
        tiny_corpus,
        "experiment=demo_lora",
        *TINY,
        f"stage.init_from={base}",
        "adapter.rank=4",
        "adapter.init=false",  # random A and B, scale 8: 3 steps alone leave the LoRA's effect below 8-bit rounding
        "adapter.alpha=32",
        f"export_dir={run_dir}/export",
        steps=3,
        budget=256,
    )
    run(compose(overrides, run_dir))
    adapter = run_dir / "export" / "adapter"
    for name in ("pytorch_lora_weights", "lora_comfyui", "lora_kohya", "adapter_model"):
        assert (adapter / f"{name}.safetensors").is_file(), name
    merged = tmp_path / "merged"
    assert consolidate_main([str(run_dir), "--merge-adapter", "--out", str(merged)]) == 0

    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    lora = _edit_png(
        edit_main,
        base,
        image,
        tmp_path / "l.png",
        "--lora",
        str(adapter / "pytorch_lora_weights.safetensors"),
    )
    want = _edit_png(edit_main, merged, image, tmp_path / "m.png")
    assert np.abs(lora - want).max() <= 1  # 8-bit rounding of equal edits
    # the same in float, through the library calls the CLI makes, and the LoRA does something (teeth)
    from rededit.inference.edit_loop import EditRequest, edit_batch
    from rededit.inference.editor import load_editor, load_loras

    ref = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    request = EditRequest(id="a", text="invert the red circle", references=[ref], hw=(64, 64))
    editor = load_editor(base)
    plain = edit_batch(editor, [request], seed=0, steps=2, cfg_scale=1.0)
    load_loras(editor, [str(adapter / "pytorch_lora_weights.safetensors")])
    ours = edit_batch(editor, [request], seed=0, steps=2, cfg_scale=1.0)
    assert (ours - plain).abs().max() > 0.02
    torch.testing.assert_close(
        ours, edit_batch(load_editor(merged), [request], seed=0, steps=2, cfg_scale=1.0), atol=1e-5, rtol=0
    )


def _report(errors: dict[str, list[float]]) -> dict:
    """A demo_report ``metrics.json`` with per-item edit-region errors."""
    samples = [
        {"id": f"{task}-{i}", "task": task, "edit_region_error": e}
        for task, errs in errors.items()
        for i, e in enumerate(errs)
    ]
    tasks = {t: {"n": len(e), "edit_region_error": sum(e) / len(e)} for t, e in errors.items()}
    return {"settings": {"manifest": "m", "seed": 0}, "tasks": tasks, "samples": samples}


def test_comparison_interval_separates_a_regression_from_the_draw_of_items():
    """With 16 items a ratio of 1.06 can be noise or damage: the paired bootstrap interval says which. A LoRA that
    adds 10 % to every item's error has an interval above 1; one that reshuffles errors between items does not."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments/demo_lora/compare.py"
    spec = importlib.util.spec_from_file_location("demo_lora_compare", path)
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)
    rng = np.random.default_rng(0)
    base = list(rng.uniform(0.1, 0.5, 16))
    shuffled = list(rng.permutation(base))
    result = cmp.compare(
        _report({"color": base, "invert": base, "remove": base}),
        _report({"color": [e * 1.1 for e in base], "invert": [e * 0.4 for e in base], "remove": shuffled}),
        "invert",
        0.5,
        0.05,
    )
    rows = result["rows"]
    assert rows["color"]["ratio_low"] > 1.05 and abs(rows["color"]["ratio"] - 1.1) < 1e-9
    assert rows["remove"]["ratio_low"] < 1.0 < rows["remove"]["ratio_high"]
    assert rows["invert"]["ratio_low"] == pytest.approx(0.4) == rows["invert"]["ratio_high"]
    assert "95 % interval" in cmp.render(result) and not result["goal"]["met"]
    # Items missing from one report: no interval rather than a wrong one.
    partial = _report({"color": base[:8], "invert": base, "remove": base})
    assert np.isnan(
        cmp.compare(_report({"color": base, "invert": base, "remove": base}), partial, "invert", 0.5, 0.05)[
            "rows"
        ]["color"]["ratio_low"]
    )
