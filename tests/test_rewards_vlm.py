"""VLM soft-score reward, report §3.6.2 eq. (4): the math on constructed logits and logprobs, the reward's
K-pass averaging and failure policy (failures counted, never scored 0), the endpoint scorer against a
local fake server, and a tiny random Qwen2.5-VL."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import fake_endpoint
from rededit.rewards import (
    OpenAICompatibleSoftScorer,
    SoftScorer,
    VLMSoftReward,
    soft_score_from_top_logprobs,
    vlm_soft_score,
)
from rededit.scoring.judges.prompts import builtin_prompt_set
from rededit.scoring.judges.vlm import JudgeError

IDS = list(range(10, 20))  # token ids of the ratings "0" … "9" in a 32-token vocabulary
VALUES = list(range(10))


def test_soft_score_on_constructed_logits():
    peaked = torch.zeros(32)
    peaked[IDS[7]] = 50.0
    assert vlm_soft_score(peaked, IDS, VALUES) == pytest.approx(7.0, abs=1e-4)
    uniform = torch.randn(32)
    uniform[IDS] = 3.0  # equal rating logits; the other tokens do not matter
    assert vlm_soft_score(uniform, IDS, VALUES) == pytest.approx(4.5)
    two = torch.full((32,), -1e4)
    two[IDS[2]] = two[IDS[6]] = 0.0
    assert vlm_soft_score(two, IDS, VALUES) == pytest.approx(4.0)  # 0.5·2 + 0.5·6
    # Softmax over V only: P(v) = e^{z_v} / Σ_{v'} e^{z_v'}, checked against a direct computation.
    z = torch.randn(32, generator=torch.Generator().manual_seed(0))
    p = torch.exp(z[IDS]) / torch.exp(z[IDS]).sum()
    assert vlm_soft_score(z, IDS, VALUES) == pytest.approx(float((p * torch.arange(10.0)).sum()), rel=1e-5)


def test_soft_score_averages_k_passes():
    logits = torch.full((2, 3, 32), -1e4)  # [B, K, V]
    logits[0, 0, IDS[7]] = logits[0, 1, IDS[3]] = logits[0, 2, IDS[5]] = 0.0
    logits[1, :, IDS[9]] = 0.0
    out = vlm_soft_score(logits, IDS, VALUES, pass_dim=1)
    assert out.shape == (2,) and out.tolist() == pytest.approx([5.0, 9.0])
    per_pass = vlm_soft_score(logits, IDS, VALUES)
    per_pass[0, 2] = math.nan  # a failed pass is excluded, not counted as 0
    assert per_pass.nanmean(1)[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="out of range"):
        vlm_soft_score(torch.zeros(8), [9], [1])
    with pytest.raises(ValueError, match="one token id per score value"):
        vlm_soft_score(torch.zeros(8), [1, 2], [1])


def test_soft_score_from_top_logprobs():
    top = [
        {"token": "4", "logprob": math.log(0.3)},
        {"token": " 4", "logprob": math.log(0.3)},  # another spelling of 4: merged
        {"token": "5", "logprob": math.log(0.2)},
        {"token": "Four", "logprob": math.log(0.1)},
        {"token": "2", "logprob": math.log(0.2)},
    ]
    assert soft_score_from_top_logprobs(top, [1, 2, 3, 4, 5]) == pytest.approx(
        (0.6 * 4 + 0.2 * 5 + 0.2 * 2) / 1.0
    )
    assert soft_score_from_top_logprobs([{"token": "x", "logprob": 0.0}], [1, 2]) is None


# --- the reward with a test double of the scorer ---------------------------------------------------------


class FakeScorer(SoftScorer):
    """Returns a score per dimension that depends on the pass seed; fails for chosen items/passes."""

    def __init__(self, fail=lambda call: False):
        self.calls, self.seeds, self.fail = 0, [], fail

    @property
    def scorer_id(self) -> str:
        return "fake"

    def pass_scores(self, images, prompt, template, *, seed):
        self.calls += 1
        self.seeds.append(seed)
        assert len(images) == len(template.image_roles) and "make it red" in prompt
        if self.fail(self.calls):
            raise JudgeError("server down", retryable=self.calls % 2 == 0)
        lo, hi = template.scale
        return {key: lo + (hi - lo) * (0.25 if seed % 2 else 0.75) for key in template.keys}


def _batch(b=3):
    return {
        "ids": [f"s{i}" for i in range(b)],
        "tasks": ["add"] * b,
        "texts": ["make it red"] * b,
        "references": [torch.zeros(b, 3, 8, 8)],
        "epoch": 0,
        "step": 5,
    }


def test_vlm_reward_k_average_and_determinism():
    scorer = FakeScorer()
    reward = VLMSoftReward(scorer, k=4, seed=1)
    out = reward(torch.rand(3, 3, 8, 8), _batch())
    keys = builtin_prompt_set("rededit_generic").template("add").keys
    assert set(out) == {"reward", "vlm_ok_passes", *(f"vlm_{k}" for k in keys)}
    assert torch.all((out["reward"] >= 0) & (out["reward"] <= 1)) and torch.all(out["vlm_ok_passes"] == 4)
    # Each sample's reward is the mean of its 4 passes' normalised scores.
    for i in range(3):
        odd = sum(s % 2 for s in scorer.seeds[4 * i : 4 * i + 4])
        assert out["reward"][i] == pytest.approx((0.25 * odd + 0.75 * (4 - odd)) / 4)
    again = FakeScorer()
    VLMSoftReward(again, k=4, seed=1)(torch.rand(3, 3, 8, 8), _batch())
    assert again.seeds == scorer.seeds and len(set(scorer.seeds)) == 12  # derived, distinct per (id, k)


def test_vlm_reward_failures_are_counted_never_zero():
    # The first sample's 4 passes all fail: odd calls are not retryable, even ones are retried once
    # (calls 1 | 2, 3 | 4, 5 | 6, 7), then every call succeeds.
    scorer = FakeScorer(fail=lambda call: call <= 7)
    reward = VLMSoftReward(scorer, k=4, max_attempts=2)
    out = reward(torch.rand(2, 3, 8, 8), _batch(2))
    assert math.isnan(out["reward"][0]) and out["vlm_ok_passes"][0] == 0
    assert out["reward"][1] > 0 and out["vlm_ok_passes"][1] == 4
    assert reward.stats["failed_passes"] == 4 and reward.stats["failed_samples"] == 1
    assert reward.stats["passes"] == 7 + 4
    assert len(reward.failures) == 4 and reward.failures[0]["item_id"] == "s0"
    # A sample without an instruction or with a missing source image is not applicable: NaN, counted.
    batch = _batch(2)
    batch["texts"] = ["make it red", ""]
    assert math.isnan(VLMSoftReward(FakeScorer(), k=1)(torch.rand(2, 3, 8, 8), batch)["reward"][1])


def test_vlm_reward_scorer_is_built_lazily():
    built = []

    def factory():
        built.append(1)
        return FakeScorer()

    reward = VLMSoftReward(factory, k=1)
    assert not built
    reward(torch.rand(1, 3, 8, 8), _batch(1))
    reward(torch.rand(1, 3, 8, 8), _batch(1))
    assert built == [1]


# --- endpoint scorer --------------------------------------------------------------------------------------


def _logprob_reply(tokens: list[tuple[str, list[tuple[str, float]]]]) -> dict:
    content = [
        {
            "token": t,
            "logprob": (top[0][1] if top else -0.01),
            "top_logprobs": [{"token": a, "logprob": b} for a, b in top],
        }
        for t, top in tokens
    ]
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(t for t, _ in tokens)},
                "logprobs": {"content": content},
                "finish_reason": "stop",
            }
        ]
    }


@pytest.fixture
def server():
    with fake_endpoint(lambda srv, body: srv.script.pop(0)) as (srv, url):
        srv.script = []
        yield srv, url


def test_openai_soft_scorer_reads_rating_logprobs(server):
    srv, url = server
    template = builtin_prompt_set("imgedit").template("add")
    dims = template.dimensions
    answer = [("Reason", []), (": 3 cats look fine.", []), ("\n", [])]  # a digit inside the CoT is ignored
    tops = {0: [("4", -0.1), ("3", -2.4)], 1: [("5", 0.0)], 2: [("2", math.log(0.5)), ("1", math.log(0.5))]}
    for j, dim in enumerate(dims):
        answer += [(f"{dim}", []), (":", []), (" ", []), (tops[j][0][0], tops[j]), ("\n", [])]
    srv.script = [(200, _logprob_reply(answer)), (200, _logprob_reply(answer[:3])), (503, {"error": "busy"})]
    scorer = OpenAICompatibleSoftScorer(url, "fake-vl", api_key_env=None, top_logprobs=5)
    from PIL import Image

    imgs = [Image.new("RGB", (8, 8))] * len(template.image_roles)
    scores = scorer.pass_scores(imgs, template.render("add a hat"), template, seed=123)
    p4 = math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.4))
    expected = [4 * p4 + 3 * (1 - p4), 5.0, 1.5]
    assert [scores[k] for k in template.keys] == pytest.approx(expected)
    req = srv.requests[0]
    assert (
        req["logprobs"] is True
        and req["top_logprobs"] == 5
        and req["seed"] == 123
        and req["temperature"] == 1.0
    )
    with pytest.raises(JudgeError, match="label"):  # an answer without the scores is a failed pass
        scorer.pass_scores(imgs, "p <edit_prompt>", template, seed=1)
    with pytest.raises(JudgeError, match="503") as err:
        scorer.pass_scores(imgs, "p", template, seed=1)
    assert err.value.retryable
    with pytest.raises(ValueError, match="temperature"):
        OpenAICompatibleSoftScorer(url, "m", temperature=0.0)


# --- tiny random Qwen2.5-VL -------------------------------------------------------------------------------


def test_transformers_soft_scorer_tiny_model(tmp_path):
    from rededit.rewards import TransformersSoftScorer
    from test_text_encoder import _build_tiny_qwen

    _build_tiny_qwen(tmp_path)
    scorer = TransformersSoftScorer(tmp_path, dtype="float32", max_new_tokens=6, max_image_area=56 * 56)
    template = builtin_prompt_set("rededit_generic").template("add")
    ids = scorer.value_token_ids([1, 2, 3, 4, 5])
    assert len(set(ids)) == 5
    reward = VLMSoftReward(scorer, k=2, seed=0)
    batch = _batch(1)
    batch["references"] = [torch.rand(1, 3, 56, 56) * 2 - 1]
    edited = torch.rand(1, 3, 56, 56)
    out = reward(edited, batch)
    assert 0.0 <= float(out["reward"][0]) <= 1.0 and out["vlm_ok_passes"][0] == 2
    assert set(out) >= {f"vlm_{k}" for k in template.keys}
    # The passes are seeded from (seed, epoch, step, id, k): the same batch gives the same reward.
    assert torch.equal(VLMSoftReward(scorer, k=2, seed=0)(edited, batch)["reward"], out["reward"])
    with pytest.raises(ValueError, match="tokens"):
        scorer.value_token_ids([10])  # "10" is two tokens
