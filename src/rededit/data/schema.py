"""The manifest schema: one typed Parquet table for every stage (Pretrain … NFT).

A row is one training sample: a target image, 0..K ordered reference images (T2I rows have none),
the texts that condition it, and optional supervision for later stages. Every image is a URI
resolved by :func:`rededit.data.uri.resolve_uri`: a path relative to the manifest, or
``shard-00000.tar#key`` for tar shards with an index (``rededit-data shard``, :mod:`rededit.data.shards`).

Text columns and Table 1 of the report:

* ``caption``            structured caption ("Structured Cap.", §2.5.1)
* ``caption_original``   raw metadata / alt-text style caption ("Original Cap.")
* ``instruction``        detailed instruction (§2.5.2; "Instructive Cap." for edits); may be empty for T2I
* ``instruction_concise``, ``instruction_user``   concise / user-like refinements (§2.5.2)
* ``<column>_zh``        Chinese variant of any text column above
* ``caption_type``       which text style the row's primary text is (original / structured / instructive)
"""

from __future__ import annotations

import pyarrow as pa

REQUIRED_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("instruction", pa.string()),
    pa.field("target", pa.string(), nullable=False),
    pa.field("target_width", pa.int32(), nullable=False),
    pa.field("target_height", pa.int32(), nullable=False),
    pa.field("references", pa.list_(pa.string()), nullable=False),
    pa.field("reference_widths", pa.list_(pa.int32()), nullable=False),
    pa.field("reference_heights", pa.list_(pa.int32()), nullable=False),
)

TEXT_COLUMNS: tuple[str, ...] = (
    "caption",
    "caption_original",
    "instruction",
    "instruction_concise",
    "instruction_user",
)

OPTIONAL_FIELDS: tuple[pa.Field, ...] = (
    pa.field("caption", pa.string()),
    pa.field("caption_original", pa.string()),
    pa.field("instruction_concise", pa.string()),
    pa.field("instruction_user", pa.string()),
    *(pa.field(f"{c}_zh", pa.string()) for c in TEXT_COLUMNS),
    pa.field("caption_type", pa.string()),
    pa.field("split", pa.string()),
    pa.field("edit_mask", pa.string()),  # URI of a single-channel mask at the target's size
    pa.field("rejected", pa.string()),  # URI of a dispreferred edit at the target's size (DPO, §3.6.1)
    pa.field("ocr_target", pa.string()),  # exact text expected in the target (text edits)
    # [F, 5, 2] float pixel coordinates in the target image (F faces, 5 landmarks, x/y), flattened.
    pa.field("face_landmarks", pa.list_(pa.float32())),
    pa.field("source", pa.string()),  # dataset of origin / synthesis template
    pa.field("cluster", pa.int64()),  # semantic cluster for uniform-over-cluster balancing (§3.4)
    pa.field("inverse_of", pa.string()),  # id of the forward edit this Task Inversion row swaps (§2.3)
    pa.field("object_boxes", pa.list_(pa.float32())),  # [O, 4] x0,y0,x1,y1 in target pixels, flattened
)

REQUIRED_COLUMNS: tuple[str, ...] = tuple(f.name for f in REQUIRED_FIELDS)
OPTIONAL_COLUMNS: tuple[str, ...] = tuple(f.name for f in OPTIONAL_FIELDS)
ALL_FIELDS: dict[str, pa.Field] = {f.name: f for f in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)}


def manifest_schema(columns: list[str] | None = None) -> pa.Schema:
    """Schema with all required fields plus the named optional ones (all optional ones by default)."""
    optional = (
        OPTIONAL_FIELDS if columns is None else [ALL_FIELDS[c] for c in columns if c in OPTIONAL_COLUMNS]
    )
    return pa.schema([*REQUIRED_FIELDS, *optional])
