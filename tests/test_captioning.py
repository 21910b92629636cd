"""Captioning engine (report §2.5): templates, a fake OpenAI-compatible endpoint, caching, failure accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from conftest import fake_endpoint
from rededit.data.schema import manifest_schema
from rededit.datagen.engine.captioning import CaptionStage, CaptionTemplate, default_templates, load_templates
from rededit.datagen.engine.stage import StageContext
from rededit.scoring.judges.vlm import OpenAICompatibleJudge

STRUCTURED = {"subject": "a red square", "background": "plain white", "lighting": "even studio light",
              "style": "flat vector graphic", "camera": "front view, centred", "text": ""}  # fmt: skip


def _answer(prompt: str) -> str:
    zh = "只输出" in prompt
    if "JSON" in prompt:
        d = dict(STRUCTURED)
        if zh:
            d = {k: ("红色方块" if v else v) for k, v in d.items()}
        return "```json\n" + json.dumps(d, ensure_ascii=False) + "\n```"
    if "最后一张是编辑结果" in prompt or "edited result" in prompt:
        return "在图片左侧添加一个红色方块。" if zh else "Add a red square on the left side of the image."
    if "更简洁" in prompt or "more concisely" in prompt:
        return "加红色方块" if zh else "Instruction: add red square"
    return "你能帮我加个红色方块吗？" if zh else '"Could you help me add a red square?"'


def _respond(srv, body: dict):
    prompt = body["messages"][0]["content"][0]["text"]
    override = next((f(prompt) for f in srv.rules if f(prompt) is not None), None)
    status, content = override if override is not None else (200, _answer(prompt))
    if status != 200:
        return status, b'{"error": "boom"}'
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def _record(handler, body: dict) -> dict:
    content = body["messages"][0]["content"]
    return {"prompt": content[0]["text"], "n_images": len(content) - 1, "model": body["model"]}


@pytest.fixture
def server():
    with fake_endpoint(_respond, record=_record) as (srv, url):
        srv.rules = []
        yield srv, url


def _manifest(root: Path, n_edit: int = 2, n_t2i: int = 1, **cols) -> pa.Table:
    rows = []
    (root / "img").mkdir(exist_ok=True)
    for i in range(n_edit + n_t2i):
        tgt = f"img/{i}_t.png"
        Image.new("RGB", (32, 24), (40 * i, 200, 30)).save(root / tgt)
        refs = []
        if i < n_edit:
            refs = [f"img/{i}_s.png"]
            Image.new("RGB", (32, 24), (10, 10, 40 * i)).save(root / refs[0])
        row = {f.name: None for f in manifest_schema()} | {
            "id": f"r{i}", "task": "add" if refs else "t2i", "target": tgt, "target_width": 32,
            "target_height": 24, "references": refs, "reference_widths": [32] * len(refs),
            "reference_heights": [24] * len(refs),
        }  # fmt: skip
        rows.append(row | {k: v[i] for k, v in cols.items()})
    return pa.Table.from_pylist(rows, schema=manifest_schema())


def _ctx(tmp_path: Path, partition="p0") -> StageContext:
    return StageContext(root=tmp_path, seed=3, stage_dir=tmp_path / "stage", partition=partition)


def _judge(url: str) -> OpenAICompatibleJudge:
    return OpenAICompatibleJudge(url, "fake-vl", api_key_env=None, timeout=5)


def test_templates_hash_render_extract(tmp_path):
    t = default_templates()
    assert set(t) == {
        f"{k}_{lang}" for k in ("structured", "detailed", "concise", "user") for lang in ("en", "zh")
    }
    assert len({x.template_hash for x in t.values()}) == 8
    c = t["concise_en"]
    with pytest.raises(ValueError, match="missing"):
        c.render(instruction="add a cat")
    p = c.render(instruction="add a cat", level="short", pattern="arrow")
    assert "add a cat" in p and "<" not in p
    assert c.extract('Instruction: "add cat"') == ("add cat", None)
    assert c.extract("I'm sorry, I can't help")[0] is None
    assert c.extract("")[1] == "empty answer"
    assert t["concise_zh"].extract("add cat")[1] == "answer is not in Chinese"
    s = t["structured_en"]
    text, err = s.extract(json.dumps(STRUCTURED))
    assert (
        err is None and text.startswith("Subject: a red square.") and "Camera: front view, centred." in text
    )
    assert "lacks fields ['lighting']" in s.extract(json.dumps({**STRUCTURED, "lighting": ""}))[1]
    assert s.extract("a red square")[1] == "no JSON object in the answer"
    assert not s.parse("nope").ok and s.parse(json.dumps(STRUCTURED)).ok
    # the language check reads the content, not our labels; quoted sign text may be in any script
    assert t["structured_zh"].extract(json.dumps(STRUCTURED))[1] == "answer is not in Chinese"
    assert c.extract('change the sign to "你好"')[0] == 'change the sign to "你好"'
    # a template file overrides one entry; a changed word changes the hash
    f = tmp_path / "t.yaml"
    f.write_text("concise_en: 'Shorten: <instruction> (<level>; <pattern>)'\n")
    loaded = load_templates(f)
    assert loaded["concise_en"].template_hash != c.template_hash
    assert loaded["user_en"].template_hash == t["user_en"].template_hash
    f.write_text("concise_en: 'Shorten this'\n")
    with pytest.raises(ValueError, match="instruction"):
        load_templates(f)
    f.write_text("blurb_en: x\n")
    with pytest.raises(ValueError, match="unknown template key"):
        load_templates(f)
    with pytest.raises(ValueError, match="kind"):
        CaptionTemplate("nope", "en", "x")


def test_caption_stage_fake_endpoint_cache_and_columns(server, tmp_path):
    srv, url = server
    table = _manifest(tmp_path)
    stage = CaptionStage(backend=_judge(url), languages=["en", "zh"], backoff_s=0)
    out = stage.process(table, _ctx(tmp_path))
    assert out.num_rows == table.num_rows and out.column("id").to_pylist() == ["r0", "r1", "r2"]
    rows = out.to_pylist()
    edit, t2i = rows[0], rows[2]
    assert edit["caption"].startswith("Subject: a red square.")
    assert edit["caption_zh"].startswith("主体：红色方块。")
    assert edit["instruction"] == "Add a red square on the left side of the image."
    assert edit["instruction_concise"] == "add red square"  # label stripped
    assert edit["instruction_user"] == "Could you help me add a red square?"  # quotes stripped
    assert edit["instruction_zh"] == "在图片左侧添加一个红色方块。" and edit["instruction_user_zh"]
    assert edit["caption_type"] == "instructive" and t2i["caption_type"] == "structured"
    assert t2i["instruction"] is None and t2i["caption"]  # T2I rows get a caption, no instruction
    assert edit["caption_errors"] is None
    meta = json.loads(edit["caption_meta"])
    assert meta["model"]["backend"] == "openai-compatible:fake-vl"
    assert meta["columns"]["instruction"]["source"] == "vlm"
    # edit rows: detailed prompt gets source + target; rewrites are text-only
    detailed = [r for r in srv.requests if "edited result" in r["prompt"]]
    assert detailed and all(r["n_images"] == 2 for r in detailed)
    assert all(r["n_images"] == 0 for r in srv.requests if "more concisely" in r["prompt"])
    n_calls = len(srv.requests)
    assert n_calls == 2 * (4 + 4) + 2 * 1  # 2 edits × 2 langs × 4 fields + T2I × 2 langs × caption
    # a second run (fresh instance, same cache) makes no backend call and gives the same table
    again = CaptionStage(backend=_judge(url), languages=["en", "zh"], backoff_s=0).process(
        table, _ctx(tmp_path)
    )
    assert len(srv.requests) == n_calls
    assert again.drop(["caption_meta"]).equals(out.drop(["caption_meta"]))
    assert json.loads(again.column("caption_meta")[0].as_py())["columns"]["instruction"]["source"] == "cache"
    stats = json.loads((tmp_path / "stage" / "stats" / "p0.json").read_text())
    assert stats["cache_hits"] == n_calls and stats["backend_calls"] == 0


def test_caption_failures_are_null_with_reason_and_counted(server, tmp_path):
    srv, url = server
    # concise answers are garbage (refusals) and detailed calls of row r1 fail with HTTP 400
    srv.rules.append(lambda p: (200, "I'm sorry, I cannot do that.") if "more concisely" in p else None)
    table = _manifest(tmp_path)
    stage = CaptionStage(
        backend=_judge(url),
        fallback="none",
        max_attempts=2,
        retry_parse_failures=True,
        backoff_s=0,
        fields=["instruction", "instruction_concise", "instruction_user"],
    )
    out = stage.process(table, _ctx(tmp_path))
    r0 = out.to_pylist()[0]
    assert r0["instruction"] and r0["instruction_concise"] is None and r0["instruction_user"] is None
    errs = json.loads(r0["caption_errors"])
    assert errs["instruction_concise"].startswith("parse: refusal")
    assert errs["instruction_user"] == "upstream instruction_concise is null"
    assert stage.last_stats["failed"] == 2 and stage.last_stats["failure_reasons"] == {"parse": 2}
    # parse failures are retried (sampled APIs may answer better the second time): 2 attempts each
    assert sum("more concisely" in r["prompt"] for r in srv.requests) == 4
    # with the rule fallback the synthetic corpus's existing text is kept and the user-like text derived
    table2 = _manifest(
        tmp_path,
        instruction=["Add a square."] * 3,
        instruction_concise=["add a square", "add a square", None],
    )
    out2 = CaptionStage(backend=_judge(url), overwrite=True, backoff_s=0, max_attempts=1,
                        fields=["instruction_concise", "instruction_user"]).process(table2, _ctx(tmp_path, "p1"))  # fmt: skip
    r = out2.to_pylist()[0]
    assert r["instruction_concise"] == "add a square"
    assert json.loads(r["caption_meta"])["columns"]["instruction_concise"]["source"] == "existing"
    assert "refusal" in json.loads(r["caption_errors"])["instruction_concise"]


def test_caption_backend_errors_and_drop(server, tmp_path):
    srv, url = server
    srv.rules.append(lambda p: (400, "") if "edited result" in p else None)
    table = _manifest(tmp_path, n_edit=2, n_t2i=0)
    table = table.append_column("drop_reason", pa.array([None, "dedup:exact"], pa.string()))
    stage = CaptionStage(
        backend=_judge(url), fields=["instruction"], fallback="none", drop_on_failure=True, backoff_s=0
    )
    out = stage.process(table, _ctx(tmp_path)).to_pylist()
    assert out[0]["instruction"] is None and "HTTP 400" in json.loads(out[0]["caption_errors"])["instruction"]
    assert out[0]["drop_reason"] == "caption:failed"
    assert (
        out[1]["drop_reason"] == "dedup:exact" and out[1]["caption_meta"] is None
    )  # upstream drop untouched
    assert len(srv.requests) == 1  # 400 is not retried; the dropped row is never sent


def test_caption_rule_only_and_config_identity(tmp_path):
    table = _manifest(
        tmp_path,
        n_edit=1,
        n_t2i=0,
        instruction=["Add a red square."],
        instruction_concise=["add a red square"],
    )
    stage = CaptionStage(backend=None, fields=["instruction", "instruction_concise", "instruction_user"])
    out = stage.process(table, _ctx(tmp_path)).to_pylist()[0]
    assert out["instruction"] == "Add a red square." and out["instruction_user"]
    assert (
        "add a red square" in out["instruction_user"].lower()
        and out["instruction_user"] != "add a red square"
    )
    assert json.loads(out["caption_meta"])["columns"]["instruction_user"]["source"] == "rule"
    # the same row and seed always get the same rule-based text
    assert (
        CaptionStage(fields=["instruction_user"])
        .process(table, _ctx(tmp_path))
        .column("instruction_user")[0]
        .as_py()
        == out["instruction_user"]
    )
    a = CaptionStage(backend=None).config()
    assert json.dumps(a, sort_keys=True) == json.dumps(CaptionStage(backend=None).config(), sort_keys=True)
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"user_en": "Say it casually as <persona>. <help> <instruction>"}))
    assert CaptionStage(templates_file=str(f)).config()["templates"] != a["templates"]
    with pytest.raises(ValueError, match="languages"):
        CaptionStage(languages=["fr"])


def test_caption_cli_through_runner_resumes_from_cache(server, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import rededit.cli.data as cli
    from rededit.cli.data import main

    monkeypatch.setattr(cli, "COMMANDS", ("caption",))  # only this command is under test

    srv, url = server
    pq.write_table(_manifest(tmp_path, n_edit=2, n_t2i=1), tmp_path / "m.parquet")
    argv = ["caption", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out"),
            "--backend", "openai", "--base-url", url, "--model", "fake-vl", "--api-key-env", "NO_SUCH_KEY",
            "--rewriter-models", "fake-vl,fake-vl-2", "--partition-rows", "2"]  # fmt: skip
    assert main(argv) == 0
    out = pq.read_table(tmp_path / "out" / "result.parquet")
    assert (
        out.num_rows == 3
        and out.column("instruction_user").to_pylist()[:2] == ["Could you help me add a red square?"] * 2
    )
    n = len(srv.requests)
    stats = [json.loads(f.read_text()) for f in (tmp_path / "out" / "stages").glob("*_caption/stats/*.json")]
    assert len(stats) == 2 and sum(s["backend_calls"] for s in stats) == n
    # 2 edits × 4 fields + 1 T2I caption; identical prompts (same rewrite settings drawn) hit the cache
    assert n + sum(s["cache_hits"] for s in stats) == 2 * 4 + 1
    models = {json.loads(m)["model"]["backend"] for m in out.column("caption_meta").to_pylist()}
    assert models == {"openai-compatible:fake-vl"}
    # a rerun finds every partition done: no call at all
    assert main(argv) == 0 and len(srv.requests) == n
    assert main(["caption", "--manifest", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o2")]) == 2
    assert (
        main(
            [
                "caption",
                "--manifest",
                str(tmp_path / "m.parquet"),
                "--out",
                str(tmp_path / "o3"),
                "--backend",
                "openai",
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    from test_text_encoder import _build_tiny_qwen

    folder = tmp_path_factory.mktemp("tiny_qwen_caption")
    _build_tiny_qwen(folder)
    return folder


@pytest.mark.slow
def test_caption_stage_tiny_local_model(tiny_qwen_dir, tmp_path):
    """A tiny random Qwen2.5-VL through the local transformers backend: garbage text is either accepted as
    text or recorded as a failure with a reason — never an empty caption — and the cache answers a rerun."""
    import functools

    from rededit.scoring.judges.vlm import TransformersVLMJudge

    table = _manifest(tmp_path, n_edit=1, n_t2i=0)
    factory = functools.partial(TransformersVLMJudge, str(tiny_qwen_dir), dtype="float32", max_new_tokens=6,
                                max_image_area=56 * 56)  # fmt: skip
    stage = CaptionStage(backend=factory, fields=["caption", "instruction"], fallback="none", max_attempts=1)
    row = stage.process(table, _ctx(tmp_path)).to_pylist()[0]
    errs = json.loads(row["caption_errors"] or "{}")
    for col in ("caption", "instruction"):
        assert (row[col] is not None and row[col].strip()) or col in errs
    assert "caption" in errs  # random weights never produce the structured JSON
    assert stage.last_stats["backend_calls"] == 2
    again = CaptionStage(backend=factory, fields=["caption", "instruction"], fallback="none", max_attempts=1)
    again.process(table, _ctx(tmp_path))
    assert again.last_stats["backend_calls"] == 0 and again.last_stats["cache_hits"] == 2


def test_caption_stage_from_hydra_config_pickles_and_runs(server, tmp_path):
    import pickle

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    srv, url = server
    judge = {"_target_": "rededit.scoring.judges.vlm.OpenAICompatibleJudge", "_partial_": True, "base_url": url,
             "api_key_env": None}  # fmt: skip
    cfg = OmegaConf.create({
        "_target_": "rededit.datagen.engine.captioning.CaptionStage",
        "backend": {**judge, "model": "fake-vl"},
        "rewriters": [{**judge, "model": "fake-a"}, {**judge, "model": "fake-b"}],
        "fields": ["instruction", "instruction_concise"],
        "languages": ["en"],
    })  # fmt: skip
    stage = instantiate(cfg)
    assert stage.config() == instantiate(cfg).config()  # stable identity for the runner's partition hash
    clone = pickle.loads(pickle.dumps(stage))  # what the runner ships to worker processes
    out = clone.process(_manifest(tmp_path, n_edit=2, n_t2i=0), _ctx(tmp_path)).to_pylist()
    assert [r["instruction_concise"] for r in out] == ["add red square"] * 2
    concise_models = {r["model"] for r in srv.requests if "more concisely" in r["prompt"]}
    assert concise_models <= {"fake-a", "fake-b"} and concise_models  # drawn from the rewriter suite
    assert {r["model"] for r in srv.requests if "edited result" in r["prompt"]} == {"fake-vl"}
    used = {json.loads(r["caption_meta"])["model"]["backend"] for r in out}
    assert used == {"openai-compatible:fake-vl"}
    assert json.loads(out[0]["caption_meta"])["model"]["rewriters"] == [
        "openai-compatible:fake-a",
        "openai-compatible:fake-b",
    ]
