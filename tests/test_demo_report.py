"""The demo report on a tiny corpus with an untrained tiny editor: every file, every bench task."""

from __future__ import annotations

import json

import pytest
from PIL import Image

pytest.importorskip("diffusers")


from conftest import untrained_tiny_export
from rededit.data.manifest import Manifest
from rededit.datagen.synth.writer import synthesize
from rededit.eval.demo_report import (
    LOSS_CAPTION,
    goal_check,
    loss_columns,
    main,
    plot_loss_curves,
    read_loss_csv,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_report")
    manifest = synthesize(root / "corpus", n=24, seed=0, bench_n=14, min_side=64, max_side=96)
    export = untrained_tiny_export(root)
    logs = root / "run" / "logs"
    logs.mkdir(parents=True)
    rows = ["epoch,step,train/loss_step,train/batch_size"]
    rows += [f"0,{s},{1.0 / (1 + s) + 0.01},4" if s % 2 == 0 else f"0,{s},,4" for s in range(40)]
    (logs / "metrics.csv").write_text("\n".join(rows) + "\n")
    manifest_path = root / "corpus" / "manifest.parquet"
    return {"root": root, "manifest": manifest_path, "export": export, "written": manifest}


def test_demo_report_writes_every_file_for_every_bench_task(setup, tmp_path) -> None:
    out = tmp_path / "report"
    argv = ["--checkpoint", str(setup["export"]), "--manifest", str(setup["manifest"]), "--out", str(out)]
    rc = main([*argv, "--runs", f"pretrain={setup['root'] / 'run'}", "--steps", "2", "--max-per-task", "3"])
    assert rc == 0
    for name in ("grid.png", "metrics.json", "report.md", "loss_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp"))

    m = Manifest.open(setup["manifest"])
    splits, tasks = m.column_numpy("split"), m.column_numpy("task")
    bench_tasks = {t for t, s in zip(tasks, splits) if s == "bench"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == bench_tasks
    assert metrics["settings"]["steps"] == 2 and metrics["settings"]["seed"] == 0
    assert metrics["settings"]["weights"] == "raw"
    for task, st in metrics["tasks"].items():
        expected = min(3, sum(1 for t, s in zip(tasks, splits) if s == "bench" and t == task))
        assert st["n"] == expected
        assert st["edit_region_error"] is not None
        if task == "t2i":
            assert st["error_ratio"] is None and not st["goal"]["applies"]
        else:
            assert st["error_ratio"] is not None and st["error_ratio"] > 0
    # An untrained editor must not pass the goal; the report says so.
    assert metrics["goal"]["passed"] == 0 and metrics["goal"]["checked"] == len(bench_tasks - {"t2i"})
    report = (out / "report.md").read_text()
    assert "FAIL" in report and all(f"| {t} |" in report for t in bench_tasks)
    assert LOSS_CAPTION in report  # the loss plot says how to read it

    grid = Image.open(out / "grid.png")
    shown = sum(min(2, metrics["tasks"][t]["n"]) for t in bench_tasks)
    assert grid.height > shown * 100 and grid.width > 500


def test_goal_check() -> None:
    assert goal_check("add", {"error_ratio": 0.4, "psnr_outside": 30.0})["pass"] is True
    assert goal_check("add", {"error_ratio": 0.6, "psnr_outside": 30.0})["pass"] is False
    assert goal_check("add", {"error_ratio": 0.4, "psnr_outside": 24.0})["pass"] is False
    g = goal_check("stylize", {"error_ratio": 0.4, "psnr_outside": None})
    assert g["pass"] is True and g["psnr_ok"] is None
    assert goal_check("t2i", {"error_ratio": None, "psnr_outside": None})["applies"] is False


def test_loss_csv_reading_and_errors(setup, tmp_path) -> None:
    steps, values = read_loss_csv(setup["root"] / "run")
    assert steps.tolist() == list(range(0, 40, 2)) and values[0] == pytest.approx(1.01)
    bad = tmp_path / "metrics.csv"
    bad.write_text("step,val/loss\n0,1.0\n")
    with pytest.raises(ValueError, match="train/loss_step"):
        plot_loss_curves({"x": bad}, tmp_path / "l.png", strict=True)
    assert not (tmp_path / "l.png").exists()
    # Lenient (the report's default): a short run without step losses still gets a plot.
    plot_loss_curves({"short": bad, "ok": setup["root"] / "run"}, tmp_path / "l.png")
    assert (tmp_path / "l.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError):
        read_loss_csv(tmp_path / "missing")


def test_demo_report_and_rededit_eval_give_the_same_numbers(setup, tmp_path) -> None:
    """Issue 18: the demo report and rededit-eval disagreed on one checkpoint (PSNR outside 19.90 vs 23.03 dB).
    On the same items (first k per task), seed and steps, every per-edit and per-task number is the same."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rededit.eval.demo_report import build_demo_report
    from rededit.eval.harness import evaluate
    from rededit.inference.editor import load_editor
    from rededit.utils.paths import CONF_DIR

    editor = load_editor(setup["export"])
    demo = build_demo_report(editor, setup["manifest"], tmp_path / "demo", max_per_task=2, steps=2, seed=0)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"checkpoint={setup['export']}",
                f"benchmark.manifest_path={setup['manifest']}",
                "benchmark.max_per_task=2",
                f"out_dir={tmp_path / 'eval'}",
                "sampler.steps=2",
                "sampler.seeds=[0]",
                "metrics.reference_rows=false",
            ],
        )
    result = evaluate(cfg, editor=editor)
    rows = {r["id"]: r for r in json.loads((tmp_path / "eval" / "samples.json").read_text())}
    keys = (
        "psnr_outside",
        "edit_region_error",
        "identity_error",
        "error_ratio",
        "psnr",
        "ssim",
        "l1",
        "success",
    )

    def same(a, b) -> bool:
        return (a is None and b is None) or (
            a is not None and b is not None and a == pytest.approx(b, rel=1e-9)
        )

    assert {s["id"] for s in demo["samples"]} == set(rows)
    assert any(s["psnr_outside"] is not None for s in demo["samples"])
    for s in demo["samples"]:
        for k in keys:
            assert same(s.get(k), rows[s["id"]].get(k)), (s["id"], k, s.get(k), rows[s["id"]].get(k))
    categories = result["systems"]["model"]["categories"]
    for task, st in demo["tasks"].items():
        (category,) = {r["category"] for r in rows.values() if r["task"] == task}
        for k in keys:
            assert same(st.get(k), categories[category][k]["mean"]), (task, k)


def _log(run, with_val: bool):
    """A Lightning CSV log of 40 steps with per-σ-bin losses, and (optionally) validation every 20 steps."""
    run.mkdir(parents=True)
    cols = ["epoch", "step", "train/loss_step", "train/loss_tbin0_step", "train/loss_tbin1_step"]
    cols += ["train/loss_epoch", "train/loss_tbin0_epoch", "train/loss_tbin1_epoch"]
    cols += ["val/loss", "val/loss_tbin0", "val/loss_tbin1"] if with_val else []
    lines = [",".join(cols)]
    for s in range(40):
        row = {"epoch": "0", "step": str(s), "train/loss_step": f"{1 + (s % 7 == 0) * 20}"}
        row["train/loss_tbin0_step"] = f"{30 - s / 2}"  # low σ: large, falling
        row["train/loss_tbin1_step"] = f"{1 - s / 80}"
        lines.append(",".join(row.get(c, "") for c in cols))
        if with_val and s % 20 == 19:
            val = {
                "epoch": "0",
                "step": str(s),
                "val/loss": "0.9",
                "val/loss_tbin0": "20",
                "val/loss_tbin1": "0.5",
            }
            lines.append(",".join(val.get(c, "") for c in cols))
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run / "metrics.csv"


def test_loss_curves_per_sigma_bin_and_validation_when_logged(tmp_path) -> None:
    """Issue 18: the demo's loss plot showed one rising, spiky total with no explanation. It now draws the loss
    per σ bin (train/loss_tbin*) and val/loss where the run validated, with a caption."""
    with_val = _log(tmp_path / "a" / "logs", with_val=True)
    without = _log(tmp_path / "b" / "logs", with_val=False)
    found = loss_columns(tmp_path / "a")
    assert set(found) == {"total", "tbin0", "tbin1", "val", "val_tbin0", "val_tbin1"}
    steps, values = found["tbin0"]
    assert steps.tolist() == list(range(40)) and values[0] == pytest.approx(30.0)
    assert found["val"][0].tolist() == [19, 39] and found["val"][1].tolist() == [0.9, 0.9]
    assert set(loss_columns(without)) == {"total", "tbin0", "tbin1"}  # no validation: nothing missing
    png = plot_loss_curves({"with validation": with_val, "without": without}, tmp_path / "loss.png")
    assert Image.open(png).height > 2 * 300  # one panel per run, and the caption
    assert "σ" in LOSS_CAPTION and "val/loss" in LOSS_CAPTION
