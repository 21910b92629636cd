"""VLM judges: OpenAI-compatible client against a local fake server, the caching/retrying wrapper and its
failure accounting, aggregation (failures are never zeros), GEdit G_O, and a tiny random Qwen2.5-VL."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import threading

import pytest
from PIL import Image

from conftest import fake_endpoint
from rededit.scoring.judges.prompts import builtin_prompt_set, gedit_prompt_set
from rededit.scoring.judges.vlm import (
    CachedJudge,
    JudgeError,
    JudgeResponse,
    OpenAICompatibleJudge,
    VLMJudge,
    aggregate_gedit,
    aggregate_scores,
    g_overall,
    image_hash,
)

GENERIC = builtin_prompt_set("rededit_generic").template("add")
GOOD = "Reason: the cat is on the sofa.\nPrompt Compliance: 4\nVisual Naturalness: 3\nPhysical & Detail Coherence: 5"


def _img(color=(200, 30, 30), size=(24, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def _completion(content) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "fake-vl",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


def _respond(srv, body: dict):
    status, payload = srv.script.pop(0) if srv.script else (200, _completion(GOOD))
    if status == "sleep":
        threading.Event().wait(payload)
        status, payload = 200, _completion(GOOD)
    return status, payload


@pytest.fixture
def server():
    record = lambda handler, body: {"path": handler.path, "headers": dict(handler.headers), "json": body}  # noqa: E731
    with fake_endpoint(_respond, record=record) as (srv, url):
        srv.script = []
        yield srv, url


class _Sleeps(list):
    def __call__(self, s: float) -> None:
        self.append(s)


def test_openai_judge_request_and_parse(server, monkeypatch):
    srv, url = server
    monkeypatch.setenv("REDEDIT_TEST_KEY", "sk-test-123")
    judge = OpenAICompatibleJudge(url + "/", "fake-vl", api_key_env="REDEDIT_TEST_KEY", seed=7)
    src, out = _img(), _img((10, 200, 10))
    prompt = GENERIC.render("add a cat on the sofa")
    r = judge.score([src, out], prompt, template=GENERIC, item_id="add-1")
    assert r.ok and r.error is None and r.attempts == 1 and r.item_id == "add-1"
    assert r.scores == {"prompt_compliance": 4.0, "visual_naturalness": 3.0, "physical_detail_coherence": 5.0}
    assert r.judge_id == "openai-compatible:fake-vl" and r.template_hash == GENERIC.template_hash
    req = srv.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test-123"
    body = req["json"]
    assert body["model"] == "fake-vl" and body["temperature"] == 0.0 and body["seed"] == 7
    content = body["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": prompt}
    assert [c["type"] for c in content[1:]] == ["image_url", "image_url"]
    url0 = content[1]["image_url"]["url"]
    assert url0.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url0.split(",", 1)[1])))
    assert image_hash(decoded.convert("RGB")) == image_hash(src)  # lossless, source first
    # no key in the environment → no Authorization header (and the key never enters the id)
    monkeypatch.delenv("REDEDIT_TEST_KEY")
    judge.score([src], "Score this: <x>")
    assert "Authorization" not in srv.requests[-1]["headers"] and "sk-" not in judge.judge_id


def test_openai_judge_backend_errors(server):
    srv, url = server
    judge = OpenAICompatibleJudge(url, "fake-vl", api_key_env=None, timeout=0.3)
    srv.script[:] = [(500, {"error": "overloaded"})]
    with pytest.raises(JudgeError, match="HTTP 500") as e:
        judge.generate([_img()], "p")
    assert e.value.retryable
    srv.script[:] = [(400, {"error": "bad image"})]
    with pytest.raises(JudgeError, match="HTTP 400") as e:
        judge.generate([_img()], "p")
    assert not e.value.retryable
    srv.script[:] = [(200, b"<html>gateway says hi</html>")]
    with pytest.raises(JudgeError, match="malformed") as e:
        judge.generate([_img()], "p")
    assert e.value.retryable
    srv.script[:] = [(200, {"choices": []})]
    with pytest.raises(JudgeError, match="malformed"):
        judge.generate([_img()], "p")
    srv.script[:] = [(200, _completion(None))]
    with pytest.raises(JudgeError, match="no text content"):
        judge.generate([_img()], "p")
    srv.script[:] = [(200, _completion([{"type": "text", "text": "Score: "}, {"type": "text", "text": "4"}]))]
    assert judge.generate([_img()], "p") == "Score: 4"
    srv.script[:] = [("sleep", 1.0)]
    with pytest.raises(JudgeError, match="failed") as e:
        judge.generate([_img()], "p")
    assert e.value.retryable
    with pytest.raises(ValueError):
        OpenAICompatibleJudge("localhost:8000", "m")
    # a single attempt reports the backend failure as a failure, not a score
    srv.script[:] = [(503, {"error": "down"})]
    r = judge.score([_img()], "p", template=GENERIC)
    assert not r.ok and r.scores is None and r.raw_text is None and r.error.startswith("backend: HTTP 503")


def test_cached_judge_retries_then_succeeds(server, tmp_path):
    srv, url = server
    sleeps = _Sleeps()
    judge = CachedJudge(
        OpenAICompatibleJudge(url, "fake-vl"), tmp_path / "cache", max_attempts=3, backoff_s=0.5, sleep=sleeps
    )
    srv.script[:] = [(500, {"error": "x"}), (200, b"garbage{"), (200, _completion(GOOD))]
    r = judge.score([_img()], GENERIC.render("add a cat"), template=GENERIC, item_id="a")
    assert r.ok and r.attempts == 3 and not r.cached
    assert sleeps == [0.5, 1.0] and len(srv.requests) == 3
    assert judge.failures == 0 and judge.stats["backend_calls"] == 3


def test_cached_judge_failure_accounting(server, tmp_path):
    srv, url = server
    sleeps = _Sleeps()
    judge = CachedJudge(
        OpenAICompatibleJudge(url, "fake-vl"), tmp_path, max_attempts=3, backoff_s=1, sleep=sleeps
    )
    prompt = GENERIC.render("remove the lamp")
    srv.script[:] = [(500, {})] * 3
    r = judge.score([_img()], prompt, template=GENERIC, item_id="rm-1")
    assert not r.ok and r.attempts == 3 and r.scores is None and "HTTP 500" in r.error
    assert judge.failures == 1 and [f.item_id for f in judge.failed] == ["rm-1"] and sleeps == [1, 2]
    (rec,) = judge.failure_records()
    assert rec["item_id"] == "rm-1" and rec["attempts"] == 3 and json.dumps(rec)
    assert not list(tmp_path.rglob("*.json"))  # backend failures are not cached
    # a non-retryable error stops at once
    srv.script[:] = [(401, {"error": "no key"})]
    r = judge.score([_img()], prompt, template=GENERIC, item_id="rm-2")
    assert not r.ok and r.attempts == 1 and judge.failures == 2
    # the next run tries again and succeeds
    n = len(srv.requests)
    r = judge.score([_img()], prompt, template=GENERIC, item_id="rm-1")
    assert r.ok and len(srv.requests) == n + 1
    # an unparseable answer (refusal) is one failed item, its raw text cached, no retry by default
    srv.script[:] = [(200, _completion("I'm sorry, but I cannot evaluate this image."))]
    r = judge.score([_img((1, 2, 3))], prompt, template=GENERIC, item_id="rm-3")
    assert not r.ok and r.attempts == 1 and r.error.startswith("parse: refusal")
    assert r.raw_text.startswith("I'm sorry") and judge.failures == 3
    # served from the cache on the next run: still a failure, no backend call
    n = len(srv.requests)
    again = CachedJudge(OpenAICompatibleJudge(url, "fake-vl"), tmp_path, sleep=sleeps)
    r2 = again.score([_img((1, 2, 3))], prompt, template=GENERIC, item_id="rm-3")
    assert r2.cached and not r2.ok and r2.raw_text == r.raw_text and len(srv.requests) == n
    assert again.failures == 1
    # with retry_parse_failures the cached refusal is re-queried, and retried until it parses
    srv.script[:] = [(200, _completion("no idea")), (200, _completion(GOOD))]
    retrying = CachedJudge(
        OpenAICompatibleJudge(url, "fake-vl"), tmp_path, sleep=sleeps, retry_parse_failures=True
    )
    r3 = retrying.score([_img((1, 2, 3))], prompt, template=GENERIC)
    assert r3.ok and r3.attempts == 2 and not r3.cached
    assert retrying.score([_img((1, 2, 3))], prompt, template=GENERIC).cached  # good answer now cached


class _CountingJudge(VLMJudge):
    """Deterministic in-process judge: answers from a script, counts calls."""

    def __init__(self, answers=None, model="count", temperature=0.0):
        self.answers = list(answers or [])
        self.calls = 0
        self.model = model
        self.temperature = temperature

    @property
    def judge_id(self) -> str:
        return f"counting:{self.model}"

    @property
    def decoding(self) -> dict:
        return {"temperature": self.temperature}

    def generate(self, images, prompt):
        self.calls += 1
        a = self.answers.pop(0) if self.answers else GOOD
        if isinstance(a, Exception):
            raise a
        return a


def test_cache_hits_and_key_separation(tmp_path):
    backend = _CountingJudge()
    judge = CachedJudge(backend, tmp_path, sleep=_Sleeps())
    imgs = [_img(), _img((0, 0, 255))]
    prompt = GENERIC.render("add a cat")
    r1 = judge.score(imgs, prompt, template=GENERIC)
    assert backend.calls == 1 and not r1.cached
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["raw_text"] == GOOD
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write left no temp file
    # re-run with a fresh wrapper: raw text from disk, backend untouched
    judge2 = CachedJudge(backend, tmp_path)
    r2 = judge2.score(imgs, prompt, template=GENERIC)
    assert backend.calls == 1 and r2.cached and r2.raw_text == r1.raw_text and r2.scores == r1.scores
    assert r2.attempts == 0 and judge2.stats["cache_hits"] == 1
    # same prompt text, different template hash → a different key and a new call
    other = builtin_prompt_set("imgedit").template("add")
    assert other.template_hash != GENERIC.template_hash
    r3 = judge2.score(imgs, prompt, template=other)
    assert backend.calls == 2 and not r3.cached and not r3.ok  # GOOD lacks the ImgEdit dimensions
    keys = {
        judge.cache_key(imgs, prompt, GENERIC.template_hash),
        judge.cache_key(imgs, prompt, other.template_hash),
        judge.cache_key(imgs[::-1], prompt, GENERIC.template_hash),
        judge.cache_key([imgs[0], _img((0, 0, 254))], prompt, GENERIC.template_hash),
        judge.cache_key(imgs, prompt + " ", GENERIC.template_hash),
        CachedJudge(_CountingJudge(temperature=0.7), tmp_path).cache_key(imgs, prompt, GENERIC.template_hash),
        CachedJudge(_CountingJudge(model="other"), tmp_path).cache_key(imgs, prompt, GENERIC.template_hash),
    }
    assert len(keys) == 7
    assert judge.cache_key(imgs, prompt, GENERIC.template_hash) == CachedJudge(
        _CountingJudge(), tmp_path / "elsewhere"
    ).cache_key([im.copy() for im in imgs], prompt, GENERIC.template_hash)


def test_corrupt_cache_record_is_ignored(tmp_path):
    backend = _CountingJudge()
    judge = CachedJudge(backend, tmp_path)
    judge.score([_img()], "p", template=GENERIC)
    (f,) = tmp_path.rglob("*.json")
    f.write_text("{not json")
    r = judge.score([_img()], "p", template=GENERIC)
    assert r.ok and not r.cached and backend.calls == 2


def test_failures_are_not_zeros_in_aggregate(tmp_path):
    answers = [
        GOOD,
        "Prompt Compliance: 2\nVisual Naturalness: 2\nPhysical & Detail Coherence: 1",
        JudgeError("HTTP 500"),
        "I cannot evaluate this.",
        GOOD,
    ]
    judge = CachedJudge(_CountingJudge(answers), tmp_path, max_attempts=1, sleep=_Sleeps())
    rs = [judge.score([_img((i, i, i))], "p", template=GENERIC, item_id=f"i{i}") for i in range(5)]
    assert [r.ok for r in rs] == [True, True, False, False, True]
    agg = aggregate_scores(rs)
    assert agg["n_ok"] == 3 and agg["n_failed"] == 2 and agg["n_total"] == 5
    assert agg["failure_rate"] == pytest.approx(0.4) and agg["failed_ids"] == ["i2", "i3"]
    assert agg["mean"]["prompt_compliance"] == pytest.approx((4 + 2 + 4) / 3)  # zeros would give 2.0
    assert agg["mean"]["physical_detail_coherence"] == pytest.approx((5 + 1 + 5) / 3)
    assert agg["n"]["visual_naturalness"] == 3 and agg["judge_ids"] == ["counting:count"]
    assert agg["template_hashes"] == [GENERIC.template_hash]
    assert judge.failures == 2 and {f.item_id for f in judge.failed} == {"i2", "i3"}
    # all failed → means undefined (None), never 0
    none_ok = aggregate_scores([rs[2], rs[3]])
    assert none_ok["mean"] == {} and none_ok["n_ok"] == 0 and none_ok["failure_rate"] == 1.0
    assert aggregate_scores([])["failure_rate"] is None
    # mixing judges is refused unless asked for
    foreign = JudgeResponse(GOOD, rs[0].parsed, True, 1, None, "other-judge", GENERIC.template_hash)
    with pytest.raises(ValueError, match="several judges"):
        aggregate_scores([*rs, foreign])
    assert aggregate_scores([*rs, foreign], allow_mixed_judges=True)["n_ok"] == 4
    # responses round-trip through JSON (for per-item records)
    assert JudgeResponse.from_dict(json.loads(json.dumps(rs[3].to_dict()))) == rs[3]


def test_gedit_overall(tmp_path):
    assert g_overall(4.0, 9.0) == pytest.approx(6.0) and g_overall(0.0, 10.0) == 0.0
    with pytest.raises(ValueError):
        g_overall(-1.0, 4.0)
    g = gedit_prompt_set()
    sc_t, pq_t = g.template("sc"), g.template("pq")
    sc_answers = [
        "Reason: ok.\nSemantic Consistency: 8",
        "Semantic Consistency: 2",
        "Semantic Consistency: 9",
    ]
    pq_answers = ["Reason: clean.\nPerceptual Quality: 2", "Perceptual Quality: 8", "Perceptual Quality: 11"]
    judge = CachedJudge(_CountingJudge(sc_answers + pq_answers), tmp_path, max_attempts=1)
    sc = [judge.score([_img((i, 0, 0)), _img()], sc_t.render("x"), template=sc_t) for i in range(3)]
    pq = [judge.score([_img((i, 0, 0))], pq_t.render("x"), template=pq_t) for i in range(3)]
    assert not pq[2].ok and "outside" in pq[2].error  # 11 on a 0–10 scale is a failure, not a 10
    agg = aggregate_gedit(sc, pq)
    assert agg["G_SC"] == pytest.approx((8 + 2 + 9) / 3) and agg["G_PQ"] == pytest.approx(5.0)
    assert agg["G_O"] == pytest.approx((math.sqrt(16) + math.sqrt(16)) / 2)  # per item, then averaged
    assert agg["n_ok"] == 2 and agg["n_failed"] == 1 and agg["failure_rate"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        aggregate_gedit(sc, pq[:2])


def test_cached_judge_validation(tmp_path):
    with pytest.raises(ValueError):
        CachedJudge(_CountingJudge(), tmp_path, max_attempts=0)
    with pytest.raises(ValueError):
        CachedJudge(_CountingJudge(), tmp_path, backoff_factor=0.5)
    sleeps = _Sleeps()
    judge = CachedJudge(
        _CountingJudge([JudgeError("x")] * 5),
        tmp_path,
        max_attempts=5,
        backoff_s=10,
        max_backoff_s=25,
        sleep=sleeps,
    )
    r = judge.score([_img()], "p")
    assert not r.ok and r.attempts == 5 and sleeps == [10, 20, 25, 25]


# --- tiny random Qwen2.5-VL ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    from test_text_encoder import _build_tiny_qwen

    folder = tmp_path_factory.mktemp("tiny_qwen_judge")
    _build_tiny_qwen(folder)
    return folder


def test_transformers_judge_tiny_model(tiny_qwen_dir, tmp_path):
    from rededit.scoring.judges.vlm import TransformersVLMJudge

    judge = TransformersVLMJudge(tiny_qwen_dir, dtype="float32", max_new_tokens=8, max_image_area=56 * 56)
    assert judge.judge_id.startswith("transformers:") and judge.judge_id.endswith(":float32")
    # the id follows the files, not the folder's location
    moved = tmp_path / "moved"
    shutil.copytree(tiny_qwen_dir, moved)
    assert (
        TransformersVLMJudge(moved, dtype="float32", weights_id="tiny").judge_id == judge.judge_id + ":tiny"
    )
    assert judge.decoding["do_sample"] is False
    imgs = [_img(size=(90, 60)), _img((0, 90, 200), size=(90, 60))]
    prompt = GENERIC.render("add a cat on the sofa")
    text = judge.generate(imgs, prompt)
    assert isinstance(text, str) and text == judge.generate(imgs, prompt)  # greedy: deterministic
    cached = CachedJudge(judge, tmp_path, sleep=_Sleeps())
    r = cached.score(imgs, prompt, template=GENERIC, item_id="tiny-1")
    # random weights produce garbage: a parse failure, counted and listed, never a score of 0
    assert not r.ok and r.scores is None and r.error.startswith("parse:") and r.raw_text == text
    assert cached.failures == 1 and cached.failed[0].item_id == "tiny-1"
    agg = aggregate_scores([r])
    assert agg["n_failed"] == 1 and agg["mean"] == {}
    with pytest.raises(FileNotFoundError):
        TransformersVLMJudge(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        TransformersVLMJudge(tiny_qwen_dir, dtype="float99")


def test_openai_judge_reachability_check(server):
    """Issue 18: a refused connection is named up front instead of being retried for every item."""
    import socket

    from rededit.scoring.judges.vlm import JudgeUnreachableError

    _, url = server
    OpenAICompatibleJudge(url, "m").check_reachable()  # any HTTP answer (here 501 to GET) is a server
    OpenAICompatibleJudge.preflight(base_url=url, model="m")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeUnreachableError, match=f"{dead}/chat/completions is unreachable"):
        OpenAICompatibleJudge.preflight(base_url=dead, model="m")
    with pytest.raises(JudgeUnreachableError):
        CachedJudge(OpenAICompatibleJudge(dead, "m"), "unused").check_reachable()
