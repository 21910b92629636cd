"""Two loss options of the flow-matching stages (issues 15 and 20).

``stage.weighting.relative`` (per-sample edit ratio):
* an editor that returns Picture 1 (a fresh, zero-initialised one) scores exactly 1 on every row with a Picture 1,
  and a T2I row is scored against predicting zeros; the exact ground truth scores 0;
* the region weights enter numerator and denominator alike; schemes it would cancel, ``gate_split`` and
  ``preserve_base`` are refused.

``stage.preserve_base`` (output preservation for adapter runs; ``weight`` scales the preserved rows only):
* refused without an adapter; at the adapter's zero start every preserved row has loss 0 while the new task's rows
  keep their ground-truth loss; once the adapter moved, a preserved row's loss is its distance to the adapter-off
  output (not to its ground truth), and its gradient reaches only the adapter.
"""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException

from conftest import compose
from test_edit_gate import _batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _stage(tmp_path, *overrides: str, perturb: bool = False):
    from hydra.utils import instantiate

    cfg = compose(["backbone.transformer_config.num_layers=2", *overrides], tmp_path)
    torch.manual_seed(0)
    stage = instantiate(cfg.stage, text_encoder=None)
    stage.configure_model()
    if perturb:
        torch.nn.init.normal_(stage.backbone.transformer.proj_out.weight, std=0.1)
    return stage


def _with_tasks(batch, tasks):
    return {**batch, "tasks": list(tasks)}


def test_relative_loss_is_one_for_returning_picture_1_and_zero_for_the_truth(tmp_path) -> None:
    stage = _stage(tmp_path, "+stage.weighting.relative=true", "stage.weighting.scheme=uniform")
    batch = _batch()
    with torch.no_grad():
        loss, parts = stage.flow_loss(batch)
    torch.testing.assert_close(loss, torch.ones(3))  # the fresh editor returns Picture 1 exactly
    x0 = parts["x0"]
    sigma = parts["sigma"]
    perfect = stage.backbone.velocity_from_x0(parts["x_t"], x0, sigma)
    assert stage.relative_mse(x0, parts["x_t"], perfect, sigma, parts["refs"], None).abs().max() < 1e-10
    t2i = stage.relative_mse(
        x0, parts["x_t"], stage.backbone.velocity_from_x0(parts["x_t"], 0 * x0, sigma), sigma, [], None
    )
    torch.testing.assert_close(t2i, torch.ones(3))  # T2I rows: the identity is "predict zeros"


def test_relative_loss_weights_the_region_in_both_terms(tmp_path) -> None:
    stage = _stage(
        tmp_path,
        "+stage.weighting.relative=true",
        "stage.weighting.scheme=x0_mse",
        "+stage.weighting.region_weight=5",
        perturb=True,
    )
    with torch.no_grad():
        loss, parts = stage.flow_loss(_batch())
        x0, x_t, sigma, refs = parts["x0"], parts["x_t"], parts["sigma"], parts["refs"]
        x0_hat = stage.backbone.predicted_x0(x_t, parts["v_hat"].float(), sigma)
    from rededit.flow.weighting import region_weights

    w = region_weights(_batch(), 5.0, x0.shape[-2:])
    want = ((x0_hat - x0) ** 2 * w).flatten(1).mean(1) / ((refs[0] - x0) ** 2 * w).flatten(1).mean(1)
    torch.testing.assert_close(loss, want)
    assert (loss - 1).abs().max() > 1e-3  # the perturbed editor no longer returns Picture 1


@pytest.mark.parametrize(
    "overrides",
    [
        ["stage.weighting.scheme=logit_normal"],
        ["backbone.edit_gate=true", "+stage.weighting.mask_loss=1", "+stage.weighting.gate_split=true"],
        ["stage.weighting.scheme=x0_mse", "adapter=lora", "stage.preserve_base={except_tasks:[color]}"],
    ],
)
def test_relative_loss_refuses_what_it_would_silently_change(tmp_path, overrides) -> None:
    with pytest.raises(InstantiationException, match="relative"):
        _stage(tmp_path, "+stage.weighting.relative=true", *overrides)


def test_preserve_base_needs_an_adapter(tmp_path) -> None:
    with pytest.raises(InstantiationException, match="needs an adapter"):
        _stage(tmp_path, "stage.preserve_base={except_tasks:[color]}")


def test_preserved_rows_train_toward_the_adapter_off_output(tmp_path) -> None:
    from rededit.models.adapters import adapters_disabled

    stage = _stage(
        tmp_path, "adapter=lora", "adapter.rank=2", "stage.preserve_base={except_tasks:[color]}", perturb=True
    )
    batch = _with_tasks(_batch(), ["color", "add", "remove"])  # row 0 learns, rows 1-2 are preserved
    with torch.no_grad():
        loss, _ = stage.flow_loss(batch)
    assert loss[0] > 0 and torch.all(loss[1:] == 0)  # LoRA's zero start: adapter on == adapter off
    lora_b = [p for n, p in stage.backbone.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.05)
    loss, parts = stage.flow_loss(batch)
    with torch.no_grad(), adapters_disabled(stage.backbone):
        x_t, sigma = parts["x_t"], parts["sigma"]
        v_off = stage.backbone(x_t, parts["refs"], sigma, batch["text_emb"], batch["text_mask"])
    drift = (parts["v_hat"].float() - v_off).pow(2).flatten(1).mean(1)
    from rededit.flow.weighting import loss_weight, region_weights

    w = loss_weight(sigma, **stage.weighting)
    rw = (
        region_weights(batch, stage.region_weight_now(), x_t.shape[-2:])
        if stage.region_weight_now() > 0
        else 1.0
    )
    want = w * ((parts["v_hat"].float() - v_off).pow(2) * rw).flatten(1).mean(1)
    torch.testing.assert_close(loss[1:].detach(), want[1:])
    assert torch.all(drift[1:] > 0)
    loss[1:].sum().backward()  # the preserved rows' gradient reaches the adapter only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for n, p in stage.backbone.named_parameters() if not p.requires_grad)


def test_preserve_weight_scales_the_preserved_rows_only(tmp_path) -> None:
    losses = []
    for weight in (1, 3):
        stage = _stage(
            tmp_path / str(weight),
            "adapter=lora",
            "adapter.rank=2",
            f"stage.preserve_base={{except_tasks:[color],weight:{weight}}}",
            perturb=True,
        )
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in stage.backbone.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
            losses.append(stage.flow_loss(_with_tasks(_batch(), ["color", "add", "remove"]))[0])
    torch.testing.assert_close(losses[1][0], losses[0][0])
    torch.testing.assert_close(losses[1][1:], 3 * losses[0][1:])
    assert torch.all(losses[0][1:] > 0)
