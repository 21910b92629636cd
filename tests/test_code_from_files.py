"""Issue 17 §1: a checkpoint folder or saved config handed to rededit never runs code.

Each attack is a crafted folder that *does* run code when read the way the libraries read it (checked first,
so the test can fail), then goes through every rededit entry point that reads such a folder; the marker file
the payload writes must never appear and the user gets a message naming the refused object.
"""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

from conftest import untrained_tiny_stage
from rededit.cli.edit import main as edit_main
from rededit.datagen.synth.writer import synthesize
from rededit.inference.editor import EditorLoadError, load_editor
from rededit.stages.checkpoints import EXPORT_CONFIG, consolidate, export_editor, load_backbone_state
from rededit.utils.safe_load import UnsafeCheckpointError
from rededit.utils.trusted_config import UntrustedConfigError, check_trusted_targets, load_trusted_config


class _WritesMarker:
    """Unpickling this object writes ``marker`` (via ``pathlib.Path.write_text``, a real side effect)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A run folder (resolved ``config.yaml`` + a sharded DCP ``checkpoints/last.ckpt``) and an export."""
    root = tmp_path_factory.mktemp("code_from_files")
    stage, cfg = untrained_tiny_stage(root / "run")
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    state = {f"backbone.{k}": v.detach().clone() for k, v in stage.backbone.state_dict().items()}
    (run / "checkpoints").mkdir()
    _write_dcp({"state_dict": state, "global_step": 3}, _dcp_dir(run))
    export = export_editor(stage.backbone, root / "export", config_yaml=OmegaConf.to_yaml(cfg, resolve=True))
    return {"root": root, "run": run, "export": export, "state": state, "stage": stage}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _dcp_dir(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def _write_dcp(state: dict, folder: Path) -> None:
    """A sharded checkpoint as one process writes it (what FSDP2 ranks write, with one rank)."""
    _save_state_dict(state, storage_writer=FileSystemWriter(str(folder)), no_dist=True)


# ------------------------------------------------------------------------------------ sharded (DCP) checkpoints
def test_a_genuine_dcp_checkpoint_still_loads(tiny) -> None:
    raw, shadow = consolidate(tiny["run"])
    assert shadow is None
    assert set(raw) == {k.removeprefix("backbone.") for k in tiny["state"]}
    assert all(torch.equal(raw[k.removeprefix("backbone.")], v) for k, v in tiny["state"].items())


def test_dcp_metadata_with_code_is_refused_by_every_entry_point(tiny, tmp_path, capsys) -> None:
    """The attack: ``.metadata`` replaced by a pickle whose loading runs code (torch reads it with pickle.load)."""
    run = _copy(tiny["run"], tmp_path / "run")
    marker = tmp_path / "marker"
    (_dcp_dir(run) / ".metadata").write_bytes(pickle.dumps(_WritesMarker(marker)))
    with open(_dcp_dir(run) / ".metadata", "rb") as f:  # control: torch's plain pickle.load runs it
        pickle.load(f)
    assert marker.is_file()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError, match=r"pathlib\.Path\.write_text"):
        consolidate(run)  # rededit-consolidate
    with pytest.raises(UnsafeCheckpointError):
        load_backbone_state(run)  # stage.init_from=
    with pytest.raises(UnsafeCheckpointError):
        tiny["stage"].load_backbone_from(run)  # what BaseStage.configure_model calls for stage.init_from=
    with pytest.raises(EditorLoadError, match=r"refused"):
        load_editor(run)  # rededit-edit / rededit-eval checkpoint= / demo report
    with pytest.raises(SystemExit) as exc:
        edit_main(["--checkpoint", str(run), "--instruction", "x", "--out", str(tmp_path / "o.png")])
    assert exc.value.code == 2 and "refused" in capsys.readouterr().err
    from rededit.cli.consolidate import main as consolidate_main

    assert consolidate_main([str(run), "--out", str(tmp_path / "cons")]) == 2
    assert "refused" in capsys.readouterr().err
    with pytest.raises(EditorLoadError, match=r"refused"):
        _evaluate(run, tmp_path)  # rededit-eval checkpoint=
    assert not marker.exists()


def test_dcp_byte_entry_with_code_is_refused(tiny, tmp_path) -> None:
    """The attack: a non-tensor entry (DCP stores it with torch.save; torch loads it weights_only=False)."""
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run, ignore=shutil.ignore_patterns("last.ckpt"))
    _write_dcp({"state_dict": tiny["state"], "loops": _WritesMarker(marker)}, _dcp_dir(run))
    assert not marker.exists()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(_dcp_dir(run), tmp_path / "out.pt")  # control: torch's own converter runs it
    assert marker.is_file()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"(?i)weights.only|write_text"):
        consolidate(run)
    with pytest.raises(EditorLoadError):
        load_editor(run)
    assert not marker.exists()


def test_resume_checks_dcp_metadata_before_lightning_reads_it(tiny, tmp_path) -> None:
    """``ckpt_path=`` on FSDP2/HSDP: FSDP2Strategy verifies the metadata before Lightning's own reader."""
    from rededit.parallel.safe_dcp import verify_dcp_metadata

    verify_dcp_metadata(_dcp_dir(tiny["run"]))  # genuine: passes
    run = _copy(tiny["run"], tmp_path / "run")
    marker = tmp_path / "marker"
    (_dcp_dir(run) / ".metadata").write_bytes(pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(UnsafeCheckpointError):
        verify_dcp_metadata(_dcp_dir(run))
    assert not marker.exists()


# ----------------------------------------------------------------------------------- DeepSpeed ZeRO checkpoints
def _deepspeed_folder(root: Path, payload: object, folder: Path | None = None) -> Path:
    """A DeepSpeed ZeRO folder layout (``latest`` + ``global_step1/``) whose optimizer state carries ``payload``
    (at ``folder``, default ``root/ds``)."""
    folder = folder or root / "ds"
    (folder / "global_step1").mkdir(parents=True)
    (folder / "latest").write_text("global_step1")
    optim = {"optimizer_state_dict": {"zero_stage": 2, "partition_count": 1, "payload": payload}}
    torch.save(optim, folder / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {}, "payload": payload}, folder / "global_step1" / "mp_rank_00_model_states.pt")
    return folder


def test_deepspeed_checkpoint_with_code_is_refused(tmp_path) -> None:
    pytest.importorskip("deepspeed")
    marker = tmp_path / "marker"
    folder = _deepspeed_folder(tmp_path, _WritesMarker(marker))
    torch.load(folder / "global_step1" / "mp_rank_00_model_states.pt", weights_only=False)  # control
    assert marker.is_file()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"DeepSpeed"):
        consolidate(folder)
    assert not marker.exists()


def test_deepspeed_run_folder_with_code_is_refused_by_every_entry_point(tiny, tmp_path, capsys) -> None:
    """The attack through each entry point: a run folder whose ``checkpoints/last.ckpt`` is a DeepSpeed folder
    carrying a payload (``stage.init_from=``, ``rededit-consolidate``, ``rededit-edit``, ``rededit-eval``)."""
    pytest.importorskip("deepspeed")
    from rededit.cli.consolidate import main as consolidate_main

    marker = tmp_path / "marker"
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run, ignore=shutil.ignore_patterns("last.ckpt"))
    _deepspeed_folder(tmp_path, _WritesMarker(marker), folder=_dcp_dir(run))
    with pytest.raises(UnsafeCheckpointError, match=r"DeepSpeed"):
        load_backbone_state(run)  # stage.init_from=
    with pytest.raises(UnsafeCheckpointError, match=r"DeepSpeed"):
        tiny["stage"].load_backbone_from(run)
    assert consolidate_main([str(run), "--out", str(tmp_path / "cons")]) == 2  # rededit-consolidate
    assert "DeepSpeed" in capsys.readouterr().err and not (tmp_path / "cons").exists()
    with pytest.raises(SystemExit) as exc:  # rededit-edit --checkpoint
        edit_main(["--checkpoint", str(run), "--instruction", "x", "--out", str(tmp_path / "o.png")])
    assert exc.value.code == 2 and "DeepSpeed" in capsys.readouterr().err
    with pytest.raises(EditorLoadError, match=r"DeepSpeed"):
        _evaluate(run, tmp_path)  # rededit-eval checkpoint=
    assert not marker.exists()


@pytest.mark.slow
def test_a_genuine_deepspeed_checkpoint_still_converts(tmp_path) -> None:
    """A real ZeRO-2 checkpoint (raw DeepSpeed, gloo, one CPU process) passes the weights-only conversion."""
    pytest.importorskip("deepspeed")
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = f"""
import os, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3))
cfg = {{"train_batch_size": 2, "zero_optimization": {{"stage": 2}},
       "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "torch_adam": True}}}}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
engine.backward(engine(torch.randn(2, 4)).pow(2).mean()); engine.step()
engine.save_checkpoint(r"{tmp_path / "ds"}", client_state={{"epoch": 0}})
torch.save({{k: v.float() for k, v in model.state_dict().items()}}, r"{tmp_path / "want.pt"}")
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True)
    from rededit.stages.checkpoints import _load_full_checkpoint

    ckpt = _load_full_checkpoint(tmp_path / "ds")
    want = torch.load(tmp_path / "want.pt", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.equal(ckpt["state_dict"][f"0.{k.split('.', 1)[1]}"], v) for k, v in want.items())


# ---------------------------------------------------------------------------------------------- saved configs
def _write_text_node(marker: Path) -> dict:
    """A config node that Hydra's ``instantiate`` turns into ``Path(marker).write_text("code ran")``."""
    return {
        "_target_": "pathlib.Path.write_text",
        "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
        "data": "code ran",
    }


def _evil_config(cfg_path: Path, marker: Path, key: str = "vae") -> None:
    cfg = OmegaConf.load(cfg_path)
    OmegaConf.update(cfg, key, _write_text_node(marker), merge=False)
    cfg_path.write_text(OmegaConf.to_yaml(cfg))


def test_saved_config_with_foreign_target_is_refused_by_every_entry_point(tiny, tmp_path, capsys) -> None:
    from hydra.utils import instantiate

    marker = tmp_path / "marker"
    export = _copy(tiny["export"], tmp_path / "export")
    _evil_config(export / EXPORT_CONFIG, marker)
    instantiate(OmegaConf.load(export / EXPORT_CONFIG).vae)  # control: Hydra runs it
    assert marker.is_file()
    marker.unlink()

    with pytest.raises(EditorLoadError, match=r"refused `vae\._target_: 'pathlib\.Path\.write_text'`"):
        load_editor(export)  # rededit-edit / rededit-eval / demo report / make-pairs
    with pytest.raises(SystemExit) as exc:
        edit_main(["--checkpoint", str(export), "--instruction", "x", "--out", str(tmp_path / "o.png")])
    assert exc.value.code == 2 and "pathlib.Path.write_text" in capsys.readouterr().err

    run = _copy(tiny["run"], tmp_path / "run")  # rededit-consolidate reads the run's config.yaml
    _evil_config(run / "config.yaml", marker, key="stage.backbone")
    from rededit.cli.consolidate import main as consolidate_main

    assert consolidate_main([str(run), "--out", str(tmp_path / "cons")]) == 2
    assert "pathlib.Path.write_text" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "cons").exists()


def _evaluate(checkpoint: Path, tmp_path: Path) -> None:
    """``rededit-eval checkpoint=<checkpoint>`` on a 2-item synthetic benchmark (the harness behind the CLI)."""
    from rededit.eval.harness import evaluate
    from rededit.utils.paths import CONF_DIR

    manifest = synthesize(tmp_path / "corpus", n=4, seed=0, bench_n=2, min_side=64, max_side=64)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"checkpoint={checkpoint}",
                f"benchmark.manifest_path={manifest}",
                f"out_dir={tmp_path / 'e'}",
            ],
        )
    evaluate(cfg)


def test_rededit_eval_refuses_a_foreign_target(tiny, tmp_path) -> None:
    marker = tmp_path / "marker"
    export = _copy(tiny["export"], tmp_path / "export")
    _evil_config(export / EXPORT_CONFIG, marker, key="stage.optimizer")
    with pytest.raises(EditorLoadError, match=r"stage\.optimizer\._target_"):
        _evaluate(export, tmp_path)
    assert not marker.exists()


def test_rededit_eval_refuses_a_run_config_with_a_foreign_target(tiny, tmp_path) -> None:
    """``rededit-eval checkpoint=<run folder>``: the run's ``config.yaml`` is a saved config too."""
    marker = tmp_path / "marker"
    run = _copy(tiny["run"], tmp_path / "run")
    _evil_config(run / "config.yaml", marker, key="stage.backbone")
    with pytest.raises(EditorLoadError, match=r"stage\.backbone\._target_: 'pathlib\.Path\.write_text'"):
        _evaluate(run, tmp_path)
    with pytest.raises(EditorLoadError, match=r"pathlib\.Path\.write_text"):
        load_editor(run)  # rededit-edit --checkpoint <run folder>
    assert not marker.exists()


def test_mine_hard_reward_file_with_foreign_target_is_refused(tmp_path) -> None:
    from rededit.cli.data_mine_hard import load_reward

    marker = tmp_path / "marker"
    path = tmp_path / "reward.yaml"
    path.write_text(OmegaConf.to_yaml(_write_text_node(marker)))
    with pytest.raises(UntrustedConfigError, match=r"pathlib\.Path\.write_text"):
        load_reward(str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "trusted"),
    [
        ("rededit.models.vae.PixelSpaceToDepthVAE", True),
        ("torch.optim.AdamW", True),
        ("rededit.parallel.parallelize.block_classes", True),  # the one function presets name
        ("rededit.utils.io.atomic_write_text", False),  # a rededit function that writes files
        ("rededit.models.backbone.EditBackbone.from_pretrained", False),  # not a class
        ("rededit.no_such_module.X", False),
        ("pathlib.Path.write_text", False),
        ("os.system", False),
        ("torch.load", False),
        ("my_module.Evil", False),  # never imported to check it
    ],
)
def test_target_allow_list(target, trusted, tmp_path) -> None:
    cfg = OmegaConf.create({"a": {"b": [{"_target_": target}]}})
    if trusted:
        check_trusted_targets(cfg, "probe.yaml")
    else:
        with pytest.raises(UntrustedConfigError, match=r"a\.b\[0\]\._target_"):
            check_trusted_targets(cfg, "probe.yaml")
    assert "my_module" not in sys.modules


def test_an_interpolated_target_is_checked_after_resolution(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: os.system\nnode:\n  _target_: ${name}\n")
    with pytest.raises(UntrustedConfigError, match=r"node\._target_: 'os\.system'"):
        load_trusted_config(path)


def test_every_preset_config_is_trusted() -> None:
    """The allow-list covers what rededit's own presets instantiate (composed training config)."""
    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in ([], ["experiment=demo"], ["stage=nft"], ["stage=dpo"], ["strategy=fsdp2"]):
            check_trusted_targets(compose("train", overrides=overrides), f"train {overrides}")


def test_a_pipeline_folder_link_out_of_it_is_not_copied_into_an_export(tmp_path) -> None:
    """A handed-over pipeline folder whose vae/ holds a symlink to a file elsewhere (a key, a password file)
    must not get that file copied into the export; a hub-cache snapshot's links to its blobs/ are fine."""
    from rededit.stages.checkpoints import _link_or_copy_tree

    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    base = tmp_path / "base"
    (base / "vae").mkdir(parents=True)
    (base / "vae" / "config.json").write_text("{}")
    (base / "vae" / "stolen.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"outside the pipeline folder"):
        _link_or_copy_tree(base / "vae", tmp_path / "export" / "vae")
    assert not (tmp_path / "export" / "vae" / "stolen.txt").exists()

    repo = tmp_path / "hub" / "models--org--editor"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("{}")
    (snap / "vae").mkdir(parents=True)
    (snap / "vae" / "config.json").symlink_to(repo / "blobs" / "f00d")
    _link_or_copy_tree(snap / "vae", tmp_path / "export2" / "vae")
    assert (tmp_path / "export2" / "vae" / "config.json").read_text() == "{}"
