"""2 ranks (torchrun, gloo): a trainable backbone sharded by ``parallelize_backbone`` and a frozen copy made by
``frozen_copy`` (meta init → ``parallelize_frozen`` → materialise → rank-0 broadcast of a full state dict)
give the unsharded model's outputs, several forwards per step; ``copy_shards_`` refreshes the copy from the
trained backbone without communication. Prints ``OK`` on rank 0 when every check holds."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import compose


def main() -> int:
    from hydra.utils import instantiate

    from rededit.parallel import (
        ParallelPlan,
        build_mesh,
        copy_shards_,
        frozen_copy,
        full_state_dict,
        parallelize_backbone,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    factory = instantiate(compose(["backbone.transformer_config.num_layers=2"]).backbone)
    torch.manual_seed(0)
    reference = factory(latent_channels=48)
    reference.freeze_unused_text_tail()
    trained = copy.deepcopy(reference)
    mesh = build_mesh(dist.get_world_size())
    plan = ParallelPlan()
    parallelize_backbone(trained, mesh, plan)
    state = reference.state_dict() if rank == 0 else None
    frozen = frozen_copy(factory, mesh, plan, state, device="cpu", latent_channels=48)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 48, 4, 4, generator=g)
    text = torch.randn(2, 3, reference.transformer.config.joint_attention_dim, generator=g)
    args = (x, [x], torch.full((2,), 0.5), text, torch.ones(2, 3, dtype=torch.bool))
    with torch.no_grad():
        want = reference(*args)
        for _ in range(3):  # several forwards per step (DPO: policy + reference, win + lose)
            assert torch.allclose(frozen(*args), want, atol=1e-5), "frozen copy differs"
        assert torch.allclose(trained(*args), want, atol=1e-5), "trained backbone differs"

    # One optimizer step on the trainable copy, then refresh the frozen one shard by shard.
    opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.1)
    (trained(*args) - 1).pow(2).mean().backward()  # not 0: the tiny preset zero-inits proj_out
    opt.step()
    copy_shards_(frozen, trained)
    full_trained, full_frozen = full_state_dict(trained), full_state_dict(frozen)
    assert all(torch.equal(full_trained[k], full_frozen[k]) for k in full_trained), "copy_shards_ mismatch"
    assert not all(torch.equal(full_trained[k], v) for k, v in reference.state_dict().items())
    dist.barrier()
    if rank == 0:
        print("OK")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
