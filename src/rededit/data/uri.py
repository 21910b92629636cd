"""Image URIs. One function resolves every URI, so new storage (``shard.tar#key`` tar shards, added
by the scale-out work) slots in here without touching the dataset or the validator."""

from __future__ import annotations

from pathlib import Path


def resolve_uri(uri: str, root: str | Path) -> bytes:
    """Return the bytes behind ``uri``. Relative paths resolve against ``root`` (the manifest's folder).

    Raises:
        FileNotFoundError: the file does not exist (the message names the resolved path).
        ValueError: the URI scheme is not supported.
    """
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme (no network access): {uri!r}")
    path = Path(uri.removeprefix("file://"))
    if not path.is_absolute():
        path = Path(root) / path
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {uri!r} (resolved to {path})")
    return path.read_bytes()
