"""The source input (issue 15, :mod:`rededit.models.source_in`).

* off (the default) builds nothing: same state dict, no hook, bit-identical outputs;
* on, a fresh backbone equals the plain one (zero start) and only ``source_in.*`` is added;
* once trained it feeds each target token Picture 1's token at the *same place*: moving one token of Picture 1
  moves the transformer's input embedding of exactly that target token and of no reference token;
* it needs the source-residual mode; an export with it reloads and predicts identically; an adapter run freezes it.
"""

from __future__ import annotations

import pytest
import torch

from rededit.models.packing import pack_latents
from test_edit_gate import _stage, assert_export_reloads, assert_off_builds_nothing, build
from test_fireedit_options import inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_off_builds_nothing() -> None:
    assert_off_builds_nothing("source_in", "img_in")


def test_on_adds_only_its_weights_and_starts_as_the_plain_backbone() -> None:
    plain, on = build(), build(source_in=True)
    missing, unexpected = on.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("source_in.") for k in missing)
    torch.nn.init.normal_(plain.transformer.proj_out.weight, std=0.2)  # an output that reads the input
    on.load_state_dict(plain.state_dict(), strict=False)
    args = inputs()
    assert torch.equal(on(*args), plain(*args))
    assert not on.transformer.img_in._forward_hooks


def _embeddings(backbone, args) -> torch.Tensor:
    """The image stream entering the first block in one forward ``[B, N_target + N_ref, D]``."""
    seen: list[torch.Tensor] = []
    handle = backbone.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            backbone(*args)
    finally:
        handle.remove()
    return seen[-1]


def test_each_target_token_reads_picture_1_at_its_own_place() -> None:
    on = build(source_in=True)
    torch.nn.init.normal_(on.source_in.proj.weight)
    x, refs, sigma, text, mask = inputs()
    before = _embeddings(on, (x, refs, sigma, text, mask))
    moved = refs[0].clone()
    moved[:, :, 2:4, 4:6] += 1.0  # exactly one 2×2 token of Picture 1: row 1, column 2 of the 4×4 token grid
    after = _embeddings(on, (x, [moved], sigma, text, mask))
    n = pack_latents(x, on.patch_size).shape[1]
    changed = (after - before).abs().amax(dim=-1)  # [B, N]
    assert torch.all(changed[:, 1 * 4 + 2] > 0)  # the target token at that place
    changed[:, 1 * 4 + 2] = 0
    changed[:, n + 1 * 4 + 2] = 0  # the reference token itself (it is Picture 1's own input)
    assert torch.count_nonzero(changed) == 0


def test_a_t2i_sample_is_untouched_and_the_residual_mode_is_required() -> None:
    on = build(source_in=True)
    torch.nn.init.normal_(on.source_in.proj.weight)
    plain = build()
    plain.load_state_dict(on.state_dict(), strict=False)
    x, _, sigma, text, mask = inputs()
    assert torch.equal(on(x, [], sigma, text, mask), plain(x, [], sigma, text, mask))  # no Picture 1
    with pytest.raises(ValueError, match="source_residual"):
        build(source_in=True, source_residual=False)


def test_export_with_the_source_input_reloads_identically(tmp_path) -> None:
    override = "backbone.source_in=true"
    stage, cfg = _stage(tmp_path / "on", override)
    assert_export_reloads(stage, cfg, "source_in", override, tmp_path)


def test_an_adapter_run_freezes_the_source_input() -> None:
    from rededit.models.adapters import apply_adapter

    backbone = build(source_in=True)
    apply_adapter(backbone, {"type": "lora", "rank": 2, "alpha": 2, "target_modules": ["attn.to_q"]})
    assert not any(p.requires_grad for p in backbone.source_in.parameters())
    assert any(p.requires_grad for n, p in backbone.named_parameters() if "lora_A" in n)
