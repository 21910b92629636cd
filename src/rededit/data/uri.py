"""Image URIs. One function resolves every URI, so every reader (dataset, validator, text cache,
benchmarks, reports) gets new storage for free.

Two kinds of URI exist:

* a file path (``images/abc.png``, absolute, or ``file://...``), relative paths resolved against the
  manifest's folder;
* a member of a tar shard, ``shard-00000.tar#<key>`` (the path part resolved like a file path), read
  by seek + read through the shard's index without extracting anything (:mod:`rededit.data.shards`).

A manifest may come from anyone, so by default a URI must stay inside the manifest's folder: an absolute
path, a ``file://`` URI or a relative path that climbs out with ``..`` is refused
(:class:`PathOutsideRootError`, a ``ValueError``: the dataset skips and counts the row, ``validate`` names
it). Manifests that name images elsewhere on purpose (``rededit-data make-pairs`` and ``mine-hard`` write
absolute paths) are read with ``data.allow_outside_root=true`` / ``--allow-outside-root``, which set
:data:`ALLOW_ENV` for this process and its data-loader workers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from rededit.data.shards import read_member

__all__ = [
    "ALLOW_ENV",
    "PathOutsideRootError",
    "allow_outside_root",
    "check_inside",
    "outside_root_allowed",
    "outside_root_allowed_here",
    "resolve_path",
    "resolve_uri",
    "split_shard_uri",
]

ALLOW_ENV = "REDEDIT_ALLOW_OUTSIDE_ROOT"


class PathOutsideRootError(ValueError):
    """A URI that names a file outside the folder its manifest (or benchmark) lives in."""


def outside_root_allowed() -> bool:
    """Whether URIs may leave their root in this process (``REDEDIT_ALLOW_OUTSIDE_ROOT=1``)."""
    return os.environ.get(ALLOW_ENV) == "1"


def allow_outside_root(allowed: bool = True) -> None:
    """Let (or stop letting) URIs of this process and its future workers leave their root."""
    if allowed:
        os.environ[ALLOW_ENV] = "1"
    else:
        os.environ.pop(ALLOW_ENV, None)


@contextlib.contextmanager
def outside_root_allowed_here() -> Iterator[None]:
    """Within the block, URIs may leave their root (paths the user typed on their own command line)."""
    previous = outside_root_allowed()
    allow_outside_root(True)
    try:
        yield
    finally:
        allow_outside_root(previous)


def check_inside(path: Path, root: str | Path, uri: str) -> Path:
    """``path`` if it lies inside ``root`` (lexically: ``..`` resolved, symlinks not followed) or leaving the
    root is allowed; else :class:`PathOutsideRootError` naming the URI and how to allow it."""
    if outside_root_allowed():
        return path
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.abspath(path))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise PathOutsideRootError(
            f"{uri!r} names a file outside {base} (absolute, file:// or ..); refused because a manifest or "
            "benchmark may come from anyone. If yours names images elsewhere on purpose, pass "
            "data.allow_outside_root=true (rededit-data: --allow-outside-root)"
        )
    return path


# The path part of a shard URI ends with one of these (the writer only makes ``.tar``).
SHARD_SUFFIXES = (".tar",)


def split_shard_uri(uri: str) -> tuple[str, str] | None:
    """``("shard-00000.tar", "key")`` for a tar-shard URI, ``None`` for anything else.

    Only a ``#`` right after a ``.tar`` path counts, so a plain file whose name contains ``#`` is
    still a file.
    """
    path, sep, key = uri.partition("#")
    if not sep or not path.endswith(SHARD_SUFFIXES):
        return None
    if not key:
        raise ValueError(f"tar-shard URI without a member key after '#': {uri!r}")
    return path, key


def resolve_path(uri: str, root: str | Path) -> Path:
    """The local path a file URI (or a shard URI's path part) names; relative paths join ``root``.

    Raises:
        ValueError: the URI has a scheme other than ``file://`` (no network access).
        PathOutsideRootError: the path leaves ``root`` and that is not allowed (module docstring).
    """
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme (no network access): {uri!r}")
    path = Path(uri.removeprefix("file://"))
    path = path if path.is_absolute() else Path(root) / path
    return check_inside(path, root, uri)


def resolve_uri(uri: str, root: str | Path) -> bytes:
    """Return the bytes behind ``uri``. Relative paths resolve against ``root`` (the manifest's folder).

    Raises:
        FileNotFoundError: the file, the shard, its index or the shard member does not exist (the
            message names the resolved path, and for shards the shard and the key).
        ValueError: the URI scheme is not supported, or a shard member is corrupt
            (:class:`rededit.data.shards.ShardCorruptError`).
    """
    shard = split_shard_uri(uri)
    if shard is not None:
        return read_member(resolve_path(shard[0], root), shard[1], uri=uri)
    path = resolve_path(uri, root)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {uri!r} (resolved to {path})")
    return path.read_bytes()
