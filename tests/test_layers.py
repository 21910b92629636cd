"""The layer rule (docs/architecture.md): no rededit module imports from a layer above its own.

The contract is ``[tool.importlinter]`` in pyproject.toml (layers from entry points down to ``utils``); this test
runs it with import-linter, which reads every import statement, including those inside functions.
"""

from __future__ import annotations

import contextlib
import io

from conftest import REPO


def test_import_layers_contract_is_kept() -> None:
    from importlinter.cli import lint_imports

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, out.getvalue()


def test_the_contract_lists_every_package() -> None:
    """A new top-level package or module must be placed in a layer, or the contract would not see it."""
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    listed = {name.strip() for layer in cfg["layers"] for name in layer.split("|")}
    src = REPO / "src" / "rededit"
    present = {f"rededit.{p.name}" for p in src.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    present |= {f"rededit.{p.stem}" for p in src.glob("*.py") if p.stem != "__init__"}
    assert present == listed, f"unlisted: {sorted(present - listed)}, stale: {sorted(listed - present)}"


def test_rededit_imports_are_at_module_level() -> None:
    """Imports of rededit's own modules inside functions would hide layer arrows from a reader: they are at
    module level, except inside ``try: ... except ImportError`` (a part whose optional dependency is missing)."""
    import ast

    hidden = []
    for path in sorted((REPO / "src" / "rededit").rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if not any(n == "rededit" or n.startswith("rededit.") for n in names):
                continue
            chain, p = [], parents.get(node)
            while p is not None:
                chain.append(p)
                p = parents.get(p)
            in_function = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in chain)
            optional = any(isinstance(p, ast.Try) for p in chain)
            if in_function and not optional:
                hidden.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not hidden, "\n".join(hidden)
