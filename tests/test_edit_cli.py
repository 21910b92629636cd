"""``rededit-edit`` end to end on a tiny untrained export, export → diffusers round trip, run-folder loading."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from omegaconf import OmegaConf

from conftest import untrained_tiny_stage
from rededit.cli.edit import main
from rededit.inference.editor import load_editor
from rededit.inference.sizing import fit_size
from rededit.stages.checkpoints import export_editor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained tiny stage, its config and an export with distinct EMA and raw weights."""
    root = tmp_path_factory.mktemp("edit")
    stage, cfg = untrained_tiny_stage(root / "run")
    raw = {k: v.detach().clone() for k, v in stage.backbone.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in raw.items()}
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    export = export_editor(stage.backbone, root / "export", config_yaml=yaml, ema_state=ema)
    plain = export_editor(stage.backbone, root / "export_raw_only", config_yaml=yaml)
    return {
        "root": root,
        "cfg": cfg,
        "stage": stage,
        "raw": raw,
        "ema": ema,
        "export": export,
        "plain": plain,
    }


def _png(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _same_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def test_export_loads_back_in_diffusers_with_identical_outputs(tiny) -> None:
    from diffusers import QwenImageTransformer2DModel

    backbone = tiny["stage"].backbone.eval()
    loaded = QwenImageTransformer2DModel.from_pretrained(tiny["plain"] / "transformer").eval()
    assert loaded.config.zero_cond_t == backbone.transformer.config.zero_cond_t
    other = copy.deepcopy(backbone)
    other.transformer = loaded
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, 8, 6, generator=gen)
    ref = torch.randn(2, 48, 8, 6, generator=gen)
    txt = torch.randn(2, 5, 384, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        a = backbone(x, [ref], sigma, txt, mask)
        b = other(x, [ref], sigma, txt, mask)
    assert torch.equal(a, b)


def test_load_editor_picks_ema_or_raw(tiny) -> None:
    ema_editor = load_editor(tiny["export"])
    assert ema_editor.weights == "ema"
    assert _same_state(ema_editor.backbone, tiny["ema"])
    raw_editor = load_editor(tiny["export"], raw=True)
    assert raw_editor.weights == "raw"
    assert _same_state(raw_editor.backbone, tiny["raw"])
    assert type(ema_editor).__name__ == "PretrainModule"


def test_load_editor_from_run_folder_ckpt(tiny) -> None:
    run = tiny["root"] / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(tiny["cfg"], resolve=True))
    # The EMA callback's shadow holds the trainable tensors (fp32); here all of them differ from raw.
    shadow = tiny["ema"]
    torch.save(
        {
            "state_dict": {f"backbone.{k}": v for k, v in tiny["raw"].items()},
            "callbacks": {"EMA": {"shadow": shadow}},
        },
        run / "checkpoints" / "last.ckpt",
    )
    assert _same_state(load_editor(run).backbone, tiny["ema"])
    assert _same_state(load_editor(run / "checkpoints" / "last.ckpt", raw=True).backbone, tiny["raw"])


def test_cli_edit_with_two_images_and_t2i(tiny, tmp_path) -> None:
    a = _png(tmp_path / "a.png", 96, 64, 0)
    b = _png(tmp_path / "b.png", 40, 40, 1)
    out = tmp_path / "out" / "edit.png"
    args = ["--checkpoint", str(tiny["export"]), "--image", str(a), "--image", str(b)]
    rc = main([*args, "--instruction", "Insert the object of Picture 2 into Picture 1.", "--out", str(out)])
    assert rc == 0
    # The output keeps Picture 1's size (issue 18: 96x64 came back as 72x48, the bucket area cap).
    assert Image.open(out).size == (96, 64)
    assert not list(out.parent.glob(".*.tmp"))
    # --max-area writes the generated size: 96x64 (area 6144) capped to 4096 px, aspect kept, sides of 8.
    capped = tmp_path / "out" / "capped.png"
    rc = main([*args, "--instruction", "x", "--out", str(capped), "--max-area", "4096"])
    assert rc == 0 and Image.open(capped).size == (72, 48)

    t2i = tmp_path / "t2i.png"
    rc = main(["--checkpoint", str(tiny["export"]), "--instruction", "a red circle", "--out", str(t2i)])
    assert rc == 0 and Image.open(t2i).size == (64, 64)
    t2i_sized = tmp_path / "t2i_sized.jpg"
    rc = main([*args[:2], "--instruction", "x", "--out", str(t2i_sized), "--height", "32", "--width", "50"])
    assert rc == 0 and Image.open(t2i_sized).size == (50, 32)  # generated at 48x32, written as asked
    assert Image.open(t2i_sized).format == "JPEG"


def test_cli_is_deterministic_per_seed(tiny, tmp_path) -> None:
    a = _png(tmp_path / "a.png", 64, 64, 0)
    outs = []
    for name, seed in (("1.png", 3), ("2.png", 3), ("3.png", 4)):
        args = ["--checkpoint", str(tiny["export"]), "--image", str(a), "--instruction", "make it blue"]
        assert main([*args, "--out", str(tmp_path / name), "--seed", str(seed), "--steps", "2"]) == 0
        outs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize(
    "bad, needle",
    [
        (["--image", "/nonexistent/a.png"], "no such file"),
        (["--checkpoint", "/nonexistent/ckpt"], "no such file or folder"),
        (["--steps", "0"], "--steps must be positive"),
    ],
)
def test_cli_errors_exit_2_without_traceback(tiny, tmp_path, capsys, bad, needle) -> None:
    args = {"--checkpoint": str(tiny["export"]), "--instruction": "x", "--out": str(tmp_path / "o.png")}
    argv = [t for kv in args.items() for t in kv]
    with pytest.raises(SystemExit) as exc:
        main(argv + bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_cli_rejects_a_folder_without_config(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["--checkpoint", str(tmp_path / "empty"), "--instruction", "x", "--out", str(tmp_path / "o.png")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "no saved config" in capsys.readouterr().err


def test_cli_rejects_a_corrupt_image(tiny, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    argv = ["--checkpoint", str(tiny["export"]), "--image", str(bad), "--instruction", "x", "--out", "o.png"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "cannot decode image" in capsys.readouterr().err


def test_fit_size() -> None:
    assert fit_size(64, 96, 8, None) == (64, 96)
    assert fit_size(61, 99, 8, None) == (64, 96)
    assert fit_size(3, 3, 8, None) == (8, 8)
    h, w = fit_size(640, 960, 16, 512 * 512)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 512 * 512 and abs(w / h - 1.5) < 0.1


def test_cli_generates_at_the_editor_size_and_writes_the_input_size(tiny, tmp_path, monkeypatch) -> None:
    """The edit is generated at the size the editor works at (the training buckets' area, sides multiples of
    its token size) and resized back to Picture 1's size, which is never a multiple of 8 here."""
    import rededit.cli.edit as cli

    seen = []
    real = cli.edit_batch

    def spy(editor, requests, **kw):
        seen.extend(r.hw for r in requests)
        out = real(editor, requests, **kw)
        seen.append(out)
        return out

    monkeypatch.setattr(cli, "edit_batch", spy)
    a = _png(tmp_path / "a.png", 99, 61, 0)
    out = tmp_path / "o.png"
    argv = ["--checkpoint", str(tiny["export"]), "--image", str(a), "--instruction", "x", "--out", str(out)]
    assert main([*argv, "--steps", "1"]) == 0
    hw, pred = seen
    assert hw == fit_size(61, 99, 8, 64 * 64) == (48, 80)  # the 64² training area, sides multiples of 8
    assert Image.open(out).size == (99, 61)
    generated = Image.fromarray(((pred[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    back = generated.resize((99, 61), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(back, np.int16)).max() <= 1
