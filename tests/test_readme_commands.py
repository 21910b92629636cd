"""The README's "Using it" commands run, in the order the README gives them, from an empty folder.

Each line of the block is run as written, with three kinds of changes that keep it inside a test's budget
and never change what the command does: smaller sizes (rows, steps, trials, items), the sampler's step
count, and the judge's ``base_url`` pointed at a local fake OpenAI-compatible server. ``rededit-eval ...``
lines are the previous ``rededit-eval`` command plus their own arguments, as the README means them.
Slow tier: the whole chain (data, pretrain, resume, SFT, DPO pairs, DPO, mining, NFT, DDP, a sweep,
three evaluations, an edit) takes minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, fake_endpoint

# ~3.5 min on an idle 2-core machine; more than pytest's default 600 s limit when the machine is shared.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

# Per command: values to replace (flag or Hydra key → value) and arguments to add.
SMALLER_TRAIN = {"trainer.max_steps": "2", "data.token_budget": "512"}
SCALE: dict[str, tuple[dict[str, str], list[str]]] = {
    "synth": ({"--n": "240", "--max-side": "64"}, []),
    "make-pairs": ({}, ["--limit", "12", "--candidates", "2", "--steps", "2"]),
    "mine-hard": (
        {},
        ["--samples", "2", "--steps", "2", "--min-mean", "0", "--min-spread", "0"],
    ),
    "rededit-eval": ({}, ["benchmark.max_per_task=1", "sampler.steps=2"]),
    "rededit-edit": ({}, ["--steps", "2"]),
}


def readme_commands() -> list[list[str]]:
    """The command lines of the README's "Using it" bash block, comments removed."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Using it\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no 'Using it' bash block"
    return [argv for line in block.group(1).splitlines() if (argv := shlex.split(line, comments=True))]


def _set(argv: list[str], key: str, value: str) -> list[str]:
    """Replace ``key value`` / ``key=value`` in ``argv``, or add it."""
    out = list(argv)
    for i, arg in enumerate(out):
        if key.startswith("--") and arg == key:
            out[i + 1] = value
            return out
        if not key.startswith("--") and arg.split("=", 1)[0] == key:
            out[i] = f"{key}={value}"
            return out
    return [*out, key, value] if key.startswith("--") else [*out, f"{key}={value}"]


def scaled(argv: list[str], previous_eval: list[str] | None, base_url: str) -> list[str]:
    """``argv`` at test scale (module docstring)."""
    if argv[:2] == ["rededit-eval", "..."]:
        assert previous_eval, "a 'rededit-eval ...' line needs a full rededit-eval line before it"
        argv = [*previous_eval, *argv[2:]]
    argv = [re.sub(r'base_url: "[^"]*"', f'base_url: "{base_url}"', a) for a in argv]
    name = argv[1] if argv[0] == "rededit-data" else argv[0]
    replace, extra = SCALE.get(name, ({}, []))
    if name == "rededit-train":
        resume = any(a.startswith("ckpt_path=") for a in argv)
        replace = {**SMALLER_TRAIN, "trainer.max_steps": "4" if resume else "2"}
        if "-m" in argv:
            replace |= {"hydra.sweeper.n_trials": "2"}
    for key, value in replace.items():
        argv = _set(argv, key, value)
    return [*argv, *[a for a in extra if name != "rededit-eval" or a not in argv]]


def test_readme_commands_run_in_order(tmp_path) -> None:
    commands = readme_commands()
    assert [c[0] for c in commands].count("rededit-train") >= 5
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("REDEDIT_ROOT", None)
    answer = "Prompt Compliance: 4\nVisual Naturalness: 3\nPhysical & Detail Coherence: 3"

    def respond(server, body):
        return 200, {"choices": [{"message": {"role": "assistant", "content": answer}}]}

    previous_eval: list[str] | None = None
    with fake_endpoint(respond) as (server, base_url):
        for argv in commands:
            if argv[0] == "rededit-edit":  # the README's A.png: a picture of the corpus
                first = sorted((tmp_path / "outputs" / "data" / "synthetic").rglob("*.png"))[0]
                Image.open(first).convert("RGB").save(tmp_path / "A.png")
            run = scaled(argv, previous_eval, base_url)
            if run[0] == "rededit-eval":
                previous_eval = [a for a in run if a not in SCALE["rededit-eval"][1]]
            out = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert out.returncode == 0, f"{shlex.join(run)} failed ({out.returncode}):\n{out.stderr[-4000:]}"

    outputs = tmp_path / "outputs"
    # The resume continued in the first run's folder, past its last step (no second pretrain folder).
    assert {"pretrain", "sft", "dpo", "nft"} <= {p.name for p in (outputs / "runs").iterdir()}
    last = torch.load(outputs / "runs" / "pretrain" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    metrics = json.loads((outputs / "eval" / "metrics.json").read_text())
    assert metrics["systems"]["model"]["overall"]["n"] > 0
    assert server.requests, "the judge line never reached the judge"
    assert Image.open(tmp_path / "B.png").size == Image.open(tmp_path / "A.png").size
