"""Several training runs, one after the other, in ONE spawned process group (tests/test_adapters_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/multiprocess/run_plan.py PLAN.json

``PLAN.json`` is a list of runs ``{"out": RUN, "overrides": [...], "dump_step0": bool, "dump_batches": bool}``;
each goes through ``rededit.train.run`` exactly as ``rededit-train`` does, with train_dist.py's recorder writing
``RUN/records``. Starting the processes, importing torch / diffusers / Lightning and joining the process group
dominate a tiny run on 2 CPU cores, so one group serves every run of a strategy (Lightning reuses an
initialised process group). A failing run stops the plan with a non-zero exit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest.compose
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_dist's recorder

from train_dist import Recorder

from conftest import compose


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    import rededit.train as train_mod

    original = train_mod._instantiate_group
    for item in plan:
        out = Path(item["out"])
        cfg = compose(item["overrides"], out)
        recorder = Recorder(
            out / "records", item.get("dump_step0", False), None, item.get("dump_batches", False)
        )

        def with_recorder(node, recorder=recorder):
            items = original(node)
            if items and all(isinstance(i, L.Callback) for i in items) and recorder not in items:
                items.append(recorder)  # the callbacks group (loggers are not callbacks)
            return items

        train_mod._instantiate_group = with_recorder
        train_mod.run(cfg)
        recorder.fh.close()
        print(f"RUN DONE {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
