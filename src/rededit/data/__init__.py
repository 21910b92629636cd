"""The training input path: from a manifest to batches.

Manifest schema and validation (:mod:`.manifest`, :mod:`.schema`, :mod:`.validate`), image URIs and tar-shard
reading (:mod:`.uri`, :mod:`.shards`), image loading and bucket resizing (:mod:`.images`), resolution buckets
(:mod:`.buckets`, eq. 1), the multi-condition bucket sampler (:mod:`.sampler`), Stochastic Instruction Alignment
(:mod:`.alignment`), instruction choice and the text-embedding cache (:mod:`.text_choice`,
:mod:`.text_conditioning`, :mod:`.text_cache`), the dataset, collate function and datamodule. Everything that
*makes* data is in :mod:`rededit.datagen`.

May import: ``rededit.flow``/``losses``/``parallel``, ``rededit.models``, ``rededit.utils``.
"""
