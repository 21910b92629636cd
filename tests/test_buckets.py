"""Resolution buckets (eq. 1), bucket keys, shipped bucket YAMLs and the ``rededit-data buckets`` CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rededit.cli import data_buckets
from rededit.data import buckets as buckets_mod
from rededit.data.buckets import ResolutionSet, assign_buckets, load_bucket_config
from rededit.data.manifest import ManifestSizes
from rededit.data.schema import manifest_schema
from rededit.utils.paths import CONF_DIR


def sizes_of(targets, refs_per_row, tasks=None) -> ManifestSizes:
    n = len(targets)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in refs_per_row])]).astype(np.int64)
    flat = [hw for r in refs_per_row for hw in r]
    names = tuple(sorted(set(tasks))) if tasks else ("edit",)
    codes = np.asarray([names.index(t) for t in tasks] if tasks else [0] * n, dtype=np.int32)
    return ManifestSizes(
        target_hw=np.asarray(targets, dtype=np.int32).reshape(-1, 2),
        ref_offsets=offsets,
        ref_hw=np.asarray(flat, dtype=np.int32).reshape(-1, 2),
        task_codes=codes,
        task_names=names,
    )


def test_assign_nearest_ratio_then_area():
    rs = ResolutionSet([[64, 128], [96, 96], [128, 64], [128, 128]], patch=16)
    hw = np.array([[100, 210], [300, 290], [90, 95], [250, 120], [10, 11]])
    # wide → 64x128 (w/h 2); square-ish → by eq. (1) 128² vs 96²; tall → 128x64.
    np.testing.assert_array_equal(rs.assign(hw), [0, 3, 1, 2, 1])


def test_eq1_tie_breaks():
    rs = ResolutionSet([[64, 64], [128, 128], [256, 256]], patch=16)
    # Same ratio: minimal |H·W − h·w| (eq. 1); an exact tie goes to the smaller area.
    np.testing.assert_array_equal(rs.assign([[100, 100], [110, 110], [8 * 8 * 10, 8 * 8 * 10]]), [0, 1, 2])
    mid = int(math.sqrt((64 * 64 + 128 * 128) / 2))
    assert rs.assign([[mid, mid]])[0] in (0, 1)
    # A square image is exactly between the 2:1 and 1:2 classes: eq. (1) across both decides.
    two = ResolutionSet([[64, 128], [160, 80]], patch=16)
    np.testing.assert_array_equal(two.assign([[100, 100], [120, 120]]), [0, 1])
    same_area = ResolutionSet([[64, 128], [128, 64]], patch=16)
    assert same_area.assign([[77, 77]])[0] == 0  # full tie → lower index


def test_patch_alignment_error():
    with pytest.raises(ValueError, match=r"not multiples of patch=16.*100x64.*nearest aligned: 96x64"):
        ResolutionSet([[100, 64], [64, 64]], patch=16)
    ResolutionSet([[100, 64]], patch=4)  # aligned for a smaller patch


def test_tokens_and_crop_loss():
    rs = ResolutionSet([[64, 64]], patch=16)
    assert rs.tokens(64, 64) == 16 and rs.tokens(65, 64) == 17
    np.testing.assert_array_equal(rs.tokens(np.array([16, 32]), np.array([16, 32])), [1, 4])
    loss = ResolutionSet.crop_loss([[100, 200], [100, 100], [50, 50]], [[100, 100], [100, 100], [100, 100]])
    np.testing.assert_allclose(loss, [0.5, 0.0, 0.0])


@pytest.mark.parametrize(
    ("name", "lo", "hi", "ratios"),
    [("pretrain", 384, 512, 9), ("ct", 512, 1024, 9), ("sft", 1024, 1024, 9), ("tiny", 64, 64, 5)],
)
def test_shipped_yaml_bucket_sets(name, lo, hi, ratios):
    cfg = load_bucket_config(name)
    assert (CONF_DIR / "data" / "buckets" / f"{name}.yaml").exists()
    rs = ResolutionSet.from_config(cfg)
    assert rs.patch == int(cfg.get("patch", 16)) and (rs.resolutions % rs.patch == 0).all()
    assert rs.class_log_ratio.size == ratios  # distinct ratios left after patch rounding
    side = np.sqrt(rs.area)
    assert side.min() >= lo * 0.9 and side.max() <= hi * 1.1  # Table 1 resolution range
    # Each resolution sits near its nominal ratio (patch rounding only).
    err = np.abs(np.log(rs.resolutions[:, 1] / rs.resolutions[:, 0]) - rs.class_log_ratio[rs.ratio_class])
    assert err.max() < 0.2
    assert (
        ResolutionSet.from_yaml(CONF_DIR / "data" / "buckets" / f"{name}.yaml").resolutions.shape
        == rs.resolutions.shape
    )


def test_explicit_and_generated_config():
    rs = ResolutionSet.from_config({"resolutions": [[512, 512], [384, 688]], "patch": 16})
    assert len(rs) == 2 and rs.class_log_ratio.size == 2
    gen = ResolutionSet.from_config({"areas": ["512^2"], "ratios": ["1:1", "2:1"], "patch": 16})
    assert sorted(map(tuple, gen.resolutions.tolist())) == [(368, 720), (512, 512)]
    with pytest.raises(ValueError, match="either 'resolutions' or 'areas'"):
        ResolutionSet.from_config({"resolutions": [[16, 16]], "areas": [256]})
    with pytest.raises(FileNotFoundError, match="neither a YAML file nor one of"):
        load_bucket_config("no_such_bucket_set")


def test_assign_buckets_keys_tokens_and_fallback(monkeypatch):
    rs = ResolutionSet([[64, 128], [96, 96], [128, 64], [128, 128]], patch=16)
    sizes = sizes_of(
        [[96, 96], [96, 96], [96, 96], [64, 128], [128, 128]],
        [[], [[96, 96]], [[96, 96]], [[130, 60], [128, 128]], [[96, 96]]],
        tasks=["t2i", "edit", "edit", "compose", "edit"],
    )
    a = assign_buckets(sizes, rs)
    assert a.bucket_of_row[1] == a.bucket_of_row[2] != a.bucket_of_row[4]
    assert a.num_buckets == 4
    assert a.keys[a.bucket_of_row[3]] == ("compose", 0, (2, 3))
    assert a.bucket_shapes(a.bucket_of_row[3]) == {"target": (64, 128), "references": [(128, 64), (128, 128)]}
    assert a.key_str(a.bucket_of_row[0]) == "t2i-96x96"
    np.testing.assert_array_equal(a.tokens_per_sample, [36, 72, 72, 32 + 32 + 64, 64 + 36])
    assert a.crop_loss[0] == 0.0 and a.crop_loss[3] > 0.0
    assert a.ref_res.tolist() == [[96, 96], [96, 96], [128, 64], [128, 128], [96, 96]]
    # Pooling tasks into one group merges same-shape rows of different tasks.
    pooled = assign_buckets(sizes, rs, task_groups={"*": "all"})
    assert pooled.group_names == ("all",) and pooled.num_buckets == 4
    # The 2-D np.unique fallback numbers buckets identically to the packed int64 keys.
    monkeypatch.setattr(buckets_mod, "_PACK_BITS", 0)
    fb = assign_buckets(sizes, rs)
    np.testing.assert_array_equal(fb.bucket_of_row, a.bucket_of_row)
    assert fb.keys == a.keys


def _write_manifest(path, n=400, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(0, 3))
        r = rng.choice([1.0, 2.0, 0.5, 4 / 3])
        side = rng.uniform(80, 140)
        th, tw = int(side / math.sqrt(r)), int(side * math.sqrt(r))
        rows.append(
            {
                "id": f"s{i:04d}",
                "task": ["t2i", "edit", "compose"][k],
                "instruction": "make it red",
                "target": f"img/{i}.png",
                "target_width": tw,
                "target_height": th,
                "references": [f"img/{i}_{j}.png" for j in range(k)],
                "reference_widths": [tw] * k,
                "reference_heights": [th] * k,
            }
        )
    schema = manifest_schema([])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_cli_prints_stats_and_writes_rank_schedule(tmp_path, capsys):
    manifest = tmp_path / "manifest.parquet"
    _write_manifest(manifest)
    out = tmp_path / "sched" / "rank_schedule.jsonl"
    parser = argparse.ArgumentParser()
    data_buckets.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["buckets", "--manifest", str(manifest), "--buckets", "tiny", "--token-budget", "300",
         "--world-size", "2", "--seed", "1", "--rank-schedule", str(out)]
    )  # fmt: skip
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "bucket key" in text and "steps/epoch" in text and "padding waste 0.0%" in text
    steps = int(text.split("steps/epoch ")[1].split()[0])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2 * steps > 0
    assert [(x["step"], x["rank"]) for x in lines] == [(s, r) for s in range(steps) for r in range(2)]
    ids = [i for x in lines for i in x["ids"]]
    assert len(ids) == len(set(ids)) and all(i.startswith("s") for i in ids)
    for a, b in zip(lines[::2], lines[1::2]):
        assert a["bucket"] == b["bucket"] and a["shapes"] == b["shapes"] and len(a["ids"]) == len(b["ids"])
        assert len(a["shapes"]["references"]) in (0, 1, 2)
    # An impossible budget is reported as an error, not a crash.
    args = parser.parse_args(
        ["buckets", "--manifest", str(manifest), "--buckets", "tiny", "--token-budget", "10"]
    )
    assert args.func(args) == 2
    assert "exceed token_budget" in capsys.readouterr().err
