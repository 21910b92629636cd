"""A preempted run ends with a checkpoint, no export and a non-zero exit code (issue 17 §2: SIGTERM on a run
without the preemption callback exited 0 with no checkpoint and no export)."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest

from conftest import compose, train_overrides
from rededit.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class KillAt(L.Callback):
    """Send this process ``signame`` when batch ``at`` starts (the scheduler's SIGTERM)."""

    def __init__(self, at: int = 1, signame: str = "SIGTERM") -> None:
        self.at, self.signum = at, getattr(signal, signame)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            os.kill(os.getpid(), self.signum)


def test_every_recipe_handles_preemption_by_default(tmp_path) -> None:
    from conftest import CONF_DIR

    recipes = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    assert {"demo", "demo_pretrain", "demo_sft", "pretrain", "sft", "dpo", "nft"} <= set(recipes)
    recipes.append(None)  # no experiment= at all
    for recipe in recipes:
        cfg = compose([f"experiment={recipe}"] if recipe else [], tmp_path)
        assert cfg.callbacks.preemption._target_ == "rededit.callbacks.preemption.PreemptionCheckpoint", (
            recipe
        )


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_preempted_run_saves_exits_non_zero_and_exports_nothing(tiny_corpus, tmp_path, signame) -> None:
    before = signal.getsignal(getattr(signal, signame))
    overrides = train_overrides(
        tiny_corpus,
        "experiment=demo",
        f"export_dir={tmp_path / 'export'}",
        f"+callbacks.kill={{_target_: test_preemption_exit.KillAt, at: 1, signame: {signame}}}",
        steps=6,
        budget=256,
    )
    with pytest.raises(SystemExit) as exit_info:
        run(compose(overrides, tmp_path))
    assert exit_info.value.code == 128 + getattr(signal, signame)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "export").exists()
    assert signal.getsignal(getattr(signal, signame)) == before
