"""The data path end to end through ``EditDataModule`` (issue: foundation and data path, acceptance).

A 2-rank schedule on the synthetic corpus (mixed aspect ratios, 0–3 references): batches are
shape-homogeneous per position, ranks share the bucket at each step, every kept sample is served once
per epoch, tokens stay within the budget, and a mid-epoch resume reproduces the rest of the epoch.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rededit.data.alignment import find_mentions
from rededit.data.collate import BadSampleError
from rededit.data.datamodule import EditDataModule

BUDGET = 1024
PATCH = 8  # tiny buckets: pixel autoencoder ×4, 2×2 packing


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from rededit.datagen.synth.writer import synthesize

    return synthesize(
        tmp_path_factory.mktemp("dm") / "corpus", n=160, seed=3, bench_n=8, min_side=64, max_side=128
    )


def _dm(manifest, rank: int, world: int = 2, **kw) -> EditDataModule:
    dm = EditDataModule(
        str(manifest),
        "tiny",
        BUDGET,
        seed=7,
        split="train",
        world_size=world,
        rank=rank,
        sia={"permute_prob": 0.7, "drop_prob": 0.3, "min_keep": 1},
        **kw,
    )
    dm.setup("fit")
    return dm


def _tokens(batch) -> int:
    imgs = [batch["target"], *batch["references"]]
    return sum(int(np.ceil(t.shape[-2] * t.shape[-1] / PATCH**2)) for t in imgs) * len(batch["ids"])


def test_two_rank_epoch_is_homogeneous_shared_disjoint_and_within_budget(corpus):
    loaders = [_dm(corpus, r).train_dataloader() for r in (0, 1)]
    sampler = loaders[0].batch_sampler.bucket_sampler
    steps = len(loaders[0])
    assert steps > 3 and len(loaders[1]) == steps
    served: list[int] = []
    for b0, b1 in zip(*loaders):
        assert b0["step"] == b1["step"]
        # Same bucket on both ranks: identical shapes at every image position.
        shapes0 = [tuple(b0["target"].shape[-2:])] + [tuple(r.shape[-2:]) for r in b0["references"]]
        shapes1 = [tuple(b1["target"].shape[-2:])] + [tuple(r.shape[-2:]) for r in b1["references"]]
        assert shapes0 == shapes1
        for b in (b0, b1):
            assert b["target"].shape[0] == len(b["ids"])  # stacked: homogeneous per position
            assert all(r.shape[0] == len(b["ids"]) for r in b["references"])
            assert _tokens(b) <= BUDGET
            served += b["rows"]
        assert not set(b0["ids"]) & set(b1["ids"])
    sched = sampler.schedule(0)
    assert len(served) == len(set(served)) == sched.num_scheduled
    assert sched.num_scheduled + sched.num_dropped == len(loaders[0].dataset)


def test_mid_epoch_resume_reproduces_the_rest_of_the_epoch(corpus):
    full = [b["ids"] for b in _dm(corpus, 1).train_dataloader()]
    dm = _dm(corpus, 0)
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()  # rank 0's copy resumes every rank (docs/architecture.md distributed trap 1)
    resumed = _dm(corpus, 1).train_dataloader()
    resumed.load_state_dict(state)
    rest = [b["ids"] for b in resumed]
    assert rest == full[3:]


def test_sia_in_collation_never_names_a_missing_picture(corpus):
    seen_multi = 0
    for b in _dm(corpus, 0, world=1).train_dataloader():
        n = len(b["references"])
        for text, order in zip(b["texts"], b["ref_order"]):
            assert len(order) == n
            assert all(1 <= m.index <= n for m in find_mentions(text)), (text, n)
        seen_multi += n > 1
    assert seen_multi > 0


def test_batches_carry_text_embeddings_from_the_encoder(corpus):
    from rededit.models.text_encoder import MiniLMTextEncoder

    dm = _dm(corpus, 0, world=1, text_encoder=MiniLMTextEncoder(max_length=32))
    batch = next(iter(dm.train_dataloader()))
    assert batch["text_emb"].shape[:2] == batch["text_mask"].shape
    assert batch["text_emb"].shape[0] == len(batch["ids"]) and batch["text_emb"].shape[-1] == 384


def _corrupt_one_target(src: Path, dst: Path) -> str:
    import pyarrow.parquet as pq

    shutil.copytree(src.parent, dst)
    table = pq.read_table(dst / "manifest.parquet")
    victim = table.column("target")[0].as_py()
    (dst / victim).write_bytes(b"not a png")
    return table.column("id")[0].as_py()


def _scheduled_ids(dm: EditDataModule) -> set[str]:
    rows = dm.train_sampler.bucket_sampler.schedule(0).samples
    return {dm.train_manifest.ids[r] for r in rows}


def test_corrupt_image_is_skipped_and_counted_or_stops(corpus, tmp_path):
    bad_dir = tmp_path / "bad"
    victim = _corrupt_one_target(corpus, bad_dir)
    # File validation is off: the loader must cope with an image that broke after validation.
    dm = _dm(bad_dir / "manifest.parquet", 0, world=1)
    assert victim in _scheduled_ids(dm), "the corrupted row must be served for this test to mean anything"
    batches = list(dm.train_dataloader())
    assert [sid for b in batches for sid in b["skipped"]] == [victim]
    assert victim not in {sid for b in batches for sid in b["ids"]}
    stop = _dm(bad_dir / "manifest.parquet", 0, world=1, on_bad_sample="stop")
    with pytest.raises(BadSampleError, match=victim):
        for _ in stop.train_dataloader():
            pass


def test_validated_loading_refuses_a_broken_manifest(corpus, tmp_path):
    from rededit.data.validate import ManifestError
    from rededit.utils.config_checks import ConfigError

    bad_dir = tmp_path / "bad2"
    victim = _corrupt_one_target(corpus, bad_dir)
    dm = EditDataModule(
        str(bad_dir / "manifest.parquet"), "tiny", BUDGET, validate_files=True, world_size=1, rank=0
    )
    with pytest.raises(ConfigError, match=victim) as err:  # one sentence from rededit-train, exit 2
        dm.setup("fit")
    assert isinstance(err.value.__cause__, ManifestError)


def test_images_are_in_range_and_masks_binary(corpus):
    batch = next(iter(_dm(corpus, 0, world=1).train_dataloader()))
    assert batch["target"].min() >= -1 and batch["target"].max() <= 1
    assert torch.isin(batch["edit_mask"], torch.tensor([0.0, 1.0])).all()


def test_an_image_whose_size_the_manifest_misstates_is_a_bad_sample(corpus, tmp_path):
    """The attack: a row whose stated width is not the file's trained in a wrong bucket."""
    import pyarrow.parquet as pq
    from PIL import Image

    bad_dir = tmp_path / "resized"
    shutil.copytree(corpus.parent, bad_dir)
    table = pq.read_table(bad_dir / "manifest.parquet")
    victim, uri = table.column("id")[0].as_py(), table.column("target")[0].as_py()
    img = Image.open(bad_dir / uri)
    img.resize((img.width // 2, img.height)).save(bad_dir / uri)  # decodes fine, wrong size
    dm = _dm(bad_dir / "manifest.parquet", 0, world=1)
    assert victim in _scheduled_ids(dm)
    batches = list(dm.train_dataloader())
    assert [sid for b in batches for sid in b["skipped"]] == [victim]


def test_a_real_image_over_the_pixel_cap_is_a_bad_sample(corpus, tmp_path):
    """The attack: a real 176-megapixel PNG (its manifest row honest about its size) was decoded in full and
    trained on. ``data.max_image_pixels`` (64 MP by default) applies to every image the loader reads: here a cap
    between the corpus's sizes makes exactly the rows with a larger target or reference counted bad samples."""
    from conftest import compose

    assert compose([], tmp_path).data.max_image_pixels == 64 * 2**20

    def pixels(row) -> int:
        refs = zip(row.get("reference_widths") or [], row.get("reference_heights") or [])
        return max(w * h for w, h in [(row["target_width"], row["target_height"]), *refs])

    plain = _dm(corpus, 0, world=1)
    ids = plain.train_manifest.ids
    by_id = {ids[i]: pixels(plain.train_manifest.row(i)) for i in range(len(ids))}
    served = _scheduled_ids(plain)
    cap = int(np.median([by_id[i] for i in served]))
    over = {i for i in served if by_id[i] > cap}
    assert over and over != served
    capped = _dm(corpus, 0, world=1, max_image_pixels=cap)
    batches = list(capped.train_dataloader())
    assert {sid for b in batches for sid in b["skipped"]} == over
    assert all(by_id[sid] <= cap for b in batches for sid in b["ids"])


def test_load_image_refuses_oversized_and_misstated_images_before_decoding(tmp_path):
    from PIL import Image

    from rededit.data.images import ImageSizeError, load_image

    Image.new("RGB", (300, 200), 7).save(tmp_path / "big.png")
    with pytest.raises(ImageSizeError, match=r"300x200 \(WxH\) is 0\.1 MP, over the 0\.05 MP cap"):
        load_image("big.png", tmp_path, max_pixels=50_000)
    with pytest.raises(
        ImageSizeError, match=r"decoded size 300x200 \(WxH\) does not match the manifest's 3000x200"
    ):
        load_image("big.png", tmp_path, expect_size=(3000, 200))
    assert load_image("big.png", tmp_path, max_pixels=60_000, expect_size=(300, 200)).size == (300, 200)


@pytest.mark.parametrize("world", [1, 2])
def test_a_batch_of_one_unreadable_sample_is_skipped_and_ranks_stay_in_step(corpus, tmp_path, world):
    """The attack: with one sample per step, an unreadable image raised BadSampleError although
    ``on_bad_sample: skip`` (and under DDP the other rank then died in gloo). Every rank must still get a
    batch: the step trains on a readable row at the same shapes, and the unreadable one is counted."""
    bad_dir = tmp_path / "bad1"
    victim = _corrupt_one_target(corpus, bad_dir)
    per_rank = []
    for rank in range(world):
        dm = _dm(bad_dir / "manifest.parquet", rank, world=world, max_batch_size=1)
        per_rank.append(list(dm.train_dataloader()))
    assert len({len(b) for b in per_rank}) == 1  # the same number of steps on every rank
    skipped = [sid for batches in per_rank for b in batches for sid in b["skipped"]]
    assert skipped == [victim]
    for batches in per_rank:
        assert all(len(b["ids"]) == 1 for b in batches)  # no empty batch
        hit = [b for b in batches if victim in b["skipped"]]
        for b in hit:  # the substitute is another row, at the scheduled shapes
            assert b["ids"] != [victim] and b["target"].shape[0] == 1
    stop = _dm(bad_dir / "manifest.parquet", 0, world=1, max_batch_size=1, on_bad_sample="stop")
    with pytest.raises(BadSampleError, match=victim):
        for _ in stop.train_dataloader():
            pass


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_ddp_with_one_sample_per_step_survives_unreadable_images(tiny_corpus, tmp_path):
    """The attack under real DDP (2 gloo processes, ``data.max_batch_size=1``): a rank served an unreadable image
    raised BadSampleError despite ``on_bad_sample: skip``, and the other rank then died in gloo. Every third
    target is unreadable; the run must finish every step on both ranks, never train on an unreadable row, and
    record the rows it replaced."""
    import pyarrow.parquet as pq

    from test_strategies_multiprocess import launch, records

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus.parent, corpus)
    table = pq.read_table(corpus / "manifest.parquet")
    bad = set()
    for i, (sid, uri) in enumerate(zip(table.column("id").to_pylist(), table.column("target").to_pylist())):
        if i % 3 == 0:
            (corpus / uri).write_bytes(b"not a png")
            bad.add(sid)
    steps = 4
    overrides = [
        "experiment=demo_pretrain",
        "backbone.transformer_config.num_layers=1",
        f"data.manifest={corpus / 'manifest.parquet'}",
        "data.val_split=null",
        "data.token_budget=256",
        "data.max_batch_size=1",
        "strategy=ddp",
        "trainer.devices=2",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "~callbacks.progress",
        "export_dir=null",
    ]
    proc = launch(tmp_path / "run", overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = records(tmp_path / "run")
    assert sorted(rows) == [(g, r) for g in range(1, steps + 1) for r in (0, 1)]  # both ranks, every step
    assert all(len(r["ids"]) == 1 and not set(r["ids"]) & bad for r in rows.values())
    skipped = [sid for r in rows.values() for sid in r["skipped"]]
    assert skipped and set(skipped) <= bad


def test_a_manifest_path_outside_its_folder_is_a_bad_sample_unless_allowed(corpus, tmp_path):
    """The attack: a row whose target is ``../../<elsewhere>`` was read silently; it is skipped and counted
    (``data.allow_outside_root=false``, the default) and validate names it."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rededit.data.uri import ALLOW_ENV
    from rededit.data.validate import validate_manifest

    bad_dir = tmp_path / "escape"
    shutil.copytree(corpus.parent, bad_dir)
    table = pq.read_table(bad_dir / "manifest.parquet")
    victim, uri = table.column("id")[0].as_py(), table.column("target")[0].as_py()
    outside = tmp_path / "elsewhere.png"
    shutil.copy(bad_dir / uri, outside)
    targets = table.column("target").to_pylist()
    targets[0] = os.path.relpath(outside, bad_dir)  # ../elsewhere.png
    table = table.set_column(table.column_names.index("target"), "target", pa.array(targets, pa.string()))
    pq.write_table(table, bad_dir / "manifest.parquet")
    dm = _dm(bad_dir / "manifest.parquet", 0, world=1)
    assert victim in _scheduled_ids(dm)
    assert [sid for b in dm.train_dataloader() for sid in b["skipped"]] == [victim]
    from rededit.data.manifest import Manifest

    problems = validate_manifest(
        Manifest.open(bad_dir / "manifest.parquet", validate=False), check_files=True
    )
    assert any(p.row_id == victim and "outside" in p.message for p in problems)
    allowed = _dm(bad_dir / "manifest.parquet", 0, world=1, allow_outside_root=True)
    assert os.environ.get(ALLOW_ENV) == os.path.abspath(bad_dir)  # this manifest's folder only
    assert not [sid for b in allowed.train_dataloader() for sid in b["skipped"]]
    # The same process reads other folders (a benchmark in the sample callback, an evaluation): they stay
    # confined, so a handed-over benchmark cannot climb out because the training manifest may.
    from rededit.data.images import load_image
    from rededit.data.uri import PathOutsideRootError

    other = tmp_path / "bench"
    other.mkdir()
    with pytest.raises(PathOutsideRootError, match="outside"):
        load_image(os.path.relpath(outside, other), other)
    assert load_image(os.path.relpath(outside, bad_dir), bad_dir).size


def test_every_data_command_takes_allow_outside_root(corpus, tmp_path, monkeypatch):
    """encode-text, shard, make-pairs, mine-hard ... read manifests too: a pairs manifest (absolute paths) needed
    ``REDEDIT_ALLOW_OUTSIDE_ROOT`` set by hand. Every ``rededit-data`` command takes ``--allow-outside-root``."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rededit.cli.data import COMMANDS, build_parser
    from rededit.cli.data import main as data_main
    from rededit.data.uri import ALLOW_ENV

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in COMMANDS:
        command = sub.choices[name.replace("_", "-")]
        assert any("--allow-outside-root" in a.option_strings for a in command._actions), name
    # validate through the entry point: a manifest naming another folder's images by absolute path (what
    # make-pairs writes) is a problem (exit 1), and passes with the flag.
    absolute = tmp_path / "pairs"
    absolute.mkdir()
    table = pq.read_table(corpus)
    root = corpus.parent

    def absolute_uri(u):
        return None if u is None else str(root / u)

    for col in ("target", "edit_mask"):
        if col in table.column_names:
            values = [absolute_uri(u) for u in table.column(col).to_pylist()]
            table = table.set_column(table.column_names.index(col), col, pa.array(values, pa.string()))
    refs = [[absolute_uri(u) for u in r] for r in table.column("references").to_pylist()]
    table = table.set_column(
        table.column_names.index("references"), "references", pa.array(refs, pa.list_(pa.string()))
    )
    pq.write_table(table, absolute / "manifest.parquet")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    assert data_main(["validate", str(absolute / "manifest.parquet")]) == 1
    assert data_main(["validate", str(absolute / "manifest.parquet"), "--allow-outside-root"]) == 0
    assert os.environ.get(ALLOW_ENV) == "1"
