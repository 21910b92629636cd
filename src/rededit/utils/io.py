"""Files: failure-safe writing (an artifact is written under a temporary name and renamed into place, so a
crash never leaves a half-written file behind under the final name), file hashes and strict JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def current_umask() -> int:
    """The process umask (Linux: read from ``/proc``; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode a plain ``mkdir`` would give a new folder under the current umask."""
    return 0o777 & ~current_umask()


def make_private_temp_public(path: str | os.PathLike) -> None:
    """Give a ``tempfile.mkstemp`` / ``mkdtemp`` result (0600 / 0700 whatever the umask) the mode a plain write
    would have had, so an artifact renamed into place is readable by whoever the user's umask allows
    (teammates on shared storage)."""
    os.chmod(path, dir_mode() if Path(path).is_dir() else file_mode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path`` (atomic on POSIX).

    On an exception the temporary file is removed and ``path`` is left untouched. The file gets the mode a
    plain write would give under the umask (``mkstemp`` alone makes it 0600).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # After the writer: some (safetensors) replace the file with a 0600 one of their own.
        make_private_temp_public(tmp_path)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically (:func:`atomic_path`) and close it."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------------ hashing
def sha256_files(files: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """Hex SHA-256 over files: per file its name (relative to ``root``, else the base name), then its bytes."""
    h = hashlib.sha256()
    for f in map(Path, files):
        name = str(f.relative_to(root)) if root is not None else f.name
        h.update(name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of one file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- JSON
def json_safe(value: Any, fallback: Callable[[Any], Any] | None = None) -> Any:
    """``value`` as strict JSON data: NaN/±inf → None, numpy scalars and arrays → Python, paths → str,
    tuples → lists. Anything else goes through ``fallback`` (e.g. ``str``), or raises ``TypeError``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return json_safe(value.item(), fallback)
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), fallback)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v, fallback) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, fallback) for v in value]
    if fallback is not None:
        return fallback(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write ``json_safe(data)`` as strict JSON (no NaN) atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")
    return path
