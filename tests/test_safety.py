"""Safety (issue 7): no code path unpickles a file, checkpoints load with ``weights_only=True``, and
weights / embeddings are written as safetensors.

The scan reads the syntax tree of every module under ``src/`` (not a text grep: a call split over
lines, or an alias such as ``from torch import load``, is still found).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from conftest import REPO

SRC = REPO / "src"
# Calls that execute code from the bytes they read.
UNPICKLERS = {
    ("pickle", "load"),
    ("pickle", "Unpickler"),
    ("_pickle", "load"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
}
# ``pickle.loads`` of bytes this process made itself, never of a file. Path → why.
PICKLE_LOADS_ALLOWED = {
    "rededit/datagen/engine/runner.py": "a stage object pickled by the same run and shipped to its own workers",
}


def _modules() -> list[Path]:
    return sorted(p for p in (SRC / "rededit").rglob("*.py"))


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def _aliases(tree: ast.AST) -> dict[str, tuple[str, ...]]:
    """``{local name: dotted origin}`` of ``import x as y`` / ``from x import y as z``."""
    out: dict[str, tuple[str, ...]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = tuple(
                    (a.name if a.asname else a.name.split(".")[0]).split(".")
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = (*node.module.split("."), a.name)
    return out


def unsafe_calls(path: Path, root: Path = SRC) -> list[str]:
    """Every call in ``path`` that can run code from the bytes it loads (``file:line what``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases = _aliases(tree)
    rel = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if not name:
            continue
        full = (*aliases.get(name[0], (name[0],)), *name[1:])
        where = f"{rel}:{node.lineno}"
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if full[-2:] in {("torch", "load"), ("serialization", "load")} or full == ("torch", "load"):
            value = kw.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where} torch.load without weights_only=True")
        elif (
            "weights_only" in kw
            and isinstance(kw["weights_only"], ast.Constant)
            and kw["weights_only"].value is False
        ):
            found.append(f"{where} {'.'.join(full)}(weights_only=False)")
        elif full[-2:] in UNPICKLERS:
            found.append(f"{where} {'.'.join(full)}")
        elif full[-2:] == ("pickle", "loads") and rel.removeprefix("rededit/") not in {
            k.removeprefix("rededit/") for k in PICKLE_LOADS_ALLOWED
        }:
            found.append(
                f"{where} pickle.loads (only in-process bytes are allowed; add the file with a reason)"
            )
        elif full[-1] == "load" and full[0] in {"np", "numpy"}:
            value = kw.get("allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where} numpy load with allow_pickle")
    return found


def test_no_unpickling_of_files_in_src() -> None:
    problems = [p for path in _modules() for p in unsafe_calls(path)]
    assert not problems, "unsafe deserialisation:\n" + "\n".join(problems)


def test_the_scan_finds_what_it_must(tmp_path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import pickle\nimport torch\nfrom torch import load as tl\nimport numpy as np\n"
        "torch.load('a')\ntl('b', weights_only=False)\ntorch.load(\n  'c',\n  weights_only=True,\n)\n"
        "pickle.load(open('d', 'rb'))\npickle.loads(b'')\nnp.load('e', allow_pickle=True)\n"
    )
    found = unsafe_calls(bad, tmp_path)
    assert [f.split(" ", 1)[0].rsplit(":", 1)[1] for f in found] == ["5", "6", "11", "12", "13"]


def test_allowed_pickle_loads_files_exist() -> None:
    for rel in PICKLE_LOADS_ALLOWED:
        assert (SRC / rel).is_file(), f"stale allow-list entry {rel}"


def test_text_cache_writes_safetensors_only(tmp_path) -> None:
    # The exported editor's weights are checked in tests/test_no_network.py (it exports one anyway).
    from rededit.data.text_cache import TextEmbeddingCache

    cache = TextEmbeddingCache(tmp_path / "cache", "probe")
    cache.put_many({"k": torch.ones(3, 4)})
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".npy"}]


def test_checkpoint_with_code_is_refused(tmp_path) -> None:
    """A checkpoint that carries a pickled callable is rejected by the loaders rededit uses."""
    from rededit.stages.checkpoints import consolidate

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"backbone.w": torch.zeros(1)}, "payload": _Boom()}, evil)
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global|WeightsUnpickler"):
        consolidate(evil)
    assert not _Boom.ran


class _Boom:
    ran = False

    def __reduce__(self):
        return (_Boom._run, ())

    @staticmethod
    def _run():
        _Boom.ran = True
        return 0
