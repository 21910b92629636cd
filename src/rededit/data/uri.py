"""Image URIs. One function resolves every URI, so every reader (dataset, validator, text cache,
benchmarks, reports) gets new storage for free.

Two kinds of URI exist:

* a file path (``images/abc.png``, absolute, or ``file://...``), relative paths resolved against the
  manifest's folder;
* a member of a tar shard, ``shard-00000.tar#<key>`` (the path part resolved like a file path), read
  by seek + read through the shard's index without extracting anything (:mod:`rededit.data.shards`).
"""

from __future__ import annotations

from pathlib import Path

from rededit.data.shards import read_member

__all__ = ["resolve_path", "resolve_uri", "split_shard_uri"]

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
    """
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme (no network access): {uri!r}")
    path = Path(uri.removeprefix("file://"))
    return path if path.is_absolute() else Path(root) / path


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
