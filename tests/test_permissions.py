"""Files and folders rededit writes atomically are readable as the user's umask says (issue 17 §5: the
atomic writer's temporary files were 0600, its export folders 0700, whatever the umask)."""

from __future__ import annotations

import os
import stat

import pytest

from rededit.utils.io import atomic_write_text, current_umask, dir_mode, file_mode


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_follows_the_umask(tmp_path, umask, mask) -> None:
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "shared" / "manifest.json", "{}")
    mode = stat.S_IMODE((tmp_path / "shared" / "manifest.json").stat().st_mode)
    assert mode == 0o666 & ~mask == file_mode()
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert mode == stat.S_IMODE(plain.stat().st_mode)  # what a plain write gives


def test_exported_transformer_folder_follows_the_umask(tmp_path, umask) -> None:
    pytest.importorskip("diffusers")
    from conftest import untrained_tiny_export

    umask(0o002)
    export = untrained_tiny_export(tmp_path)
    folder = export / "transformer"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775 == dir_mode()
    for f in [*folder.iterdir(), *export.iterdir()]:
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, (
                f
            )  # group/other may read, as the umask says


def test_a_manifest_its_images_and_a_text_cache_follow_the_umask(tmp_path, umask) -> None:
    """The other artifacts the issue names: a corpus (manifest and images) and a text-embedding cache written
    under a group-sharing umask are readable and writable by the group, like plain writes."""
    import torch

    from rededit.data.text_cache import TextEmbeddingCache
    from rededit.datagen.synth.writer import synthesize

    umask(0o002)
    synthesize(tmp_path / "corpus", n=4, seed=0, bench_n=1, min_side=64, max_side=64)
    TextEmbeddingCache(tmp_path / "cache", "probe").put_many({"k": torch.ones(3, 4)})
    written = [p for p in (tmp_path / "corpus").rglob("*")] + [p for p in (tmp_path / "cache").rglob("*")]
    assert any(p.name == "manifest.parquet" for p in written)
    assert any(p.suffix == ".safetensors" for p in written)
    for path in written:
        want = dir_mode() if path.is_dir() else file_mode()
        assert stat.S_IMODE(path.stat().st_mode) == want, path
