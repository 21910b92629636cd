"""Preference data and semi-hard mining (report §3.6.1 Mix-Policy pairs, §3.6.2 mining).

* ``rededit-data make-pairs`` with an untrained tiny editor as the "current model": every kept row's
  negative fails the programmatic judge, the manifest validates (the `rejected` image has the target's
  size), the DPO data module serves `rejected` at the target's bucket shape, and a re-run resumes without
  generating.
* the validator reports a `rejected` image of the wrong size.
* ``rededit-data mine-hard``: the semi-hard rule on constructed statistics; an end-to-end run with a
  YAML reward keeps rows by the thresholds, writes the mined columns, passes the bench split through,
  and re-applies new thresholds from its score log without generating again.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import compose, train_overrides, untrained_tiny_export
from rededit.cli.data import main as data_main
from rededit.data.manifest import Manifest
from rededit.data.uri import ALLOW_ENV
from rededit.datagen.mining import is_semi_hard, row_stats

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _absolute_uris_allowed(monkeypatch):
    """make-pairs / mine-hard manifests name images by absolute path: read them as a user would, with
    data.allow_outside_root=true / --allow-outside-root."""
    monkeypatch.setenv(ALLOW_ENV, "1")


@pytest.fixture(scope="module")
def editor_export(tmp_path_factory):
    return untrained_tiny_export(tmp_path_factory.mktemp("editor"))


@pytest.fixture(scope="module")
def pairs(tiny_corpus, editor_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    argv = ["make-pairs", str(tiny_corpus), "--out", str(out), "--negative-editor", str(editor_export)]
    argv += ["--candidates", "2", "--steps", "2", "--limit", "6"]
    assert data_main(argv) == 0
    return out, argv


def test_make_pairs_writes_a_valid_manifest_of_judged_negatives(pairs, tiny_corpus) -> None:
    out, _ = pairs
    decisions = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == 6
    kept = [d for d in decisions if d["kept"]]
    assert kept, decisions
    for d in decisions:
        assert d["kept"] or d["reason"]
    for d in kept:  # the ground-truth positive passes; the chosen negative scores lower
        assert d["neg_score"] < d["pos_score"]
    m = Manifest.open(out / "manifest.parquet", validate=True, check_files=True)
    rows = [m.row(i) for i in range(len(m))]
    paired = [r for r in rows if r["split"] == "train"]
    assert len(paired) == len(kept) and m.has("rejected") and m.has("pair_neg_score")
    # The validation split passes through unpaired (DPO validation samples its negatives online).
    assert {r["split"] for r in rows} == {"train", "bench"}
    assert all(r["rejected"] is None for r in rows if r["split"] == "bench")
    src = Manifest.open(tiny_corpus)
    for row in paired:
        orig = src.row(src.index_of(row["id"]))
        assert row["target"].endswith(orig["target"]) and row["rejected"].endswith(
            f"{row['id']}_rejected.png"
        )


def test_make_pairs_resumes_without_generating(pairs, monkeypatch) -> None:
    out, argv = pairs
    before = pq.read_table(out / "manifest.parquet").to_pylist()

    def boom(*a, **k):
        raise AssertionError("resumed rows must not be generated again")

    monkeypatch.setattr("rededit.datagen.preference.sample_edits", boom)
    assert data_main(argv) == 0
    assert pq.read_table(out / "manifest.parquet").to_pylist() == before


def test_dpo_datamodule_serves_rejected_at_the_target_bucket(pairs, tmp_path) -> None:
    from hydra.utils import instantiate

    out, _ = pairs
    cfg = compose(train_overrides(out / "manifest.parquet", "stage=dpo", "data.val_split=null"), tmp_path)
    dm = instantiate(cfg.data, text_encoder=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["has_rejected"].all()
    assert batch["rejected"].shape == batch["target"].shape
    assert batch["rejected"].min() >= -1 and batch["rejected"].max() <= 1
    assert not torch.equal(batch["rejected"], batch["target"])


def test_validator_reports_rejected_of_the_wrong_size(tiny_corpus, tmp_path) -> None:
    import pyarrow as pa
    from PIL import Image

    from rededit.data.validate import validate_manifest

    table = pq.read_table(tiny_corpus).slice(0, 2)
    Image.new("RGB", (7, 5)).save(tmp_path / "small.png")
    col = pa.array([str(tmp_path / "small.png"), None], pa.string())
    table = table.set_column(table.column_names.index("rejected"), pa.field("rejected", pa.string()), col)
    pq.write_table(table, tmp_path / "m.parquet")
    m = Manifest(table, root=tiny_corpus.parent, path=tmp_path / "m.parquet")
    problems = [p for p in validate_manifest(m, check_files=True) if p.column == "rejected"]
    assert len(problems) == 1 and "7x5" in str(problems[0])


# ---------------------------------------------------------------------------------------------- mining
def test_semi_hard_rule() -> None:
    easy = row_stats(np.array([0.97, 0.98, 0.99, 0.99]), 0.25)
    hard = row_stats(np.array([0.0, 0.1, 0.05, 0.1]), 0.25)
    semi = row_stats(np.array([0.9, 0.85, 0.2, 0.95, 0.9, 0.3, 0.92, 0.88]), 0.1)  # low ≈ 0.27
    rule = dict(min_mean=0.5, max_mean=0.95, min_spread=0.1)
    assert not is_semi_hard(easy, **rule)  # in its comfort zone
    assert not is_semi_hard(hard, **rule)  # not competent
    assert is_semi_hard(semi, **rule)  # competent mean, unstable lower tail
    nan = row_stats(np.array([math.nan, math.nan]), 0.25)
    assert math.isnan(nan["mean"]) and not is_semi_hard(nan, **rule)
    assert row_stats(np.array([math.nan, 0.4, 0.6]), 0.0) == pytest.approx(
        {"mean": 0.5, "low": 0.4, "std": 0.1}
    )


def test_mine_hard_end_to_end(tiny_corpus, editor_export, tmp_path, monkeypatch, capsys) -> None:
    reward_yaml = tmp_path / "reward.yaml"
    reward_yaml.write_text("_target_: test_nft.BrightnessReward\n")
    out = tmp_path / "mined"
    base = ["mine-hard", str(tiny_corpus), "--out", str(out), "--editor", str(editor_export)]
    base += ["--reward", str(reward_yaml), "--samples", "2", "--steps", "2", "--limit", "4"]
    # A reward file naming a class outside rededit is refused unless the user trusts its module by name.
    assert data_main([*base, "--min-mean", "0", "--max-mean", "1", "--min-spread", "0"]) == 2
    assert "refused" in capsys.readouterr().err and not out.exists()
    base += ["--trust-target", "test_nft."]
    assert data_main([*base, "--min-mean", "0", "--max-mean", "1", "--min-spread", "0"]) == 0
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4 and all(len(s["rewards"]) == 2 for s in scores)
    m = Manifest.open(out / "manifest.parquet", validate=True, check_files=True)
    train = [m.row(i) for i in range(len(m)) if m.row(i)["split"] == "train"]
    assert len(train) == 4
    for row in train:
        s = next(x for x in scores if x["id"] == row["id"])
        assert row["mined_reward_mean"] == pytest.approx(s["mean"], rel=1e-5)
    assert any(m.row(i)["split"] == "bench" for i in range(len(m)))  # the val split passes through

    # New thresholds: re-selected from scores.jsonl, nothing generated.
    def boom(*a, **k):
        raise AssertionError("scored rows must not be generated again")

    monkeypatch.setattr("rededit.datagen.mining.sample_edits", boom)
    cut = sorted(s["mean"] for s in scores)[1]
    assert data_main([*base, "--min-mean", str(cut), "--max-mean", "1", "--min-spread", "0"]) == 0
    kept = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["id"] for r in kept if r["split"] == "train"} == {s["id"] for s in scores if s["mean"] >= cut}
    # Nothing qualifies: exit code 1 and a message, no crash.
    assert data_main([*base, "--min-mean", "2"]) == 1
