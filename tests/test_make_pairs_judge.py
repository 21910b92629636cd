"""``rededit-data make-pairs --judge`` (issue 21, report §3.6.1 Mix-Policy): DPO pairs on rows that have no
programmatic judge, scored by the VLM judge of a ``rededit-eval`` ``judge`` node against the local
OpenAI-compatible test endpoint (tests/conftest.py ``fake_endpoint``).

The fake judge rates an edit by how much it changed Picture 1 (5 if the mean absolute difference to the source
image it is shown is large, 1 if it is small): the ground-truth edits change their source, the untrained tiny
editor's candidates reproduce it, so the ground truth wins. One scripted 500 answer makes a judge call fail.

* Every row is VLM-judged whatever its task; a kept pair's positive scores at least ``--min-margin`` above its
  negative, the negative is the lowest qualifying candidate, and the manifest records both scores, the judge id
  and the prompt set's hash; the recorded scores are the endpoint's answers.
* A failed call is counted (stdout, ``decisions.jsonl``), never a 0; above ``max_failure_rate`` the run exits 1
  after writing; a re-run judges only the failed calls again (the other answers come from the cache) and passes.
* A judge config that names something other than a VLM judge backend, an endpoint that does not answer, and an
  output folder paired by another judge are refused with exit 2 before anything is generated or mixed.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import fake_endpoint, untrained_tiny_export
from rededit.cli.data import main as data_main
from rededit.data.manifest import Manifest
from rededit.data.uri import ALLOW_ENV
from rededit.datagen.preference import rebased_row
from rededit.scoring.judges.programmatic import JUDGES
from rededit.scoring.judges.prompts import builtin_prompt_set

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROWS = 3  # rows paired
CANDIDATES = 2


@pytest.fixture(autouse=True)
def _absolute_uris_allowed(monkeypatch):
    """make-pairs manifests name images by absolute path (read as with --allow-outside-root)."""
    monkeypatch.setenv(ALLOW_ENV, "1")


@pytest.fixture(scope="module")
def real_manifest(tiny_corpus, tmp_path_factory):
    """The tiny corpus's first train rows (and its bench rows) under task names no programmatic judge knows."""
    m = Manifest.open(tiny_corpus)
    rows, train = [], 0
    for i in range(len(m)):
        row = rebased_row(m.row(i), m.root)
        if row["split"] == "train":
            if train == ROWS or row["task"] not in ("add", "color", "replace", "background"):
                continue  # edits that change Picture 1 visibly: the fake judge tells them apart
            train += 1
            row["task"] = f"real_{row['task']}"
        rows.append(row)
    assert train == ROWS and not any(r["task"] in JUDGES for r in rows if r["split"] == "train")
    out = tmp_path_factory.mktemp("real") / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(tiny_corpus)), out)
    return out


@pytest.fixture(scope="module")
def editor_export(tmp_path_factory):
    return untrained_tiny_export(tmp_path_factory.mktemp("editor"))


def _images(body: dict) -> list[np.ndarray]:
    out = []
    for part in body["messages"][0]["content"][1:]:
        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
        out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64))
    return out


def _answer(score: int) -> dict:
    text = f"Reason: fake.\nPrompt Compliance: {score}\nVisual Naturalness: {score}\nPhysical & Detail Coherence: {score}"
    return {"id": "c", "object": "chat.completion", "model": "fake-vl", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}  # fmt: skip


def _respond(srv, body: dict):
    srv.calls += 1
    if srv.calls in srv.fail_calls:
        return 500, {"error": "overloaded"}
    source, edited = _images(body)
    change = float(np.abs(edited - source).mean())
    score = 5 if change > srv.threshold else 1
    srv.answers.append(score)
    return 200, _answer(score)


@pytest.fixture
def judge_server():
    with fake_endpoint(_respond, record=lambda handler, body: None) as (srv, url):
        srv.calls, srv.fail_calls, srv.answers, srv.threshold = 0, {3}, [], 12.0
        yield srv, url


def _judge_yaml(path, url: str, **extra) -> str:
    node = {
        "judge": {
            "backend": {
                "_target_": "rededit.scoring.judges.vlm.OpenAICompatibleJudge",
                "base_url": url,
                "model": "fake-vl",
                "api_key_env": None,
            },
            "prompts": "benchmark",
            "max_attempts": 1,
            **extra,
        }
    }
    path.write_text(json.dumps(node))  # JSON is YAML
    return str(path)


def _argv(manifest, out, editor, judge_cfg) -> list[str]:
    argv = [
        "make-pairs",
        str(manifest),
        "--out",
        str(out),
        "--negative-editor",
        str(editor),
        "--judge",
        judge_cfg,
    ]
    return [*argv, "--candidates", str(CANDIDATES), "--steps", "2", "--limit", str(ROWS), "--min-margin", "2"]


def test_vlm_judged_pairs_on_rows_without_a_programmatic_judge(
    real_manifest, editor_export, judge_server, tmp_path, capsys
) -> None:
    srv, url = judge_server
    out = tmp_path / "pairs"
    cfg = _judge_yaml(tmp_path / "judge.yaml", url)  # max_failure_rate: rededit-eval's default 0.05
    argv = _argv(real_manifest, out, editor_export, cfg)

    # 1 of 9 calls fails (11 %): the pairs are written, the run reports the failure and exits 1.
    assert data_main(argv) == 1
    captured = capsys.readouterr()
    assert f"{ROWS * (1 + CANDIDATES)} edits judged, 1 failed" in captured.out
    assert "above max_failure_rate=0.05" in captured.err
    decisions = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    assert sum(d["judge_failed"] for d in decisions) == 1
    # Every edit is judged; the endpoint sees each distinct (image, prompt) once (identical edits are cached).
    assert sum(d["judged"] for d in decisions) == ROWS * (1 + CANDIDATES) >= srv.calls
    # The failed call (the 3rd: row 1's positive, after row 0's positive and distinct candidates) is no score,
    # not a 0, and drops the row.
    assert decisions[1]["pos_score"] is None and "judge failed on the positive" in decisions[1]["reason"]
    recorded = [s for d in decisions for s in [d["pos_score"], *d["cand_scores"]] if s is not None]
    assert set(recorded) == {float(a) for a in srv.answers}
    assert (out / "judge_cache").is_dir()

    # Re-run: only the failed call goes to the endpoint again (the rest is cached) and now it answers.
    calls_before = srv.calls
    assert data_main(argv) == 0
    assert srv.calls - calls_before == 1
    assert "1 failed" not in capsys.readouterr().out
    decisions = {d["id"]: d for d in map(json.loads, (out / "decisions.jsonl").read_text().splitlines())}
    assert len(decisions) == ROWS and all(d["judge_failed"] == 0 for d in decisions.values())

    kept = [d for d in decisions.values() if d["kept"]]
    assert kept, decisions
    for d in decisions.values():
        assert d["judge"] == "openai-compatible:fake-vl"
        if d["kept"]:
            assert d["pos_score"] - d["neg_score"] >= 2
            assert d["neg_score"] == min(s for s in d["cand_scores"] if d["pos_score"] - s >= 2)
        else:
            assert "below the positive" in d["reason"]
    m = Manifest.open(out / "manifest.parquet", validate=True, check_files=True)
    paired = [m.row(i) for i in range(len(m)) if m.row(i)["split"] == "train"]
    assert {r["id"] for r in paired} == {d["id"] for d in kept}
    prompts_hash = builtin_prompt_set("rededit_generic").set_hash
    for r in paired:
        d = decisions[r["id"]]
        assert r["task"].startswith("real_") and r["rejected"].endswith(f"{r['id']}_rejected.png")
        assert r["pair_judge"] == "openai-compatible:fake-vl" and r["pair_judge_prompts"] == prompts_hash
        assert r["pair_pos_score"] == pytest.approx(d["pos_score"]) and r["pair_neg_score"] == pytest.approx(
            d["neg_score"]
        )


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen"])
def test_judge_config_that_names_no_judge_backend_is_refused(real_manifest, tmp_path, capsys, target) -> None:
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(json.dumps({"judge": {"backend": {"_target_": target, "args": ["true"]}}}))
    argv = ["make-pairs", str(real_manifest), "--out", str(tmp_path / "o"), "--negative-editor", "nowhere"]
    assert data_main([*argv, "--judge", str(cfg)]) == 2
    assert "is not a VLM judge backend" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unreachable_judge_stops_before_generating(real_manifest, tmp_path, capsys) -> None:
    with fake_endpoint(lambda srv, body: (200, {})) as (_, url):
        pass  # the server is gone: nothing listens on its port any more
    cfg = _judge_yaml(tmp_path / "judge.yaml", url)
    argv = ["make-pairs", str(real_manifest), "--out", str(tmp_path / "o"), "--negative-editor", "nowhere"]
    assert data_main([*argv, "--judge", cfg]) == 2
    assert "unreachable" in capsys.readouterr().err


def test_folder_paired_by_another_judge_is_not_resumed(
    real_manifest, editor_export, judge_server, tmp_path, capsys
) -> None:
    _, url = judge_server
    out = tmp_path / "pairs"
    out.mkdir()
    # A folder paired by the programmatic judges (decisions without a judge key come from before --judge).
    (out / "decisions.jsonl").write_text(json.dumps({"id": "x", "kept": False, "reason": "r"}) + "\n")
    assert data_main(_argv(real_manifest, out, editor_export, _judge_yaml(tmp_path / "j.yaml", url))) == 2
    assert "pair into a fresh --out folder" in capsys.readouterr().err
