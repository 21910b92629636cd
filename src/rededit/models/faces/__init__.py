"""Face parts of the identity-consistency loss (report §3.7): detectors, alignment, identity backbones.

Detectors run offline (``rededit-data faces``); alignment and the frozen identity backbones run in the
training step (see :mod:`rededit.losses.consistency`). Heavy imports (cv2, onnx, facexlib) happen inside
the classes that need them.
"""

from rededit.models.faces.alignment import (
    ARCFACE_TEMPLATE_112,
    align_faces,
    crop_boxes,
    estimate_similarity,
    face_matrices,
    warp_affine,
)
from rededit.models.faces.detectors import (
    FaceDetections,
    FaceDetector,
    RetinaFaceDetector,
    YuNetDetector,
    build_detector,
)
from rededit.models.faces.identity import ArcFaceIRSE50Identity, FaceIdentity, SFaceIdentity

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "ArcFaceIRSE50Identity",
    "FaceDetections",
    "FaceDetector",
    "FaceIdentity",
    "RetinaFaceDetector",
    "SFaceIdentity",
    "YuNetDetector",
    "align_faces",
    "build_detector",
    "crop_boxes",
    "estimate_similarity",
    "face_matrices",
    "warp_affine",
]
