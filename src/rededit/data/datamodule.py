"""``EditDataModule``: manifest → buckets → Multi-Condition Aware Bucket Sampler → StatefulDataLoader.

Lightning's distributed sampler must be off (``Trainer(use_distributed_sampler=False)``): the bucket
sampler shards by rank itself, and its state (seed, epoch, cursor) rides in the checkpoint through
torchdata's ``StatefulDataLoader`` (docs/architecture.md: rank 0's copy restores every rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import pyarrow.compute as pc
from torchdata.stateful_dataloader import StatefulDataLoader

from rededit.data.alignment import SIAConfig
from rededit.data.buckets import BucketAssignment, ResolutionSet, assign_buckets, load_bucket_config
from rededit.data.collate import EditCollator
from rededit.data.dataset import EditDataset, SampleKey
from rededit.data.images import DEFAULT_MAX_PIXELS
from rededit.data.manifest import Manifest
from rededit.data.sampler import MultiConditionBucketSampler
from rededit.data.text_cache import resolve_cache_dir
from rededit.data.text_choice import TextMix
from rededit.data.text_conditioning import TextConditioner
from rededit.data.uri import allow_outside_root as allow_outside_root_env
from rededit.utils.config_checks import ConfigError
from rededit.utils.logging import get_logger

log = get_logger(__name__)


class SampleKeyBatchSampler:
    """Adapter that turns the bucket sampler's ``(row, bucket)`` batches into :class:`SampleKey` batches.

    Each key carries (epoch, step) for the per-sample random choices and the bucket's exact shapes,
    so a sample merged into a neighbouring bucket is loaded at that bucket's resolution. State, length
    and epoch handling are the wrapped sampler's (this adapter holds no state of its own).

    The wrapped sampler is ``bucket_sampler``, deliberately not ``sampler``: Lightning calls
    ``batch_sampler.sampler.set_epoch(<its epoch counter>)`` at every epoch start, and its counter runs
    ahead of the data epoch once a run stopped by ``max_steps`` mid-epoch is checkpointed (Lightning
    saves that as a finished epoch). Forwarding it would skip the rest of the data epoch on resume
    (and every later epoch would stay shifted), so the bucket sampler owns its epoch: it advances by
    itself after a full pass and its (epoch, cursor) is restored from the checkpoint.

    Args:
        sampler: the bucket sampler (built with ``yield_buckets=True``).
        rewind: restart at (epoch 0, cursor 0) on every iteration: validation sees the same batches
            and noise each time it runs, whatever the training epoch.
    """

    def __init__(self, sampler: MultiConditionBucketSampler, *, rewind: bool = False):
        if not sampler.yield_buckets:
            raise ValueError("SampleKeyBatchSampler needs a sampler built with yield_buckets=True")
        self.bucket_sampler = sampler
        self.rewind = rewind
        self._shapes: dict[int, tuple[tuple[int, int], tuple[tuple[int, int], ...]]] = {}

    def _bucket_shapes(self, bucket: int) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
        if bucket not in self._shapes:
            shapes = self.bucket_sampler.assignment.bucket_shapes(bucket)
            self._shapes[bucket] = (tuple(shapes["target"]), tuple(tuple(r) for r in shapes["references"]))
        return self._shapes[bucket]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        sampler = self.bucket_sampler
        if self.rewind:
            sampler.load_state_dict({"epoch": 0, "cursor": 0})
        for batch in sampler:
            # The sampler advances its cursor before yielding, so the step of this batch is cursor - 1.
            epoch, step = sampler.epoch, sampler.cursor - 1
            keys = []
            for row, bucket in batch:
                target_hw, ref_hws = self._bucket_shapes(bucket)
                keys.append(SampleKey(row=row, epoch=epoch, step=step, target_hw=target_hw, ref_hws=ref_hws))
            yield keys

    def __len__(self) -> int:
        return len(self.bucket_sampler)

    def set_epoch(self, epoch: int) -> None:
        """Explicit jump to ``epoch`` (Lightning does not call this one; see the class docstring)."""
        self.bucket_sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.bucket_sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bucket_sampler.load_state_dict(state)


def select_split(manifest: Manifest, split: str | None) -> Manifest:
    """Rows of ``split`` (all rows when ``split`` is None or the manifest has no ``split`` column)."""
    if split is None or not manifest.has("split"):
        return manifest
    table = manifest.table.filter(pc.equal(manifest.table.column("split"), split))
    if table.num_rows == 0:
        raise ValueError(f"manifest {manifest.path} has no rows with split == {split!r}")
    return Manifest(table, root=manifest.root, path=manifest.path)


class EditDataModule(L.LightningDataModule):
    """Datasets, the bucket sampler and ``StatefulDataLoader`` for every stage.

    Args:
        manifest: Parquet manifest path (validated on load: an invalid one is refused with every problem).
        buckets: bucket set, a ``conf/data/buckets`` node (``areas``/``ratios``/``patch``/``task_groups``)
            or the name of one (``"tiny"``, ``"ct"``).
        token_budget: visual tokens per device and step, ``C`` of §3.2.
        split / val_split: manifest ``split`` values for training and validation (None: all rows / no val).
        text_mix: Table 1 caption mixture and §2.5.2 instruction styles (:class:`TextMix` fields).
        sia: Stochastic Instruction Alignment settings (:class:`SIAConfig` fields); None disables it.
        text_encoder: optional frozen :class:`~rededit.models.text_encoder.TextEncoder`; when given, batches
            carry ``text_emb``/``text_mask`` (cache hits from ``text_cache``, misses encoded online).
        on_bad_sample: ``skip`` (drop, count, log the row id) or ``stop`` (raise) for unreadable images.
        validate_files: also decode every image when the manifest is opened (slow on big manifests).
    """

    def __init__(
        self,
        manifest: str,
        buckets: Mapping[str, Any] | str = "tiny",
        token_budget: int = 2048,
        *,
        seed: int = 0,
        split: str | None = "train",
        val_split: str | None = None,
        max_batch_size: int | None = None,
        small_bucket_policy: str = "merge",
        task_weights: Mapping[str, float] | None = None,
        cluster_balance: bool = False,
        text_mix: Mapping[str, Any] | None = None,
        sia: Mapping[str, Any] | None = None,
        text_encoder: Any | None = None,
        text_cache: str | None = None,
        text_cache_write_back: bool = False,
        num_workers: int = 0,
        on_bad_sample: str = "skip",
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        allow_outside_root: bool = False,
        validate_files: bool = False,
        world_size: int | None = None,
        rank: int | None = None,
    ):
        super().__init__()
        self.manifest_path = manifest
        self.bucket_cfg = dict(load_bucket_config(buckets) if isinstance(buckets, str) else buckets)
        self.token_budget = int(token_budget)
        self.seed = int(seed)
        self.split, self.val_split = split, val_split
        self.max_batch_size = max_batch_size
        self.small_bucket_policy = small_bucket_policy
        self.task_weights = dict(task_weights) if task_weights else None
        self.cluster_balance = cluster_balance
        self.text_mix = TextMix.from_config(text_mix)
        self.sia = SIAConfig(**dict(sia)) if sia else None
        self.text_encoder = text_encoder
        self.text_cache = resolve_cache_dir(text_cache, manifest)
        self.text_cache_write_back = text_cache_write_back
        self.num_workers = int(num_workers)
        self.on_bad_sample = on_bad_sample
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        if allow_outside_root:  # process-wide (and inherited by workers): rededit.data.uri's docstring
            allow_outside_root_env(True)
        self.validate_files = validate_files
        self._world_size, self._rank = world_size, rank
        self.resset = ResolutionSet.from_config(self.bucket_cfg)
        self.train_sampler: SampleKeyBatchSampler | None = None
        self.val_sampler: SampleKeyBatchSampler | None = None
        self._manifest: Manifest | None = None

    # ------------------------------------------------------------------ setup
    def _dist(self) -> tuple[int, int]:
        if self._world_size is not None:
            return int(self._world_size), int(self._rank or 0)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        return 1, 0

    def _build_sampler(
        self, manifest: Manifest, *, shuffle: bool, world_size: int, rank: int
    ) -> SampleKeyBatchSampler:
        assignment: BucketAssignment = assign_buckets(
            manifest.sizes(), self.resset, task_groups=self.bucket_cfg.get("task_groups")
        )
        sampler = MultiConditionBucketSampler(
            assignment,
            token_budget=self.token_budget,
            world_size=world_size,
            rank=rank,
            seed=self.seed,
            shuffle=shuffle,
            small_bucket_policy=self.small_bucket_policy,
            task_weights=self.task_weights if shuffle else None,
            cluster_balance=self.cluster_balance and shuffle,
            max_batch_size=self.max_batch_size,
            yield_buckets=True,
        )
        return SampleKeyBatchSampler(sampler, rewind=not shuffle)

    @property
    def manifest(self) -> Manifest:
        """The whole manifest (every split), opened and validated on first use."""
        if self._manifest is None:
            self._manifest = Manifest.open(self.manifest_path, validate=True, check_files=self.validate_files)
        return self._manifest

    def setup(self, stage: str | None = None) -> None:
        manifest = self.manifest
        world_size, rank = self._dist()
        if self.train_sampler is None:
            self.train_manifest = select_split(manifest, self.split)
            self.train_sampler = self._build_sampler(
                self.train_manifest, shuffle=True, world_size=world_size, rank=rank
            )
            stats = self.train_sampler.bucket_sampler.stats()
            log.info(
                "train data: %d rows, %d buckets, %d steps/epoch (world size %d), merged %d, dropped %d",
                len(self.train_manifest),
                self.train_sampler.bucket_sampler.assignment.num_buckets,
                len(self.train_sampler),
                world_size,
                stats.get("merged", 0),
                stats.get("dropped", 0),
            )
            if len(self.train_sampler) == 0:
                # A fit over zero batches "finishes" at once and exits 0 having trained nothing.
                raise ConfigError(
                    f"data.manifest={self.manifest_path}: the {len(self.train_manifest)} rows of split "
                    f"{self.split!r} fill no batch of data.token_budget={self.token_budget} on each of "
                    f"{world_size} rank(s) ({stats.get('dropped', 0)} dropped as too few per bucket); add rows "
                    "or lower data.token_budget"
                )
        if self.val_split is not None and self.val_sampler is None:
            self.val_manifest = select_split(manifest, self.val_split)
            self.val_sampler = self._build_sampler(
                self.val_manifest, shuffle=False, world_size=world_size, rank=rank
            )

    # ------------------------------------------------------------------ loaders
    def _loader(
        self, manifest: Manifest, batch_sampler: SampleKeyBatchSampler, sia: bool
    ) -> StatefulDataLoader:
        conditioner = None
        if self.text_encoder is not None:
            conditioner = TextConditioner(
                self.text_encoder,
                root=str(manifest.root),
                cache_dir=self.text_cache,
                write_back=self.text_cache_write_back,
            )
        dataset = EditDataset(
            manifest, text_mix=self.text_mix, seed=self.seed, max_image_pixels=self.max_image_pixels
        )
        collator = EditCollator(
            seed=self.seed,
            sia=self.sia if sia else None,
            text_conditioner=conditioner,
            on_bad_sample=self.on_bad_sample,
            substitute=dataset.substitute,
        )
        return StatefulDataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        if self.train_sampler is None:
            self.setup("fit")
        return self._loader(self.train_manifest, self.train_sampler, sia=True)

    def val_dataloader(self) -> StatefulDataLoader | list:
        if self.val_split is None:
            return []
        if self.val_sampler is None:
            self.setup("validate")
        # Validation sees the instruction as written: no reference shuffling or dropping.
        return self._loader(self.val_manifest, self.val_sampler, sia=False)
