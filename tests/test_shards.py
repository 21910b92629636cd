"""Tar-shard payloads (issue 7): ``rededit-data shard`` + ``resolve_uri`` on ``shard.tar#key``.

Round trip byte-identical through the index, offsets equal to what ``tarfile`` itself reads, bucket-major
write order, a data module over the sharded copy serves exactly the batches of the unsharded one,
resumable writing, and every failure (missing shard / index / member, truncated or corrupt bytes)
names the shard and the key.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rededit.data import shards
from rededit.data.images import load_image
from rededit.data.manifest import Manifest
from rededit.data.uri import resolve_uri, split_shard_uri
from rededit.datagen import shard_writer
from rededit.utils.io import sha256_file

SHARD_SIZE = "16KB"  # the 48-row tiny corpus becomes ~20 shards: boundaries get exercised


@pytest.fixture(scope="module")
def sharded(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "corpus"
    shard_writer.write_shards(tiny_corpus, out, shard_size=SHARD_SIZE, buckets="tiny")
    return out / "manifest.parquet"


def _uris(manifest: Manifest) -> list[tuple[int, str, str]]:
    out = []
    for col in shards.URI_COLUMNS:
        if not manifest.has(col):
            continue
        for i, v in enumerate(manifest.table.column(col).to_pylist()):
            for u in v if isinstance(v, list) else [v]:
                if u:
                    out.append((i, col, u))
    return out


def _copy(sharded: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(sharded.parent, dst)
    shards.clear_cache()
    return dst / "manifest.parquet"


def test_split_shard_uri() -> None:
    assert split_shard_uri("shard-00001.tar#a.target.png") == ("shard-00001.tar", "a.target.png")
    assert split_shard_uri("/x/y.tar#k") == ("/x/y.tar", "k")
    assert split_shard_uri("images/a#b.png") is None  # '#' in a plain file name stays a file
    assert split_shard_uri("images/a.png") is None
    with pytest.raises(ValueError, match="without a member key"):
        split_shard_uri("shard-00001.tar#")


def test_round_trip_is_byte_identical_and_manifest_is_drop_in(tiny_corpus, sharded) -> None:
    src, dst = Manifest.open(tiny_corpus), Manifest.open(sharded)
    assert dst.table.schema == src.table.schema
    assert dst.ids.tolist() == src.ids.tolist()  # same rows, same order
    # Everything but the URI columns is unchanged.
    other = [c for c in src.columns if c not in shards.URI_COLUMNS]
    assert dst.table.select(other).equals(src.table.select(other))
    a, b = _uris(src), _uris(dst)
    assert [(i, c) for i, c, _ in a] == [(i, c) for i, c, _ in b]
    assert {c for _, c, _ in a} >= {"target", "references", "edit_mask"}
    for (_, _, u_src), (_, _, u_dst) in zip(a, b):
        assert split_shard_uri(u_dst) is not None
        assert resolve_uri(u_dst, dst.root) == resolve_uri(u_src, src.root)
    # Decoded images too, through the one loader every reader uses.
    u = b[0][2]
    assert np.array_equal(np.asarray(load_image(u, dst.root)), np.asarray(load_image(a[0][2], src.root)))


def test_tar_is_standard_and_index_offsets_match_tarfile(sharded) -> None:
    summary = json.loads((sharded.parent / "shards.json").read_text())
    assert len(summary["shards"]) > 5 and summary["order"].startswith("bucket-major")
    assert sum(s["samples"] for s in summary["shards"]) == len(Manifest.open(sharded))
    for rec in summary["shards"]:
        tar = sharded.parent / rec["tar"]
        index = shards.ShardIndex.load(tar)
        assert index.sha256 == rec["sha256"] == sha256_file(tar)
        with tarfile.open(tar) as tf:
            members = tf.getmembers()
            assert [m.name for m in members] == list(index.members)
            for m in members:
                offset, size, _ = index.members[m.name]
                assert (m.offset_data, m.size) == (offset, size)
                assert tf.extractfile(m).read() == shards.read_member(tar, m.name)


def test_payloads_are_written_bucket_major(sharded) -> None:
    from rededit.data.buckets import ResolutionSet, assign_buckets, load_bucket_config

    manifest = Manifest.open(sharded)
    cfg = load_bucket_config("tiny")
    bucket = assign_buckets(
        manifest.sizes(), ResolutionSet.from_config(cfg), cfg.get("task_groups")
    ).bucket_of_row
    assert len(set(bucket.tolist())) > 3
    # Physical position of each row's target: (shard number, data offset).
    pos = []
    for i, uri in enumerate(manifest.table.column("target").to_pylist()):
        tar, key = split_shard_uri(uri)
        pos.append((int(tar[6:11]), shards.ShardIndex.load(sharded.parent / tar).members[key][0], i))
    seq = [int(bucket[i]) for *_, i in sorted(pos)]
    runs = [b for j, b in enumerate(seq) if j == 0 or b != seq[j - 1]]
    assert runs == sorted(set(seq)), "every bucket is one contiguous run, buckets in id order"
    # A row never straddles shards.
    for col in ("references", "edit_mask"):
        for i, v in enumerate(manifest.table.column(col).to_pylist()):
            for u in v if isinstance(v, list) else [v]:
                if u:
                    assert (
                        split_shard_uri(u)[0]
                        == split_shard_uri(manifest.table.column("target")[i].as_py())[0]
                    )


def test_data_module_serves_identical_batches(tiny_corpus, sharded) -> None:
    from rededit.data.datamodule import EditDataModule

    def batches(manifest: Path) -> list[dict]:
        dm = EditDataModule(str(manifest), "tiny", 512, seed=3, split="train", world_size=1, rank=0)
        dm.setup("fit")
        return list(dm.train_dataloader())

    plain, sharded_batches = batches(tiny_corpus), batches(sharded)
    assert len(plain) == len(sharded_batches) > 3
    for a, b in zip(plain, sharded_batches):
        assert a["ids"] == b["ids"]
        assert torch.equal(a["target"], b["target"])
        assert len(a["references"]) == len(b["references"])
        assert all(torch.equal(x, y) for x, y in zip(a["references"], b["references"]))
        assert (a.get("edit_mask") is None) == (b.get("edit_mask") is None)
        if a.get("edit_mask") is not None:
            assert torch.equal(a["edit_mask"], b["edit_mask"])


def test_benchmark_reader_sees_the_same_bench(tiny_corpus, sharded) -> None:
    from rededit.eval.benchmarks import SyntheticBench

    plain, packed = SyntheticBench(tiny_corpus), SyntheticBench(sharded)
    # The hash covers every item's image bytes: the sharded bench is the same benchmark.
    assert packed.benchmark_hash == plain.benchmark_hash
    a, b = plain[0], packed[0]
    assert np.array_equal(np.asarray(a.target), np.asarray(b.target))
    assert [np.asarray(r).tolist() for r in a.references] == [np.asarray(r).tolist() for r in b.references]


def _read_in_child(args: tuple[str, str]) -> bytes:
    return resolve_uri(*args)


def test_reads_after_fork_use_their_own_handles(sharded) -> None:
    manifest = Manifest.open(sharded)
    uris = [u for _, _, u in _uris(manifest)][:6]
    parent = [resolve_uri(u, manifest.root) for u in uris]  # the parent opens (and caches) shards first
    with multiprocessing.get_context("fork").Pool(2) as pool:
        child = pool.map(_read_in_child, [(u, str(manifest.root)) for u in uris])
    assert child == parent


def test_missing_member_shard_and_index_name_shard_and_key(sharded, tmp_path) -> None:
    manifest = _copy(sharded, tmp_path)
    root = manifest.parent
    with pytest.raises(
        shards.ShardMemberNotFound, match=r"member 'nope\.png' not in tar shard .*shard-00001\.tar"
    ):
        resolve_uri("shard-00001.tar#nope.png", root)
    with pytest.raises(FileNotFoundError, match=r"tar shard not found: .*shard-09999\.tar"):
        resolve_uri("shard-09999.tar#x.png", root)
    uri = pq.read_table(manifest, columns=["target"]).column("target")[0].as_py()
    tar, _ = split_shard_uri(uri)
    (root / f"{tar}.idx.json").unlink()
    shards.clear_cache()  # a process that already opened the shard keeps its index: a fresh one does not
    with pytest.raises(FileNotFoundError, match=rf"index of tar shard .*{tar} not found"):
        resolve_uri(uri, root)
    # The dataset path: a missing member is a missing image (skipped and counted, URI in the reason).
    from rededit.data.dataset import EditDataset, SampleKey, SkippedSample

    ds = EditDataset(Manifest.open(manifest))
    skipped = ds[SampleKey(0, 0, 0, (64, 64), ())]
    assert isinstance(skipped, SkippedSample) and tar in skipped.reason


def test_corrupt_and_truncated_members_name_shard_and_key(sharded, tmp_path) -> None:
    manifest = _copy(sharded, tmp_path)
    root = manifest.parent
    tar = root / "shard-00002.tar"
    key, (offset, size, _) = next(iter(shards.ShardIndex.load(tar).members.items()))
    raw = bytearray(tar.read_bytes())
    raw[offset + size // 2] ^= 0xFF
    tar.write_bytes(bytes(raw))
    with pytest.raises(shards.ShardCorruptError, match=rf"shard-00002\.tar: member '{key}' is corrupt"):
        resolve_uri(f"shard-00002.tar#{key}", root)
    with pytest.raises(ValueError, match="shard-00002"):  # load_image lets it through as a ValueError
        load_image(f"shard-00002.tar#{key}", root)

    shards.clear_cache()
    tar.write_bytes(bytes(raw[: offset + 10]))
    with pytest.raises(shards.ShardCorruptError, match=r"shard-00002\.tar is \d+ bytes but its index"):
        resolve_uri(f"shard-00002.tar#{key}", root)


def test_rerun_skips_finished_shards_and_rewrites_only_what_is_missing(
    tiny_corpus, sharded, tmp_path
) -> None:
    manifest = _copy(sharded, tmp_path)
    out = manifest.parent
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    (out / "shard-00003.tar").unlink()
    (out / "shard-00005.tar.idx.json").unlink()
    (out / ".shard-00007.tar.junk.tmp").write_bytes(b"left by a killed writer")
    summary = shard_writer.write_shards(tiny_corpus, out, shard_size=SHARD_SIZE, buckets="tiny")
    assert (summary.written, summary.skipped) == (2, len(summary.shards) - 2)
    after = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    assert after == before  # deterministic bytes: the rewritten shards equal the first write
    assert pq.read_table(manifest).equals(pq.read_table(sharded))


def test_cli_and_bad_input(tiny_corpus, tmp_path, capsys) -> None:
    from rededit.cli.data import main

    out = tmp_path / "cli"
    assert main(["shard", "--manifest", str(tiny_corpus), "--out", str(out), "--max-samples", "10"]) == 0
    recs = json.loads((out / "shards.json").read_text())["shards"]
    n = len(Manifest.open(tiny_corpus))
    assert [r["samples"] for r in recs] == [10] * (n // 10) + [n % 10] * (n % 10 > 0)
    assert [r["first_row"] for r in recs] == list(range(0, n, 10))  # no --buckets: manifest order
    assert f"{len(recs)} shards ({len(recs)} written" in capsys.readouterr().out
    assert main(["shard", "--manifest", str(tmp_path / "none.parquet"), "--out", str(out)]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert main(["shard", "--manifest", str(tiny_corpus), "--out", str(tiny_corpus.parent)]) == 2
    assert "input manifest's folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shard", "--manifest", str(tiny_corpus), "--out", str(out), "--shard-size", "lots"])
    assert shard_writer.parse_size("1GB") == 2**30 and shard_writer.parse_size("64k") == 65536


def test_benchmark_smoke(tmp_path, capsys) -> None:
    import importlib.util

    from conftest import REPO

    path = REPO / "experiments" / "benchmarks" / "shards" / "run.py"
    spec = importlib.util.spec_from_file_location("shard_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--n", "12", "--reads", "40", "--repeats", "1", "--work", str(tmp_path)])
    assert out["reads"] == 40 and out["shards"] >= 1 and out["files"] > out["shards"]
    for mode in ("bytes", "decode"):
        assert out["results"][mode]["speedup_shards_over_files"] > 0
    assert "shards/files" in capsys.readouterr().out
