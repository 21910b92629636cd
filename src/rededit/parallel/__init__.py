"""Scale-out (report §3.2 "System-Level Efficiency and Stability"): the one place that shards the backbone.

* :mod:`rededit.parallel.parallelize`: ``fully_shard`` per transformer block (FSDP2), the 2-D replicate ×
  shard mesh of HSDP, activation checkpointing, the mixed-precision policy, frozen copies (DPO reference,
  NFT old policy) and meta-device / rank-0 initialisation.
* :mod:`rededit.parallel.strategy`: ``FSDP2Strategy`` (Lightning ``ModelParallelStrategy`` + our mesh +
  atomic sharded checkpoints).
* :mod:`rededit.parallel.checkpoint_io` / :mod:`rededit.parallel.file_checkpoint_io`: atomic checkpoint writes
  (directory and file); :mod:`rededit.parallel.safe_dcp`: DCP loading that unpickles nothing but metadata.

May import: ``rededit.models``, ``rededit.utils``.
"""

from rededit.parallel.parallelize import (
    ParallelPlan,
    build_mesh,
    copy_shards_,
    frozen_copy,
    full_state_dict,
    load_full_state,
    materialize,
    meta_init,
    parallelize_backbone,
    parallelize_frozen,
)

__all__ = [
    "ParallelPlan",
    "build_mesh",
    "copy_shards_",
    "frozen_copy",
    "full_state_dict",
    "load_full_state",
    "materialize",
    "meta_init",
    "parallelize_backbone",
    "parallelize_frozen",
]
