"""``rededit-data longtail index|report|fill|query``: long-tail check-and-fill (report §2.4).

* ``index``  — embed every instruction of a manifest into a FAISS index (``--images`` instead indexes an
  image pool: the manifest's targets and references, for retrieval).
* ``report`` — density per task / instruction cluster, gaps under thresholds (report.json + report.md).
* ``fill``   — synthesise N more rows of a task (or every task gap of a report) and append them.
* ``query``  — sample density near an instruction (instruction index), or nearest pool images to a text
  or a seed image (image index).

Text embedders: ``minilm`` (default, the embedded all-MiniLM-L6-v2) or ``hashing`` (model-free). Image
embedders: ``colour`` (model-free layout/colour descriptor), ``clip=/local/clip`` (a local CLIP/SigLIP folder:
text and image queries) or ``module:Class`` (a class with
``encode_images`` and optionally ``encode``, constructed with no arguments, e.g. a wrapper around a local
CLIP checkpoint). Exit codes: 0 done, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from rededit.datagen.engine import longtail as lt
from rededit.datagen.engine.longtail import (
    CLIPJointEmbedder,
    ColourLayoutEmbedder,
    HashingTextEncoder,
    MiniLMSentenceEncoder,
)


def _text_embedder(name: str):
    if name == "minilm":
        return MiniLMSentenceEncoder()
    if name.startswith("hashing"):
        _, _, dim = name.partition(":")
        return HashingTextEncoder(int(dim) if dim else 256)
    return _load_class(name)


def _image_embedder(name: str):
    if name.startswith("clip="):
        return CLIPJointEmbedder(name.removeprefix("clip="))
    return ColourLayoutEmbedder() if name == "colour" else _load_class(name)


def _load_class(spec: str):
    module, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"embedder {spec!r}: expected minilm, hashing[:DIM], colour or module:Class")
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load embedder {spec!r}: {e}") from e


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "longtail", help="long-tail check-and-fill: index, density report, fill, query", description=__doc__
    )
    sub = p.add_subparsers(dest="longtail_command", required=True)

    i = sub.add_parser("index", help="index a manifest's instructions (or, with --images, its images)")
    i.add_argument("--manifest", required=True)
    i.add_argument("--out", required=True, help="index folder")
    i.add_argument("--columns", default="instruction", help="comma list of text columns to index")
    i.add_argument("--embedder", default="minilm", help="minilm | hashing[:DIM] | module:Class")
    i.add_argument("--include-dropped", action="store_true", help="also index rows with a drop_reason")
    i.add_argument(
        "--index-factory",
        default="Flat",
        help='FAISS factory string, e.g. "OPQ32,IVF65536,PQ32" for 1e8 rows',
    )
    i.add_argument("--images", action="store_true", help="index the manifest's images instead")
    i.add_argument(
        "--image-embedder", default="colour", help="colour | clip=/local/clip_folder | module:Class"
    )

    r = sub.add_parser("report", help="density per task / cluster and gaps")
    r.add_argument("--index", required=True)
    r.add_argument("--clusters", type=int, default=32)
    r.add_argument("--min-per-task", type=int, default=100)
    r.add_argument("--min-per-cluster", type=int, default=10)
    r.add_argument("--tasks", default="", help="comma list of tasks expected to exist (absent ones are gaps)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default=None, help="report folder (default: the index folder)")

    f = sub.add_parser("fill", help="append synthetic rows for a task gap")
    f.add_argument("--manifest", required=True, help="manifest to append to (rewritten atomically)")
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="task to fill")
    g.add_argument("--report", help="report.json: fill every task gap with a template")
    f.add_argument("--n", type=int, default=None, help="rows to add (--task) / cap per task (--report)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--min-side", type=int, default=256)
    f.add_argument("--max-side", type=int, default=512)
    f.add_argument("--zh-prob", type=float, default=0.3)
    f.add_argument("--workers", type=int, default=1)

    q = sub.add_parser("query", help="density near an instruction, or images for a text / seed image")
    q.add_argument("--index", required=True)
    q.add_argument("--text", action="append", default=[], help="query text (repeatable)")
    q.add_argument("--image", default=None, help="seed image file (image index)")
    q.add_argument("--embedder", default=None, help="defaults: minilm (instructions) / colour (images)")
    q.add_argument(
        "--radius", type=float, default=0.8, help="cosine radius that counts as the same instruction"
    )
    q.add_argument("--min-count", type=int, default=10, help="fewer rows within the radius = gap")
    q.add_argument("--k", type=int, default=10)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"rededit-data longtail {args.longtail_command}: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    cmd = args.longtail_command
    if cmd == "index":
        import pyarrow.parquet as pq

        if not Path(args.manifest).is_file():
            raise FileNotFoundError(f"manifest not found: {args.manifest}")
        if args.images:
            t = pq.read_table(args.manifest, columns=["target", "references"])
            uris = t.column("target").to_pylist() + [
                u for refs in t.column("references").to_pylist() for u in refs
            ]
            out = lt.build_image_index(
                uris, Path(args.manifest).parent, _image_embedder(args.image_embedder), args.out
            )
            print(f"indexed {len(set(uris))} images into {out}")
            return 0
        idx = lt.build_instruction_index(
            args.manifest, args.out, _text_embedder(args.embedder),
            columns=[c.strip() for c in args.columns.split(",") if c.strip()], include_dropped=args.include_dropped, index_factory=args.index_factory,
        )  # fmt: skip
        print(f"indexed {idx.info['n_entries']} texts of {idx.info['n_rows']} rows into {idx.folder}")
        return 0
    if cmd == "report":
        rep = lt.density_report(
            args.index, n_clusters=args.clusters, min_per_task=args.min_per_task,
            min_per_cluster=args.min_per_cluster, expected_tasks=[t for t in args.tasks.split(",") if t],
            seed=args.seed, out_dir=args.out,
        )  # fmt: skip
        out = Path(args.out or args.index)
        print((out / "report.md").read_text(), end="")
        print(f"{len(rep['gaps'])} gaps; report: {out / 'report.json'}")
        return 0
    if cmd == "fill":
        kw = {
            "min_side": args.min_side,
            "max_side": args.max_side,
            "zh_prob": args.zh_prob,
            "workers": args.workers,
        }
        if args.task:
            if not args.n:
                raise ValueError("--n is required with --task")
            results = [lt.fill_gap(args.manifest, args.task, args.n, args.seed, **kw)]
        else:
            results = lt.fill_from_report(args.manifest, args.report, args.seed, max_per_task=args.n, **kw)
        for r in results:
            state = "already present" if r.skipped else f"added {r.n_added} rows"
            print(f"{r.task}: {state} ({r.tag})")
        return 0
    # query
    info = (
        json.loads((Path(args.index) / lt.INFO_FILE).read_text())
        if (Path(args.index) / lt.INFO_FILE).is_file()
        else None
    )
    if info is None:
        raise FileNotFoundError(f"{args.index} is not a long-tail index folder")
    if info["kind"] == "images":
        emb = _image_embedder(args.embedder or "colour")
        if args.image:
            from PIL import Image

            with Image.open(args.image) as im:
                hits = lt.query_images(args.index, emb, image=im.convert("RGB"), k=args.k)
        elif len(args.text) == 1:
            hits = lt.query_images(args.index, emb, text=args.text[0], k=args.k)
        else:
            raise ValueError("image index: give --image or exactly one --text")
        print(json.dumps([{"uri": u, "cosine": round(s, 4)} for u, s in hits], indent=1))
        return 0
    if not args.text:
        raise ValueError("instruction index: give at least one --text")
    idx = lt.InstructionIndex.load(args.index)
    res = idx.density(
        args.text,
        _text_embedder(args.embedder or "minilm"),
        radius=args.radius,
        min_count=args.min_count,
        examples=args.k,
    )
    print(json.dumps(res, indent=1, ensure_ascii=False))
    return 0
