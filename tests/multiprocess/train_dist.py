"""One rank of a multi-process CPU training run (launched by tests/test_strategies_multiprocess.py via torchrun).

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/multiprocess/train_dist.py \
        --out RUN --record RUN/records -- experiment=demo_pretrain strategy=ddp trainer.devices=2 ...

Everything after ``--`` is a Hydra override of conf/train.yaml; the run goes through ``rededit.train.run`` exactly
as ``rededit-train`` does. A recorder callback writes, per rank, one JSON line per training batch
(``records/rank{r}.jsonl``: global step, sampler epoch/step, served target shape, sample ids, local loss) and,
with ``--dump-step0``, the first optimizer step's inputs and full (gathered) gradients plus the initial
weights (``step0_*.pt``). ``--kill-after-step k`` SIGKILLs every rank at the start of the batch after
optimizer step ``k`` (after that step's checkpoint is written): a hard crash, no cleanup. ``--dump-batches`` saves
every batch a rank is served (``batch_g{global step before it}_rank{r}.pt``), and each record carries the
stage's own per-step metrics (``dpo/*``, ``nft/*``, ``reward/*``: this rank's values, not synced).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest.compose

from conftest import compose


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Recorder(L.Callback):
    def __init__(
        self, out: Path, dump_step0: bool, kill_after_step: int | None, dump_batches: bool = False
    ) -> None:
        self.out = out
        self.dump_step0 = dump_step0
        self.dump_batches = dump_batches
        self.kill_after_step = kill_after_step
        self._batch = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.fh = (self.out / f"rank{trainer.global_rank}.jsonl").open("a")
        if self.dump_step0 and trainer.global_step == 0:
            init = {k: _full(v).detach().cpu().clone() for k, v in pl_module.backbone.state_dict().items()}
            if trainer.global_rank == 0:
                torch.save(init, self.out / "step0_init.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.kill_after_step is not None and trainer.global_step >= self.kill_after_step:
            self.fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._batch = batch
        keep = {k: v for k, v in batch.items() if k != "texts"}
        if self.dump_step0 and trainer.global_step == 0:
            torch.save(keep, self.out / f"step0_batch_rank{trainer.global_rank}.pt")
        if self.dump_batches:
            torch.save(keep, self.out / f"batch_g{trainer.global_step}_rank{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.dump_step0 and trainer.global_step == 0:
            grads = {
                n: _full(p.grad).detach().cpu().clone()
                for n, p in pl_module.backbone.named_parameters()
                if p.grad is not None
            }
            if trainer.global_rank == 0:
                torch.save(grads, self.out / "step0_grads.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        keys = batch["target"].shape[-2:]
        record = {
            "global_step": trainer.global_step,  # after this batch's optimizer step
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epoch": int(batch["epoch"]),
            "step": int(batch["step"]),
            "target_hw": list(keys),
            "ids": list(batch["ids"]),
            "skipped": list(batch.get("skipped", ())),  # unreadable rows this batch replaced
            "loss": float(loss.detach()),
            "metrics": {
                k.removesuffix("_step"): float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith(("dpo/", "nft/", "reward/")) and k.endswith("_step")
            },
        }
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--dump-step0", action="store_true")
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--dump-batches", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import rededit.train as train_mod

    cfg = compose(args.overrides, args.out)
    recorder = Recorder(Path(args.record), args.dump_step0, args.kill_after_step, args.dump_batches)
    original = train_mod._instantiate_group

    def with_recorder(node):
        items = original(node)
        if items and all(isinstance(i, L.Callback) for i in items) and recorder not in items:
            items.append(recorder)  # the callbacks group (loggers are not callbacks)
        return items

    train_mod._instantiate_group = with_recorder
    train_mod.run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
