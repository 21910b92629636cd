"""The project's documentation stands on its own and its commands name options that exist.

Before: the README, Makefile and configs cited design files that are not in the repository, and the SLURM
launcher's example used ``strategy=fsdp`` (no such option).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import REPO
from rededit.utils.paths import CONF_DIR

TEXT_SUFFIXES = {".md", ".py", ".yaml", ".cfg", ".toml", ".sbatch", ".sh"}


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    out = []
    for name in names.split():
        path = REPO / name
        if (
            (path.suffix in TEXT_SUFFIXES or path.name == "Makefile")
            and path.is_file()
            and not path.is_symlink()
        ):
            out.append(path)
    return out


def test_no_citation_of_a_design_file_outside_the_repository() -> None:
    cited = re.compile(r"\b(DESIGN|OFFLINE|DEMO-FEASIBILITY|DISTRIBUTED)\.md\b")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _tracked_text_files()
        if p.name != "test_docs.py"
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if cited.search(line)
    ]
    assert not hits, hits


def test_relative_markdown_links_resolve() -> None:
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for path in _tracked_text_files():
        if path.suffix != ".md":
            continue
        for target in link.findall(path.read_text(errors="replace")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)} → {target}")
    assert not broken, broken


def test_every_strategy_named_in_docs_and_comments_exists() -> None:
    options = {p.stem for p in (CONF_DIR / "strategy").glob("*.yaml")}
    named = re.compile(r"(?<![\w.])strategy=([A-Za-z_][\w]*)")
    wrong = []
    for p in _tracked_text_files():
        if p.name == "test_docs.py":
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in named.finditer(line):
                # In Python files only comments and quoted command lines, not keyword arguments.
                if p.suffix == ".py" and not any(c in line[: m.start()] for c in "#`'\""):
                    continue
                if m.group(1) not in options:
                    wrong.append(f"{p.relative_to(REPO)}:{i}: {m.group(0)}")
    assert not wrong, wrong
