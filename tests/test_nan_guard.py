"""NaN guard: a non-finite gradient skips the optimizer step; ``max_consecutive`` in a row stop training.

"Skipped" means exactly nothing moves: AdamW's weights *and* moments (``exp_avg``, ``exp_avg_sq``,
``step``) stay as they were — zeroed gradients would still move the weights through momentum.
The trainer clips gradients (Table 1: 1.0) as the real config does; the guard runs before clipping.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_loader, tiny_trainer
from rededit.callbacks.nan_guard import NaNGuard

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_optim(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[i][name], b[i][name]) for i in a for name in ("step", "exp_avg", "exp_avg_sq")
    )


def test_nonfinite_gradient_skips_the_optimizer_step(tiny_module, tmp_path) -> None:
    module = tiny_module(nan_batches={1})
    guard = NaNGuard(max_consecutive=2)
    trainer = tiny_trainer(tmp_path, [guard], max_steps=4, gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=tiny_loader())
    w, opt = module.step_weights, module.step_optim
    assert trainer.global_step == 4 and len(w) == 4
    assert _same_weights(w[1], w[0]) and _same_optim(opt[1], opt[0])  # batch 1: nothing moved
    assert not _same_weights(w[2], w[1]) and not _same_weights(w[0], module.step_weights[3])
    assert all(torch.isfinite(v).all() for v in module.weights().values())
    assert int(opt[3][0]["step"]) == 3  # AdamW counted the three real updates only
    assert (guard.total, guard.consecutive) == (1, 0)
    assert guard.state_dict() == {"total": 1, "consecutive": 0}


def test_a_finite_step_resets_the_count(tiny_module, tmp_path) -> None:
    module = tiny_module(nan_batches={0, 2})
    initial = module.weights()
    guard = NaNGuard(max_consecutive=2)
    tiny_trainer(tmp_path, [guard], max_steps=4).fit(module, train_dataloaders=tiny_loader())
    assert (guard.total, guard.consecutive) == (2, 0)  # bad, good, bad, good: never 2 in a row
    w = module.step_weights
    assert _same_weights(w[0], initial) and _same_weights(w[2], w[1]) and not _same_weights(w[3], w[2])


def test_max_consecutive_stops_training_naming_the_batch(tiny_module, tmp_path) -> None:
    module = tiny_module(nan_batches={1, 2, 3})
    guard = NaNGuard(max_consecutive=2)
    trainer = tiny_trainer(tmp_path, [guard], max_steps=4)
    with pytest.raises(FloatingPointError, match=r"2 consecutive non-finite") as err:
        trainer.fit(module, train_dataloaders=tiny_loader())
    # Batch 2 (the second bad one in a row) holds samples s4 and s5.
    assert "['s4', 's5']" in str(err.value) and "step 2" in str(err.value)
    assert len(module.step_weights) == 2  # batch 2's step never ran
    with pytest.raises(ValueError):
        NaNGuard(max_consecutive=0)


def test_guard_state_round_trip() -> None:
    guard = NaNGuard()
    guard.load_state_dict({"total": 5})
    assert guard.state_dict() == {"total": 5, "consecutive": 0}
    guard.load_state_dict({"total": 5, "consecutive": 2})
    assert guard.state_dict() == {"total": 5, "consecutive": 2}


def test_a_run_that_ends_on_skipped_updates_fails(tiny_module, tmp_path) -> None:
    # Issue 17 §2: with a large max_consecutive the run finished (exit 0, editor exported) although its
    # last updates were all skipped.
    module = tiny_module(nan_batches={2, 3})
    guard = NaNGuard(max_consecutive=100)
    trainer = tiny_trainer(tmp_path, [guard], max_steps=4)
    with pytest.raises(FloatingPointError, match=r"ended on 2 skipped non-finite update"):
        trainer.fit(module, train_dataloaders=tiny_loader())
    # A bad step followed by good ones still finishes.
    module = tiny_module(nan_batches={1})
    tiny_trainer(tmp_path / "ok", [NaNGuard(max_consecutive=100)], max_steps=4).fit(
        module, train_dataloaders=tiny_loader()
    )
