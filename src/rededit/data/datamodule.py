"""``EditDataModule``: manifest → buckets → Multi-Condition Aware Bucket Sampler → StatefulDataLoader.

Lightning's distributed sampler must be off (``Trainer(use_distributed_sampler=False)``): the bucket
sampler shards by rank itself, and its state (seed, epoch, cursor) rides in the checkpoint through
torchdata's ``StatefulDataLoader`` (docs/architecture.md: rank 0's copy restores every rank).

Validation rows (``val_split``): ``"holdout"`` holds ``val_holdout`` rows out of the training split
(:func:`hold_out`: drawn from the seed alone, never trained on), a manifest split name takes that split, and
None serves no validation loader. Validation batches are fixed (:class:`ValidationBatchSampler`): the same
rows in the same batches at every validation, whatever the training step, so ``val/loss`` compares across
steps (the stage draws each sample's noise and σ from its id, :meth:`BaseStage._draw`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torchdata.stateful_dataloader import StatefulDataLoader

from rededit.data.alignment import SIAConfig
from rededit.data.buckets import BucketAssignment, ResolutionSet, assign_buckets, load_bucket_config
from rededit.data.collate import EditCollator
from rededit.data.dataset import EditDataset, SampleKey
from rededit.data.images import DEFAULT_MAX_PIXELS
from rededit.data.manifest import Manifest
from rededit.data.sampler import MultiConditionBucketSampler, bucket_batch_sizes
from rededit.data.text_cache import resolve_cache_dir
from rededit.data.text_choice import TextMix
from rededit.data.text_conditioning import TextConditioner
from rededit.data.uri import allow_outside_root as allow_outside_root_env
from rededit.data.validate import ManifestError
from rededit.utils.config_checks import ConfigError
from rededit.utils.logging import get_logger
from rededit.utils.seeding import numpy_rng

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


class ValidationBatchSampler:
    """Fixed validation batches of :class:`SampleKey`: every row once (or a little padding, below).

    Rows are grouped by bucket (one shape per image position), each bucket cut into batches of at most its
    training batch size ``b = floor(C / L)`` (a partial last batch is kept: nothing is dropped), and the
    batches ordered by a shuffle drawn from the seed alone, so the first ``trainer.limit_val_batches`` of
    them mix buckets and tasks. Step ``s`` gives rank ``r`` batch ``s·W + r``. Every rank must run the same
    number of steps, so while the batch count is not a multiple of ``W`` the largest batch is split in two;
    if that is not enough (fewer rows than ranks) batches from the start are repeated, as Lightning's
    distributed sampler pads. Keys carry epoch 0 and step 0: a sample's per-sample choices (its instruction
    variant) depend on its row alone, not on the batching or the world size.

    Args:
        assignment: the validation rows' buckets.
        token_budget: ``C``, as in training.
        world_size / rank: data-parallel ranks.
        seed: the batch order's seed.
        max_batch_size: optional cap on ``b``.
    """

    def __init__(
        self,
        assignment: BucketAssignment,
        *,
        token_budget: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        max_batch_size: int | None = None,
    ):
        try:  # the training batch size of each bucket, and the same refusal of over-budget samples
            bs = bucket_batch_sizes(assignment, int(token_budget), max_batch_size)
        except ValueError as err:
            raise ConfigError(f"validation rows, data.token_budget={token_budget}: {err}") from err
        batches: list[tuple[int, list[int]]] = []
        for bucket in range(assignment.num_buckets):
            rows = np.nonzero(assignment.bucket_of_row == bucket)[0].tolist()
            size = int(bs[bucket])
            batches += [(bucket, rows[lo : lo + size]) for lo in range(0, len(rows), size)]
        order = numpy_rng(seed, "validation_batches").permutation(len(batches))
        batches = [batches[i] for i in order]
        while batches and len(batches) % world_size:
            i = max(range(len(batches)), key=lambda k: len(batches[k][1]))
            bucket, rows = batches[i]
            if len(rows) < 2:
                break
            half = len(rows) // 2
            batches[i : i + 1] = [(bucket, rows[:half]), (bucket, rows[half:])]
        self.padded = (-len(batches)) % world_size if batches else 0
        batches += [batches[k % len(batches)] for k in range(self.padded)]
        self._batches = batches[int(rank) :: int(world_size)]
        self._shapes = {b: assignment.bucket_shapes(b) for b, _ in self._batches}

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for bucket, rows in self._batches:
            shapes = self._shapes[bucket]
            target, refs = tuple(shapes["target"]), tuple(tuple(r) for r in shapes["references"])
            yield [SampleKey(row=r, epoch=0, step=0, target_hw=target, ref_hws=refs) for r in rows]


def holdout_count(val_holdout: float, rows: int) -> int:
    """Rows ``val_holdout`` asks for out of ``rows``: a fraction in (0, 1) rounds up, a whole number >= 1 counts."""
    try:
        v = float(val_holdout)
    except (TypeError, ValueError):
        v = -1.0
    if not v > 0 or (v >= 1 and v != int(v)):
        raise ConfigError(
            f"data.val_holdout must be a fraction in (0, 1) or a whole row count >= 1, got {val_holdout}"
        )
    return max(1, int(np.ceil(v * rows))) if v < 1 else int(v)


def hold_out(manifest: Manifest, val_holdout: float, seed: int) -> tuple[Manifest, Manifest]:
    """``(training rows, held-out rows)`` of ``manifest``: disjoint, together every row.

    The held-out rows are drawn without replacement from ``numpy_rng(seed, "val_holdout")`` over the row
    positions: the same seed and manifest give the same split on every rank, machine, world size and resume.

    Raises:
        ConfigError: the hold-out would leave no training row.
    """
    n = holdout_count(val_holdout, len(manifest))
    if n >= len(manifest):
        raise ConfigError(
            f"data.val_holdout={val_holdout} holds out {n} of the {len(manifest)} training rows of "
            f"{manifest.path}, leaving none to train on: lower it, or validate on a split (data.val_split=<name>)"
        )
    picked = np.sort(numpy_rng(seed, "val_holdout").choice(len(manifest), size=n, replace=False))
    keep = np.ones(len(manifest), dtype=bool)
    keep[picked] = False
    train = Manifest(manifest.table.filter(pa.array(keep)), root=manifest.root, path=manifest.path)
    held = Manifest(manifest.table.take(pa.array(picked)), root=manifest.root, path=manifest.path)
    return train, held


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
        split: manifest ``split`` of the training rows (None: all rows).
        val_split: validation rows: ``"holdout"`` (``val_holdout`` of the training split, never trained on),
            a manifest ``split`` value, or None (no validation loader).
        val_holdout: with ``val_split="holdout"``: a fraction in (0, 1) of the training split (rounded up,
            at least one row) or a row count; drawn from ``seed`` (:func:`hold_out`).
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
        val_holdout: float = 0.01,
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
        self.val_holdout = val_holdout
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
        # This manifest's folder only (inherited by workers): rededit.data.uri's docstring.
        if allow_outside_root:
            allow_outside_root_env(True, root=Path(manifest).parent)
        self.validate_files = validate_files
        self._world_size, self._rank = world_size, rank
        self.resset = ResolutionSet.from_config(self.bucket_cfg)
        self.train_sampler: SampleKeyBatchSampler | None = None
        self.val_sampler: ValidationBatchSampler | None = None
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
            try:
                self._manifest = Manifest.open(
                    self.manifest_path, validate=True, check_files=self.validate_files
                )
            except ManifestError as err:  # names the rows and columns: one sentence, exit 2 (no traceback)
                raise ConfigError(f"data.manifest: {err}") from err
        return self._manifest

    def _split_rows(self) -> None:
        """``train_manifest`` and ``val_manifest`` (None without validation rows), once."""
        if hasattr(self, "train_manifest"):
            return
        manifest = self.manifest
        train = select_split(manifest, self.split)
        val = None
        if self.val_split == "holdout":
            train, val = hold_out(train, self.val_holdout, self.seed)
        elif self.val_split is not None:
            try:
                val = select_split(manifest, self.val_split)
            except ValueError as err:
                raise ConfigError(f"data.val_split={self.val_split!r}: {err}") from None
        self.train_manifest, self.val_manifest = train, val

    def setup(self, stage: str | None = None) -> None:
        self._split_rows()
        world_size, rank = self._dist()
        if self.train_sampler is None:
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
        if self.val_manifest is not None and self.val_sampler is None:
            assignment = assign_buckets(
                self.val_manifest.sizes(), self.resset, task_groups=self.bucket_cfg.get("task_groups")
            )
            self.val_sampler = ValidationBatchSampler(
                assignment,
                token_budget=self.token_budget,
                world_size=world_size,
                rank=rank,
                seed=self.seed,
                max_batch_size=self.max_batch_size,
            )
            held = self.val_split == "holdout"
            log.info(
                "validation data: %d rows (%s), %d batches per rank%s",
                len(self.val_manifest),
                f"held out of split {self.split!r}" if held else f"split {self.val_split!r}",
                len(self.val_sampler),
                f" ({self.val_sampler.padded} repeated for {world_size} ranks)"
                if self.val_sampler.padded
                else "",
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
        """Lightning asks for it only when validation runs (``trainer.limit_val_batches > 0``)."""
        if self.val_split is None:
            log.info("validation is off (data.val_split=null): this run logs no val/loss")
            return []
        if self.val_sampler is None:
            self.setup("validate")
        if len(self.val_sampler) == 0:  # rows always give a batch; an empty loader must never pass silently
            raise ConfigError(f"data.val_split={self.val_split!r} gives no validation batch")
        # Validation sees the instruction as written: no reference shuffling or dropping.
        return self._loader(self.val_manifest, self.val_sampler, sia=False)
