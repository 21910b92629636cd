"""One edit loop (issue 16): an editor with backbone region tokens edits the same bench item identically through
``rededit-eval``, the demo report, the training sample callback and DPO pair making (same seed), and the object
boxes reach the backbone on every path."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from conftest import untrained_tiny_stage
from rededit.callbacks.sample_images import SampleImages
from rededit.data.buckets import ResolutionSet
from rededit.data.manifest import Manifest
from rededit.datagen.preference import sample_edits
from rededit.datagen.synth.writer import synthesize
from rededit.eval.demo_report import load_samples, run_edits
from rededit.eval.harness import evaluate
from rededit.inference.editor import load_editor
from rededit.inference.images import tensor_to_pil
from rededit.inference.sizing import editor_buckets, sizes_fn
from rededit.stages.checkpoints import export_editor
from rededit.utils.paths import CONF_DIR

STEPS, SEED = 2, 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_loop")
    manifest = synthesize(root / "corpus", n=8, seed=0, bench_n=6, min_side=64, max_side=64)
    stage, cfg = untrained_tiny_stage(root / "run", "backbone.region_tokens=true")
    # The tiny preset starts as "return Picture 1" (zero output projection, zero region tokens): give both
    # weights so that the edit depends on the noise and on the boxes.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in stage.backbone.named_parameters():
            if "proj_out" in name or "region_tokens" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    export = export_editor(stage.backbone, root / "export", config_yaml=OmegaConf.to_yaml(cfg, resolve=True))
    m = Manifest.open(manifest)
    row = next(
        i
        for i in range(len(m))
        if m.row(i)["split"] == "bench" and m.row(i)["object_boxes"] and m.row(i)["references"]
    )
    return {"root": root, "manifest": manifest, "export": export, "m": m, "row": row, "id": m.row(row)["id"]}


@pytest.fixture(scope="module")
def editor(world):
    ed = load_editor(world["export"])
    assert ed.backbone.region_tokens is not None
    return ed


def _u8(x: torch.Tensor) -> np.ndarray:
    return np.asarray(tensor_to_pil(x), dtype=np.int16)


def _via_eval(world, editor, tmp_path) -> np.ndarray:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"checkpoint={world['export']}",
                f"benchmark.manifest_path={world['manifest']}",
                f"out_dir={tmp_path / 'eval'}",
                f"sampler.steps={STEPS}",
                f"sampler.seeds=[{SEED}]",
                "sampler.batch_size=3",  # other neighbours than the other paths
                "metrics.reference_rows=false",
            ],
        )
    evaluate(cfg, editor=editor)
    return np.asarray(Image.open(tmp_path / "eval" / "images" / str(SEED) / f"{world['id']}.png"), np.int16)


def _via_demo_report(world, editor) -> np.ndarray:
    m = world["m"]
    samples = load_samples(m, [world["row"]], sizes_fn(editor, editor_buckets(editor)))
    run_edits(editor, samples, steps=STEPS, cfg=None, seed=SEED)
    return _u8(samples[0]["pred"])


def _via_sample_callback(world, editor, tmp_path) -> np.ndarray:
    m = world["m"]
    cb = SampleImages(every_n_steps=1, per_task=2, steps=STEPS, seed=SEED, out_dir=str(tmp_path / "samples"))
    dm = types.SimpleNamespace(manifest=m, resset=ResolutionSet.from_config(editor_buckets(editor)))
    trainer = types.SimpleNamespace(
        datamodule=dm, callbacks=[], global_step=1, global_rank=0, default_root_dir=str(tmp_path)
    )
    cb._write(trainer, editor)
    (sample,) = [s for s in cb._samples if s["id"] == world["id"]]
    return _u8(sample["pred"])


def _via_make_pairs(world, editor) -> np.ndarray:
    m = world["m"]
    edits, _ = sample_edits(editor, m.row(world["row"]), m.root, 2, seed=SEED, steps=STEPS)
    return _u8(edits[0])


def test_every_caller_makes_the_same_edit_with_the_boxes(world, editor, tmp_path) -> None:
    got = {
        "rededit-eval": _via_eval(world, editor, tmp_path),
        "demo report": _via_demo_report(world, editor),
        "sample callback": _via_sample_callback(world, editor, tmp_path),
        "make-pairs": _via_make_pairs(world, editor),
    }
    ref = got["rededit-eval"]
    for name, img in got.items():
        assert img.shape == ref.shape, name
        assert np.array_equal(img, ref), (name, np.abs(img - ref).max())

    # The boxes reach the backbone: the same edit without them is another image.
    m = world["m"]
    samples = load_samples(m, [world["row"]], sizes_fn(editor, editor_buckets(editor)))
    run_edits(editor, samples, steps=STEPS, cfg=None, seed=SEED, score=False)
    with_boxes = samples[0]["pred"]
    samples[0]["boxes"] = None
    run_edits(editor, samples, steps=STEPS, cfg=None, seed=SEED, score=False)
    assert (samples[0]["pred"] - with_boxes).abs().max() > 1e-3
