"""A non-editable install works: build the wheel, install it into a fresh venv, train from an empty folder.

The configs ship inside the package (``rededit/conf``); before that, ``pip install .`` then ``rededit-train``
failed with "Primary config directory not found". The fresh venv takes rededit from the wheel only; its
third-party dependencies come from the test's own environment through a ``.pth`` line (a plain path entry:
``.pth`` files inside that folder, such as the editable install's, are not processed), so nothing downloads.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (
        f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out


def test_wheel_installs_and_trains_from_an_empty_folder(tmp_path) -> None:
    # Build from a copy of the tracked sources, so the checkout gets no build/ or egg-info folders.
    src = tmp_path / "src_copy"
    files = subprocess.run(
        ["git", "ls-files", "src", "setup.cfg", "pyproject.toml", "README.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist), "."], cwd=src)
    (wheel,) = dist.glob("rededit-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    _run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path)
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    (Path(purelib.stdout.strip()) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REDEDIT_ROOT")}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    where = _run([str(py), "-c", "import rededit, sys; print(rededit.__file__)"], cwd=work, env=env)
    assert str(venv) in where.stdout, f"rededit imported from {where.stdout!r}, not from the wheel"

    bindir = venv / "bin"
    _run(
        [str(bindir / "rededit-data"), "synth", "--out", "corpus", "--n", "24", "--seed", "0",
         "--min-side", "64", "--max-side", "64", "--zh-prob", "0"],
        cwd=work,
        env=env,
    )  # fmt: skip
    run = _run(
        [str(bindir / "rededit-train"), "experiment=demo_pretrain", "debug=fast_dev_run",
         "data.manifest=corpus/manifest.parquet", "data.token_budget=512", "hydra.run.dir=run"],
        cwd=work,
        env=env,
    )  # fmt: skip
    assert "Primary config directory not found" not in run.stderr
    assert (work / "run" / "config.yaml").is_file()
