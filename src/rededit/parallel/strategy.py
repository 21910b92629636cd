"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` with our mesh, plan and atomic sharded checkpoints.

Lightning builds a ``("data_parallel", "tensor_parallel")`` mesh and leaves the wrapping to
``LightningModule.configure_model``. This subclass replaces the module's mesh by the FSDP2 / HSDP mesh of
:func:`rededit.parallel.parallelize.build_mesh` (``("shard",)`` or ``("replicate", "shard")``) and carries the
:class:`~rededit.parallel.parallelize.ParallelPlan` that ``BaseStage.configure_model`` hands to
:func:`~rededit.parallel.parallelize.parallelize_backbone`.

Checkpoints (``save_distributed_checkpoint=True``): a DCP directory — every rank writes its shards of the
weights and optimizer state (and the EMA shadow, see ``callbacks/ema.py``) and rank 0 writes the rest
(loop, sampler and curriculum state, callback states) to ``meta.pt``. The directory is written under
``.<name>.tmp`` and swapped in after a barrier, so a kill mid-write keeps the previous checkpoint.
Resuming (``ckpt_path=``) checks a DCP folder's ``.metadata`` against DCP's own classes first and loads with
every ``torch.load`` weights-only (:mod:`rededit.parallel.safe_dcp`): the folder may have been handed over.
An adapter run (``strict_loading=False``) writes only its trainable tensors into the DCP directory and resumes
with :meth:`FSDP2Strategy._load_partial_dcp`, which loads the tensors the folder has (every trainable one).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from rededit.parallel.checkpoint_io import swap_in_dir, tmp_dir_for
from rededit.parallel.parallelize import ParallelPlan, build_mesh
from rededit.parallel.safe_dcp import METADATA_FILE, SafeFileSystemReader, safe_dcp_load, verify_dcp_metadata
from rededit.utils.logging import get_logger
from rededit.utils.safe_load import forced_weights_only

log = get_logger(__name__)
#: Lightning's file of a DCP checkpoint's non-tensor entries (loop, callbacks, hooks' keys).
LIGHTNING_META_FILE = "meta.pt"


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``hsdp=False``) or HSDP (``hsdp=True``) data parallelism over every rank.

    Args:
        parallelize: a :class:`ParallelPlan` or its fields (``shard_size``, ``hsdp``, ``activation_checkpointing``,
            ``param_dtype``, ``reduce_dtype``, ``reshard_after_forward``, ``cpu_offload``, ``meta_init``).
        save_distributed_checkpoint: sharded DCP directory (default) or one full ``.ckpt`` on rank 0.
        **kwargs: passed to ``ModelParallelStrategy`` (``timeout``, ``process_group_backend``).
    """

    def __init__(
        self,
        parallelize: ParallelPlan | dict[str, Any] | None = None,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("data_parallel_size", "auto")
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        if parallelize is None:
            parallelize = ParallelPlan()
        self.plan = (
            parallelize if isinstance(parallelize, ParallelPlan) else ParallelPlan(**dict(parallelize))
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            # Lightning's "auto" means num_nodes (with TP filling the node); we shard data over every rank.
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        self._device_mesh = build_mesh(
            self.world_size,
            self.plan.shard_size,
            hsdp=self.plan.hsdp,
            devices_per_node=self.num_processes,
            device_type=self.root_device.type,
        )
        self.lightning_module._device_mesh = self._device_mesh
        log.info(
            "FSDP2Strategy: mesh %s %s", self._device_mesh.mesh_dim_names, tuple(self._device_mesh.shape)
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if (path / METADATA_FILE).is_file():
            verify_dcp_metadata(path)  # Lightning reads it with torch's plain-pickle reader next
            if not self.lightning_module.strict_loading:
                return self._load_partial_dcp(path)
        with forced_weights_only():  # DCP's byte entries and Lightning's meta.pt: weights and containers only
            return super().load_checkpoint(path, weights_only=True)

    def _load_partial_dcp(self, path: Path) -> dict[str, Any]:
        """Resume from a DCP directory that holds only some of the module's tensors: an adapter run's checkpoint
        keeps only the trainable ones (adapter, FireEdit; ``BaseStage.on_save_checkpoint``) and its frozen base is
        rebuilt from ``stage.init_from`` before this load. Lightning's own loader asks DCP for every key of the
        module and fails on the base; here the module loads the keys the folder has, every trainable tensor must
        be among them, and the optimizer states load as Lightning loads them.

        Returns:
            the non-tensor part of the checkpoint (``meta.pt``), as Lightning's loader does.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module = self.model
        stored = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
        prefix = "state_dict."
        present = {k.removeprefix(prefix) for k in stored if k.startswith(prefix)}
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        missing = [n for n in trainable if n not in present]
        if missing:
            raise ValueError(
                f"{path}: this sharded checkpoint lacks {len(missing)} of the run's {len(trainable)} trainable "
                f"tensors, e.g. {missing[:3]}: it was written by a run with other trainable weights (a full "
                "fine-tune, or another adapter type / rank / targets); resume it with that run's options"
            )
        model_state = {k: v for k, v in get_model_state_dict(module).items() if k in present}
        safe_dcp_load({"state_dict": model_state}, path)
        module.load_state_dict(model_state, strict=False)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            safe_dcp_load(optim_state, path)
            set_optimizer_state_dict(
                module,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        with forced_weights_only():
            return torch.load(path / LIGHTNING_META_FILE, weights_only=True)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(filepath))
        tmp = tmp_dir_for(final)
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-write
        self.barrier("rededit_ckpt_tmp_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("rededit_ckpt_written")
        if self.global_rank == 0:
            swap_in_dir(tmp, final)
        self.barrier("rededit_ckpt_swapped")
