"""Each entry point's ``--help`` lists its own config groups, not every folder of the config tree."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from rededit.cli.help import groups_help


def _groups(text: str) -> set[str]:
    return {line.split(":")[0] for line in text.splitlines() if ":" in line}


def _help_head(entry: str) -> str:
    """``python -m rededit.cli.<entry> --help`` (must exit 0) up to the composed config."""
    out = subprocess.run(
        [sys.executable, "-m", f"rededit.cli.{entry}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("== Config ==")[0]


def test_train_help_lists_training_groups_only() -> None:
    groups = _groups(groups_help("train"))
    assert {"experiment", "stage", "strategy", "logger", "data/buckets", "+ablation"} <= groups
    assert not {"eval/benchmark", "engine/pipeline", "stage/shared"} & {g.split("@")[0] for g in groups}


def test_eval_help_lists_the_benchmark_group_as_it_is_overridden() -> None:
    groups = _groups(groups_help("eval"))
    assert "eval/benchmark@benchmark" in groups
    assert not {"experiment", "ablation", "+ablation", "engine/pipeline", "strategy"} & groups


def test_rededit_train_help_uses_the_entry_point_template() -> None:
    head = _help_head("train")
    assert "rededit-train" in head and "experiment: " in head
    assert "eval/benchmark" not in head and "engine/pipeline" not in head


def test_rededit_memory_help_lists_the_training_groups() -> None:
    """``rededit-memory`` composes ``train.yaml`` plus its own node: its ``--help`` runs (it crashed on the unregistered
    help resolver) and lists the training groups it takes."""
    head = _help_head("memory")
    assert "rededit-memory" in head and "adapter: " in head and "experiment: " in head
    assert "eval/benchmark" not in head
