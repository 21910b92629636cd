"""EMA callback (report §3.5, §3.8): closed-form math, one update per optimizer step, swapping, checkpoints.

    θ_ema ← d_n · θ_ema + (1 − d_n) · θ,     d_n = min(decay, (1 + n) / (10 + n))

From θ_ema = a and a constant θ = c, n updates give θ_ema = c + (a − c) · Π_{i<n} d_i; while the warm-up
term is below ``decay`` the product telescopes to Π (1 + i)/(10 + i) = n! 9! / (n + 9)! = 1 / C(n + 9, 9).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_loader, tiny_trainer
from rededit.callbacks.ema import EMA

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trainable(module) -> list[str]:
    return [n for n, p in module.backbone.named_parameters() if p.requires_grad]


def _set_all(module, value: float) -> None:
    with torch.no_grad():
        for name in _trainable(module):
            module.backbone.get_parameter(name).fill_(value)


def test_decay_at_is_the_warmup_formula() -> None:
    ema = EMA(decay=0.9)
    for n in range(200):
        assert ema.decay_at(n) == pytest.approx(min(0.9, (1 + n) / (10 + n)), abs=0)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(80) == 0.9
    assert [EMA(decay=0.9, warmup=False).decay_at(n) for n in (0, 5, 500)] == [0.9, 0.9, 0.9]
    for bad in ({"decay": 1.0}, {"decay": -0.1}, {"update_every": 0}):
        with pytest.raises(ValueError):
            EMA(**bad)


@pytest.mark.parametrize(("warmup", "n"), [(True, 1), (True, 6), (False, 6)])
def test_shadow_after_n_updates_of_a_constant_matches_closed_form(tiny_module, warmup, n) -> None:
    module = tiny_module()
    a, c, decay = 1.0, -0.5, 0.99
    ema = EMA(decay=decay, warmup=warmup)
    _set_all(module, a)
    ema._init_shadow(module)
    _set_all(module, c)
    for _ in range(n):
        ema.update(module)
    product = 1 / math.comb(n + 9, 9) if warmup else decay**n
    expected = c + (a - c) * product
    assert ema.num_updates == n
    for name in _trainable(module):
        assert ema.shadow[name].dtype == torch.float32
        torch.testing.assert_close(
            ema.shadow[name], torch.full_like(ema.shadow[name], expected), rtol=0, atol=1e-6
        )
    assert "frozen.weight" not in ema.shadow  # frozen tensors are not averaged


def _replay(initial: dict, steps: list[dict], ema: EMA, names: list[str]) -> dict[str, torch.Tensor]:
    """The shadow by the update rule, from the weights after each optimizer step (same fp32 ops)."""
    shadow = {k: initial[k].float().clone() for k in names}
    for n, weights in enumerate(steps):
        for k in names:
            shadow[k].lerp_(weights[k].float(), 1.0 - ema.decay_at(n))
    return shadow


def test_one_update_per_optimizer_step_under_gradient_accumulation(tiny_module, tmp_path) -> None:
    module = tiny_module()
    initial = module.weights()
    ema = EMA(decay=0.9)
    trainer = tiny_trainer(tmp_path, [ema], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=tiny_loader(n=12))
    assert trainer.global_step == 3 and len(module.step_weights) == 3  # 6 micro-batches, 3 steps
    assert (ema.num_updates, ema.last_step) == (3, 3)
    expected = _replay(initial, module.step_weights, ema, _trainable(module))
    assert all(torch.equal(ema.shadow[k], expected[k]) for k in expected)


def test_update_every_and_start_step(tiny_module, tmp_path) -> None:
    module = tiny_module()
    ema = EMA(decay=0.9, update_every=2, start_step=4)
    tiny_trainer(tmp_path, [ema], max_steps=6).fit(module, train_dataloaders=tiny_loader(n=12))
    # Steps 2 re-initialises (before start_step), 4 and 6 update: the shadow is the replay from step 2.
    assert (ema.num_updates, ema.last_step) == (2, 6)
    w = module.step_weights
    names = _trainable(module)
    shadow = {k: w[1][k].float().clone() for k in names}
    for n, weights in enumerate((w[3], w[5])):
        for k in names:
            shadow[k].lerp_(weights[k].float(), 1.0 - ema.decay_at(n))
    assert all(torch.equal(ema.shadow[k], shadow[k]) for k in names)


@pytest.fixture
def trained(tiny_module, tmp_path):
    """(module, ema) after 3 steps: the shadow differs from the raw weights."""
    module = tiny_module()
    ema = EMA(decay=0.5, warmup=False)
    tiny_trainer(tmp_path, [ema], max_steps=3).fit(module, train_dataloaders=tiny_loader())
    assert any(not torch.equal(ema.shadow[k], module.weights()[k]) for k in ema.shadow)
    return module, ema


def test_swap_in_and_out_restore_the_raw_weights_exactly(trained) -> None:
    module, ema = trained
    raw = module.weights()
    ema.swap_in(module)
    ema.swap_in(module)  # idempotent: the backup still holds the raw weights
    swapped = module.weights()
    assert all(torch.equal(swapped[k], ema.shadow[k]) for k in ema.shadow)
    assert torch.equal(swapped["frozen.weight"], raw["frozen.weight"])
    ema.swap_out(module)
    ema.swap_out(module)
    assert all(torch.equal(module.weights()[k], raw[k]) for k in raw)
    with pytest.raises(KeyError), ema.averaged(module):
        raise KeyError("inside the block")
    assert all(torch.equal(module.weights()[k], raw[k]) for k in raw)


def test_validation_uses_ema_weights_and_checkpoints_hold_raw_weights(tiny_module, tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = tiny_module()
    ema = EMA(decay=0.5, warmup=False)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    trainer = tiny_trainer(
        tmp_path, [ema, ckpt_cb], max_epochs=2, limit_val_batches=1, enable_checkpointing=True
    )
    trainer.fit(module, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader(n=2))
    assert len(module.val_seen) == 2 and len(module.step_weights) == 8
    # The epoch-2 validation ran with the EMA of the weights after step 8, and they were swapped back.
    final_raw = module.step_weights[-1]
    assert all(torch.equal(module.val_seen[-1][k], ema.shadow[k]) for k in ema.shadow)
    assert all(torch.equal(module.weights()[k], final_raw[k]) for k in final_raw)
    # The checkpoint (written on validation end) stores raw weights and the EMA state beside them.
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items()}
    assert all(torch.equal(saved[k], final_raw[k]) for k in final_raw)
    state = ckpt["callbacks"]["EMA"]
    assert state["num_updates"] == 8 and all(
        torch.equal(state["shadow"][k], ema.shadow[k]) for k in ema.shadow
    )
    # Validation outside fit uses the raw weights.
    module.val_seen.clear()
    trainer.validate(module, dataloaders=tiny_loader(n=2), verbose=False)
    assert all(torch.equal(module.val_seen[0][k], final_raw[k]) for k in final_raw)


def test_refuses_to_checkpoint_while_swapped(trained) -> None:
    module, ema = trained
    with ema.averaged(module), pytest.raises(RuntimeError, match="swapped in"):
        ema.on_save_checkpoint(None, module, {})
    ema.on_save_checkpoint(None, module, {})


def test_state_dict_round_trip(trained, tiny_module) -> None:
    _, ema = trained
    state = ema.state_dict()
    restored = EMA(decay=0.5, warmup=False)
    restored.load_state_dict(state)
    assert (restored.num_updates, restored.last_step) == (ema.num_updates, ema.last_step) == (3, 3)
    assert restored.shadow.keys() == ema.shadow.keys()
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)
    restored.shadow["body.0.weight"] += 1  # a copy, not a view of the saved state
    assert not torch.equal(restored.shadow["body.0.weight"], state["shadow"]["body.0.weight"])
    # A restored shadow is checked against the model it is resumed on.
    other = EMA()
    other.load_state_dict(
        {**state, "shadow": {k: v for k, v in state["shadow"].items() if k != "body.0.bias"}}
    )
    with pytest.raises(RuntimeError, match="does not match"):
        other.on_fit_start(None, tiny_module())


def test_ema_state_dict_is_the_full_backbone_with_ema_weights(trained) -> None:
    module, ema = trained
    raw = module.weights()
    full = ema.ema_state_dict(module)
    assert full.keys() == raw.keys()
    assert all(torch.equal(full[k], ema.shadow[k]) for k in ema.shadow)
    assert torch.equal(full["frozen.weight"], raw["frozen.weight"])
    assert all(torch.equal(module.weights()[k], raw[k]) for k in raw)  # the model is untouched


def test_ema_state_dict_rank0_only_keeps_cpu_copies_on_rank_0_only(trained, monkeypatch) -> None:
    """The FSDP2 export path (issue 19): rank 0 gets CPU copies equal to the full state dict, other ranks
    nothing (the gather still runs on every rank: it is a collective)."""
    import rededit.models.ema as ema_module

    module, ema = trained
    full = ema.ema_state_dict(module)
    on_rank0 = ema.ema_state_dict(module, rank0_only=True)
    assert on_rank0.keys() == full.keys()
    assert all(v.device.type == "cpu" and torch.equal(v, full[k]) for k, v in on_rank0.items())
    monkeypatch.setattr(ema_module, "_rank", lambda: 1)
    assert ema.ema_state_dict(module, rank0_only=True) == {}
