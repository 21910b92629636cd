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
absolute paths) are read with ``data.allow_outside_root=true`` / ``--allow-outside-root``, recorded in
:data:`ALLOW_ENV` so that data-loader workers (forked or spawned) inherit it. The training datamodule allows
only *its manifest's folder* to be left (the variable holds that root): a benchmark or cache read by the same
process (the sample callback, an evaluation) stays confined to its own folder. ``ALLOW_ENV=1`` (set by hand,
by ``rededit-data --allow-outside-root`` or :func:`outside_root_allowed_here` around paths the user typed)
lets every root be left.
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


ALL_ROOTS = "1"  # ALLOW_ENV value: every root may be left


def _norm(root: str | Path) -> str:
    return os.path.normpath(os.path.abspath(root))


def _listed_roots(value: str) -> list[str]:
    """The roots an :data:`ALLOW_ENV` value lists (``os.pathsep``-separated)."""
    return [v for v in value.split(os.pathsep) if v]


def outside_root_allowed(root: str | Path | None = None) -> bool:
    """Whether URIs under ``root`` may leave it in this process: :data:`ALLOW_ENV` is ``1`` (every root) or
    lists ``root`` (``os.pathsep``-separated). With ``root=None``: whether every root may be left."""
    value = os.environ.get(ALLOW_ENV, "")
    if value == ALL_ROOTS:
        return True
    return root is not None and _norm(root) in _listed_roots(value)


def allow_outside_root(allowed: bool = True, root: str | Path | None = None) -> None:
    """Let (or stop letting) URIs leave ``root`` (``None``: every root) in this process and its future
    workers. Allowing one root never narrows an earlier allowance of every root."""
    value = os.environ.get(ALLOW_ENV, "")
    if not allowed:
        os.environ.pop(ALLOW_ENV, None)
    elif root is None:
        os.environ[ALLOW_ENV] = ALL_ROOTS
    elif value != ALL_ROOTS and _norm(root) not in _listed_roots(value):
        os.environ[ALLOW_ENV] = os.pathsep.join([*_listed_roots(value), _norm(root)])


@contextlib.contextmanager
def outside_root_allowed_here() -> Iterator[None]:
    """Within the block, URIs may leave every root (paths the user typed on their own command line)."""
    previous = os.environ.get(ALLOW_ENV)
    os.environ[ALLOW_ENV] = ALL_ROOTS
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ALLOW_ENV, None)
        else:
            os.environ[ALLOW_ENV] = previous


def check_inside(path: Path, root: str | Path, uri: str) -> Path:
    """``path`` if it lies inside ``root`` (lexically: ``..`` resolved, symlinks not followed) or leaving this
    root is allowed (:func:`outside_root_allowed`); else :class:`PathOutsideRootError` naming the URI and how to allow it."""
    if outside_root_allowed(root):
        return path
    base, full = _norm(root), _norm(path)
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
