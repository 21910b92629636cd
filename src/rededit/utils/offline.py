"""Nothing downloads at run time: the hub's offline switches, and local weight folders that must exist.

The switches must be set before ``huggingface_hub`` is imported (it reads them into module constants at
import), so :mod:`rededit` sets them in its package ``__init__`` — every entry point imports the package
first. A user's explicit value wins (``setdefault``). A weight path is a folder on disk; a string that is not
one is an error that says so, never a hub id to resolve (which would try the network for ~25 s).
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_SWITCHES = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def set_offline_switches() -> None:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` = 1 unless the user set them."""
    for key, value in OFFLINE_SWITCHES.items():
        os.environ.setdefault(key, value)


def require_local_folder(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a :class:`Path` if it is an existing folder, else a clear :class:`FileNotFoundError`.

    Args:
        path: the configured weight folder.
        key: the config key that holds it (named in the message).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{key}={path}: no such folder (working directory {Path.cwd()}). rededit never downloads weights: "
            "point it at a local copy (e.g. one made by `huggingface-cli download <repo> --local-dir <folder>`)."
        )
    return folder
