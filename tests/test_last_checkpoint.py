"""``last.ckpt`` holds the state training ended in, also when the last step is not a multiple of
``every_n_train_steps`` (Lightning 2.6 writes it at the end only if nothing was saved during the run:
``rededit-consolidate`` of such a run gave older weights than its export)."""

from __future__ import annotations

import torch

from conftest import compose, train_overrides


def test_last_checkpoint_is_the_final_step(tiny_corpus, tmp_path) -> None:
    from rededit.stages.checkpoints import consolidate_with_step
    from rededit.train import run

    torch.set_num_threads(1)
    out = tmp_path / "run"
    overrides = train_overrides(
        tiny_corpus,
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "data.text_cache=null",
        "optimizer.lr=1e-2",
        steps=3,
    )
    run(compose(overrides, out))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step0000002.ckpt"], ckpts
    last, _, step = consolidate_with_step(out / "checkpoints" / "last.ckpt")
    at2, _, step2 = consolidate_with_step(out / "checkpoints" / "step0000002.ckpt")
    assert (step, step2) == (3, 2)
    assert any(not torch.equal(last[k], at2[k]) for k in last)  # step 3 trained on after the periodic save
