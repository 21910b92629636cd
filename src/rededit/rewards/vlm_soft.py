"""Fine-grained VLM soft-score reward, report §3.6.2 eq. (4).

.. math::

    R(x, y) = \\frac{1}{K} \\sum_{k=1}^{K} \\sum_{v \\in V} v \\, P(v \\mid x, y, c_k),\\qquad
    P(v \\mid \\cdot) = \\frac{\\exp z_v}{\\sum_{v' \\in V} \\exp z_{v'}}                         (4)

The judge first writes a chain-of-thought ``c_k`` (sampled, so the K passes differ); immediately after it,
the logits ``z_v`` of the numeric rating tokens ``V`` (e.g. ``"1" … "5"``) are read at the score position
and turned into an expected score instead of an argmax, which makes the reward continuous.

Two scorers, one per kind of judge (both reuse :mod:`rededit.scoring.judges.vlm`):

* :class:`TransformersSoftScorer`: a local Qwen2.5-VL. Each pass samples the CoT with ``generate``, cuts
  it where the answer's first score label starts, appends ``"<dimension>: "`` and reads the next-token
  logits in one forward pass. Every score value must be a single token (Qwen's tokenizer splits numbers
  into digits, so a 0–10 scale is refused: "10" is two tokens); each dimension is scored independently
  after the same CoT.
* :class:`OpenAICompatibleSoftScorer`: an endpoint that returns ``logprobs`` with ``top_logprobs``. The
  rating token is the first numeric token after the dimension's label in the sampled answer; its
  ``top_logprobs`` give ``z_v`` (log-probabilities are logits up to a constant). Values absent from the
  top list get probability 0 (renormalised over those present; ask for enough ``top_logprobs``), and
  spellings of one value (``"4"``, ``" 4"``) are merged by log-sum-exp.

Failure policy (as the judges': docs/architecture.md, judge-drift trap): a failed pass (backend error after
retries, or no rating token found) is excluded from the K-average and counted in :attr:`VLMSoftReward.stats`;
a sample whose passes all failed gets NaN, never 0. The reward is the expected score mapped to [0, 1] by
the template's scale ``(E − low) / (high − low)``, averaged over the template's dimensions.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from rededit.data.images import tensor_to_pil
from rededit.rewards.base import Reward, check_images, from_dataset_range
from rededit.scoring.judges.prompts import JudgeTemplate, PromptSet, builtin_prompt_set
from rededit.scoring.judges.vlm import JudgeError, OpenAICompatibleJudge, TransformersVLMJudge, judge_rgb
from rededit.utils.logging import get_logger
from rededit.utils.seeding import derive_seed

__all__ = [
    "OpenAICompatibleSoftScorer",
    "SoftScorer",
    "TransformersSoftScorer",
    "VLMSoftReward",
    "score_values",
    "soft_score_from_top_logprobs",
    "vlm_soft_score",
]

log = get_logger(__name__)


def vlm_soft_score(
    logits: Tensor,
    score_token_ids: Sequence[int] | Tensor,
    score_values: Sequence[float] | Tensor,
    *,
    pass_dim: int | None = None,
) -> Tensor:
    """Eq. (4): the softmax-weighted expected score over the rating tokens, optionally averaged over passes.

    Args:
        logits: next-token logits at the score position ``[..., vocab]`` (e.g. ``[B, K, V]``).
        score_token_ids: token id of each rating value ``[M]``.
        score_values: the value of each rating token ``[M]`` (e.g. ``1 … 5``).
        pass_dim: dimension of ``logits`` indexing the K stochastic passes to average over (the outer
            ``1/K Σ_k``); passes whose expectation is NaN (failed) are excluded. ``None``: no averaging.

    Returns:
        expected score(s) with the vocab dimension (and ``pass_dim``) removed, float32.
    """
    ids = torch.as_tensor(score_token_ids, dtype=torch.long, device=logits.device)
    values = torch.as_tensor(score_values, dtype=torch.float32, device=logits.device)
    if ids.ndim != 1 or ids.shape != values.shape or ids.numel() == 0:
        raise ValueError(
            f"need one token id per score value, got {tuple(ids.shape)} ids, {tuple(values.shape)} values"
        )
    if int(ids.max()) >= logits.shape[-1] or int(ids.min()) < 0:
        raise ValueError(f"score token ids {ids.tolist()} out of range for vocabulary of {logits.shape[-1]}")
    probs = torch.softmax(logits.float().index_select(-1, ids), dim=-1)  # P(v | ·) over V only
    expected = (probs * values).sum(-1)
    if pass_dim is not None:
        expected = expected.nanmean(dim=pass_dim if pass_dim >= 0 else pass_dim + 1)
    return expected


def score_values(scale: tuple[float, float]) -> list[int]:
    """The integer rating values of an inclusive scale ``(low, high)``."""
    lo, hi = scale
    if lo != int(lo) or hi != int(hi):
        raise ValueError(f"soft scoring needs an integer scale, got {scale}")
    return list(range(int(lo), int(hi) + 1))


def soft_score_from_top_logprobs(
    top_logprobs: Sequence[Mapping[str, Any]], values: Sequence[int]
) -> float | None:
    """Eq. (4) for one pass from an endpoint's ``top_logprobs`` at the rating position.

    Args:
        top_logprobs: ``[{"token": "4", "logprob": -0.1}, ...]``.
        values: the rating values; a token counts for value ``v`` when its stripped text is ``str(v)``.

    Returns:
        the expected value over the values present (probabilities renormalised), or ``None`` when none is.
    """
    z: dict[int, float] = {}
    for entry in top_logprobs:
        tok = str(entry.get("token", "")).strip()
        lp = entry.get("logprob")
        if lp is None or not math.isfinite(float(lp)):
            continue
        for v in values:
            if tok == str(v):
                z[v] = (
                    float(lp)
                    if v not in z
                    else float(torch.logaddexp(torch.tensor(z[v]), torch.tensor(float(lp))))
                )
    if not z:
        return None
    keys = sorted(z)
    logits = torch.tensor([z[v] for v in keys]).unsqueeze(0)
    return float(vlm_soft_score(logits, list(range(len(keys))), keys)[0])


class SoftScorer(abc.ABC):
    """A judge that returns, per stochastic CoT pass, the expected score of every template dimension."""

    @property
    @abc.abstractmethod
    def scorer_id(self) -> str:
        """Identity of the judge (model, weights, decoding), recorded with the reward."""

    @abc.abstractmethod
    def pass_scores(
        self, images: Sequence[Image.Image], prompt: str, template: JudgeTemplate, *, seed: int
    ) -> dict[str, float]:
        """One pass: ``{template key: expected score on the template's scale}``.

        Raises:
            JudgeError: the pass failed (``retryable`` says whether another attempt may succeed).
        """


def _label_regex(label: str) -> re.Pattern:
    return re.compile(re.escape(label) + r"\s*[:：]", re.IGNORECASE)


def _truncate_cot(text: str, labels: Sequence[str]) -> str:
    """The CoT up to where the answer starts giving scores (the first ``<label>:`` of any dimension)."""
    cut = len(text)
    for label in labels:
        m = _label_regex(label).search(text)
        if m is not None:
            cut = min(cut, m.start())
    return text[:cut].rstrip()


class TransformersSoftScorer(TransformersVLMJudge, SoftScorer):
    """Eq. (4) with a local Qwen2.5-VL-class model (the loading, fingerprint and chat format of
    :class:`~rededit.scoring.judges.vlm.TransformersVLMJudge`).

    Args:
        path, dtype, device, max_image_area, weights_id: as the judge.
        max_new_tokens: CoT length limit per pass.
        temperature, top_p: CoT sampling (the K passes differ through these; seeded per pass).
        answer_prefix: text appended after the CoT before reading the rating logits; ``{dimension}`` is
            replaced by the dimension's name as the template asks for it.
    """

    def __init__(
        self,
        path: str,
        dtype: str | object = "bfloat16",
        device: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_image_area: int | None = 1024 * 1024,
        weights_id: str | None = None,
        answer_prefix: str = "\n{dimension}: ",
    ):
        super().__init__(path, dtype, device, max_new_tokens, max_image_area, weights_id)
        if temperature <= 0:
            raise ValueError(f"CoT passes must be sampled (temperature > 0), got {temperature}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.answer_prefix = answer_prefix
        self._token_ids: dict[tuple[int, ...], list[int]] = {}

    @property
    def scorer_id(self) -> str:
        return f"{self.judge_id}|T={self.temperature},top_p={self.top_p},max_new={self.max_new_tokens}"

    def value_token_ids(self, values: Sequence[int]) -> list[int]:
        """Token id of each rating value; raises when a value is not a single token."""
        key = tuple(values)
        if key not in self._token_ids:
            ids = []
            for v in values:
                enc = self.processor.tokenizer.encode(str(v), add_special_tokens=False)
                if len(enc) != 1:
                    raise ValueError(
                        f"rating value {v} is {len(enc)} tokens for this tokenizer; soft scoring needs one "
                        "token per value (use a 1–5 or 0–9 scale)"
                    )
                ids.append(enc[0])
            self._token_ids[key] = ids
        return self._token_ids[key]

    def _inputs(self, text: str, imgs: list[Image.Image]) -> Any:
        inputs = self.processor(text=[text], images=imgs or None, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def pass_scores(
        self, images: Sequence[Image.Image], prompt: str, template: JudgeTemplate, *, seed: int
    ) -> dict[str, float]:
        values = score_values(template.scale)
        ids = self.value_token_ids(values)
        imgs = [judge_rgb(im, self.max_image_area) for im in images]
        chat = self._chat_text(prompt, len(imgs))
        inputs = self._inputs(chat, imgs)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # the pass's own seed: same (seed, step, id, k) → same CoT
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=None,
            )
        cot = self.processor.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        cot = _truncate_cot(cot, template.dimensions)
        scores = {}
        for dim, key in zip(template.dimensions, template.keys):
            text = chat + cot + self.answer_prefix.format(dimension=dim)
            with torch.no_grad():
                logits = self.model(**self._inputs(text, imgs)).logits[0, -1]
            scores[key] = float(vlm_soft_score(logits, ids, values))
        return scores


class OpenAICompatibleSoftScorer(OpenAICompatibleJudge, SoftScorer):
    """Eq. (4) through an OpenAI-compatible endpoint returning ``logprobs`` (``top_logprobs``), e.g. vLLM.

    Args:
        base_url, model, api_key_env, timeout, max_tokens, image_format, judge_version, extra_body: as
            :class:`~rededit.scoring.judges.vlm.OpenAICompatibleJudge`.
        temperature: CoT sampling temperature (> 0: the K passes must differ); each pass sends its own seed.
        top_logprobs: alternatives returned per token (the rating distribution is read from them).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        temperature: float = 1.0,
        max_tokens: int = 1024,
        top_logprobs: int = 20,
        image_format: str = "png",
        judge_version: str | None = None,
        extra_body: Mapping | None = None,
    ):
        super().__init__(
            base_url,
            model,
            api_key_env=api_key_env,
            timeout=timeout,
            temperature=temperature,
            max_tokens=max_tokens,
            image_format=image_format,
            judge_version=judge_version,
            extra_body=extra_body,
        )
        if temperature <= 0:
            raise ValueError(f"CoT passes must be sampled (temperature > 0), got {temperature}")
        self.top_logprobs = int(top_logprobs)

    @property
    def scorer_id(self) -> str:
        return f"{self.judge_id}|T={self.temperature},top_logprobs={self.top_logprobs}"

    def pass_scores(
        self, images: Sequence[Image.Image], prompt: str, template: JudgeTemplate, *, seed: int
    ) -> dict[str, float]:
        body = self.payload(images, prompt)
        body.update(logprobs=True, top_logprobs=self.top_logprobs, seed=int(seed % (2**31)))
        reply, raw = self.post(body)
        try:
            tokens = reply["choices"][0]["logprobs"]["content"]
            texts = [str(t["token"]) for t in tokens]
        except (KeyError, IndexError, TypeError) as err:
            snippet = raw[:200].decode("utf-8", "replace")
            raise JudgeError(
                f"reply from {self.url} carries no token logprobs: {snippet!r}", retryable=False
            ) from err
        starts, pos = [], 0
        for t in texts:
            starts.append(pos)
            pos += len(t)
        full = "".join(texts)
        values = score_values(template.scale)
        scores = {}
        for dim, key in zip(template.dimensions, template.keys):
            matches = list(_label_regex(dim).finditer(full))
            if not matches:
                raise JudgeError(f"no {dim!r} label in the answer", retryable=True)
            end = matches[-1].end()
            value = None
            for j, t in enumerate(texts):
                if starts[j] + len(t) <= end or not t.strip():
                    continue
                if t.strip() in {str(v) for v in values}:
                    value = soft_score_from_top_logprobs(tokens[j].get("top_logprobs") or [], values)
                break
            if value is None:
                raise JudgeError(f"no rating token after the {dim!r} label", retryable=True)
            scores[key] = value
        return scores


_ROLE_INDEX = {"source": 0, "reference": 1}


class VLMSoftReward(Reward):
    """Eq. (4) over a batch: K stochastic CoT passes per sample, soft scores averaged, mapped to [0, 1].

    Args:
        scorer: a :class:`SoftScorer`, or a zero-argument factory (Hydra ``_partial_: true``) called on
            first use, so instantiating the config loads no model.
        prompt_set: a built-in prompt-set name (:func:`rededit.scoring.judges.prompts.builtin_prompt_set`) or
            a :class:`~rededit.scoring.judges.prompts.PromptSet`; the batch's task picks the template.
        k: passes per sample (the ``K`` of eq. 4).
        seed: base seed; pass ``k`` of sample ``id`` at ``(epoch, step)`` samples with
            ``derive_seed(seed, epoch, step, id, k)``.
        max_attempts: tries per pass for retryable failures.
        name: reward name.

    Returns (forward): ``reward``, ``vlm_<key>`` per template dimension (normalised to [0, 1]) and
    ``vlm_ok_passes`` (passes that succeeded) — ``[B]``. :attr:`stats` counts passes and failures.
    """

    name = "vlm"

    def __init__(
        self,
        scorer: SoftScorer | Callable[[], SoftScorer],
        prompt_set: str | PromptSet = "rededit_generic",
        k: int = 4,
        seed: int = 0,
        max_attempts: int = 2,
        name: str | None = None,
    ):
        super().__init__(name)
        if k < 1 or max_attempts < 1:
            raise ValueError(f"VLMSoftReward: need k ≥ 1 and max_attempts ≥ 1, got {k}, {max_attempts}")
        self._scorer = scorer if isinstance(scorer, SoftScorer) else None
        self._factory = None if isinstance(scorer, SoftScorer) else scorer
        if self._scorer is None and not callable(scorer):
            raise TypeError(f"scorer must be a SoftScorer or a factory, got {type(scorer).__name__}")
        self.prompt_set = builtin_prompt_set(prompt_set) if isinstance(prompt_set, str) else prompt_set
        self.k, self.seed, self.max_attempts = int(k), int(seed), int(max_attempts)
        self.stats = {"passes": 0, "failed_passes": 0, "failed_samples": 0, "skipped_samples": 0}
        self.failures: list[dict[str, Any]] = []

    @property
    def scorer(self) -> SoftScorer:
        if self._scorer is None:
            self._scorer = self._factory()
            if not isinstance(self._scorer, SoftScorer):
                raise TypeError(
                    f"the scorer factory returned {type(self._scorer).__name__}, not a SoftScorer"
                )
        return self._scorer

    def _one_pass(self, imgs, prompt, template, seed, item_id) -> dict[str, float] | None:
        err = None
        for attempt in range(self.max_attempts):
            self.stats["passes"] += 1
            try:
                return self.scorer.pass_scores(imgs, prompt, template, seed=derive_seed(seed, attempt))
            except JudgeError as e:
                err = e
                if not e.retryable:
                    break
        self.stats["failed_passes"] += 1
        if len(self.failures) < 1000:
            self.failures.append({"item_id": item_id, "error": str(err)})
        log.warning("VLM soft-score pass failed for %s: %s", item_id, err)
        return None

    @torch.no_grad()
    def forward(self, images: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        check_images(images, "VLMSoftReward")
        b = images.shape[0]
        tasks = batch.get("tasks") or [batch.get("task")] * b
        texts = batch.get("texts") or [None] * b
        ids = batch.get("ids") or [str(i) for i in range(b)]
        refs = batch.get("references") or []
        epoch, step = batch.get("epoch", 0), batch.get("step", 0)
        rows: list[dict[str, float]] = []
        ok_passes = []
        for i in range(b):
            template = self.prompt_set.template(str(tasks[i]))
            imgs = []
            for role in template.image_roles:
                if role == "edited":
                    imgs.append(tensor_to_pil(images[i], value_range=(0.0, 1.0)))
                elif _ROLE_INDEX.get(role, 99) < len(refs):
                    imgs.append(
                        tensor_to_pil(from_dataset_range(refs[_ROLE_INDEX[role]][i]), value_range=(0.0, 1.0))
                    )
                else:
                    imgs = None
                    break
            if imgs is None or not texts[i] or not str(texts[i]).strip():
                self.stats["skipped_samples"] += 1
                rows.append({})
                ok_passes.append(0)
                continue
            prompt = template.render(str(texts[i]))
            lo, hi = template.scale
            passes = []
            for k in range(self.k):
                s = self._one_pass(
                    imgs, prompt, template, derive_seed(self.seed, epoch, step, ids[i], k), ids[i]
                )
                if s is not None:
                    passes.append({key: (s[key] - lo) / (hi - lo) for key in template.keys})
            ok_passes.append(len(passes))
            if not passes:
                self.stats["failed_samples"] += 1
                rows.append({})
                continue
            rows.append({key: sum(p[key] for p in passes) / len(passes) for key in template.keys})
        keys = sorted({key for r in rows for key in r})
        out = {
            "reward": [sum(r.values()) / len(r) if r else math.nan for r in rows],
            **{f"vlm_{key}": [r.get(key, math.nan) for r in rows] for key in keys},
            "vlm_ok_passes": ok_passes,
        }
        return {k: torch.tensor(v, dtype=torch.float32, device=images.device) for k, v in out.items()}
