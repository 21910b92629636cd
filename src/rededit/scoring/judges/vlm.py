"""VLM judges: a local transformers Qwen2.5-VL, any OpenAI-compatible endpoint, and a caching,
retrying wrapper with failure accounting (report §4.2 evaluation pipeline, §5.2 ImgEdit / GEdit).

Peer scores drift because judges change, failed calls are scored 0 and settings go unrecorded
(docs/architecture.md, "Traps other projects fell into"). Here every :class:`JudgeResponse` carries the judge id and the prompt
template hash; a failed call (backend error, refusal, unparseable answer) is ``ok=False`` and is
*excluded* from means and *counted* in ``n_failed`` / ``failure_rate`` — never a 0.

Typical use::

    judge = CachedJudge(OpenAICompatibleJudge("http://localhost:8000/v1", "Qwen2.5-VL-72B"), "cache/judge")
    t = prompt_set.template(task)
    r = judge.score([source, edited], t.render(instruction), template=t, item_id=row_id)
    summary = aggregate_scores(responses)   # {"mean": {...}, "n_ok", "n_failed", "failure_rate", ...}
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import hashlib
import http.client
import io
import json
import math
import os
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rededit.scoring.judges.parsing import ParseResult, parse_scores
from rededit.utils.io import atomic_write_text
from rededit.utils.logging import get_logger

if TYPE_CHECKING:
    from PIL import Image

    from rededit.scoring.judges.prompts import JudgeTemplate

__all__ = [
    "CachedJudge",
    "JudgeError",
    "JudgeFailure",
    "JudgeResponse",
    "JudgeUnreachableError",
    "OpenAICompatibleJudge",
    "TransformersVLMJudge",
    "VLMJudge",
    "aggregate_gedit",
    "aggregate_scores",
    "g_overall",
    "image_hash",
]

log = get_logger(__name__)

CACHE_FORMAT = 1


class JudgeError(RuntimeError):
    """A judge backend call failed (HTTP error, timeout, malformed server reply).

    Args:
        message: what went wrong.
        retryable: whether another attempt may succeed (5xx, 429, timeouts: yes; 400/401/404: no).
    """

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class JudgeUnreachableError(RuntimeError):
    """The judge's endpoint cannot be reached at all (connection refused, unknown host, timed out): no item
    could be judged, so an evaluation stops instead of retrying every item and reporting a failure rate of 1."""


@dataclass(frozen=True)
class JudgeResponse:
    """One judged item.

    Attributes:
        raw_text: the judge's answer (``None`` when no call succeeded).
        parsed: the parse of ``raw_text`` (``None`` when there was no answer).
        ok: ``True`` only when an answer was received and every requested score parsed.
        attempts: backend calls made for this item in this run (0 when served from the cache).
        error: why the item failed (``None`` when ``ok``).
        judge_id: the judge that answered (model + weights fingerprint).
        template_hash: hash of the prompt template (``None`` when scored without a template).
        cached: served from the on-disk cache.
        item_id: the caller's id for the item, for failure lists.
    """

    raw_text: str | None
    parsed: ParseResult | None
    ok: bool
    attempts: int
    error: str | None
    judge_id: str
    template_hash: str | None
    cached: bool = False
    item_id: str | None = None

    @property
    def scores(self) -> dict[str, float] | None:
        """The parsed scores when ``ok``, else ``None`` (never zeros)."""
        return self.parsed.scores if self.ok and self.parsed is not None else None

    def to_dict(self) -> dict:
        return {
            "raw_text": self.raw_text,
            "parsed": None if self.parsed is None else self.parsed.to_dict(),
            "ok": self.ok,
            "attempts": self.attempts,
            "error": self.error,
            "judge_id": self.judge_id,
            "template_hash": self.template_hash,
            "cached": self.cached,
            "item_id": self.item_id,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> JudgeResponse:
        parsed = d.get("parsed")
        return cls(
            raw_text=d.get("raw_text"),
            parsed=None if parsed is None else ParseResult.from_dict(parsed),
            ok=bool(d["ok"]),
            attempts=int(d.get("attempts", 0)),
            error=d.get("error"),
            judge_id=str(d["judge_id"]),
            template_hash=d.get("template_hash"),
            cached=bool(d.get("cached", False)),
            item_id=d.get("item_id"),
        )


def image_hash(img: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels (independent of file format or metadata)."""
    h = hashlib.sha256()
    h.update(f"{img.mode}|{img.size[0]}x{img.size[1]}|".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _parse(raw: str, template: JudgeTemplate | None, out_of_range: str) -> ParseResult:
    if template is not None:
        return template.parse(raw, out_of_range=out_of_range)
    return parse_scores(raw, out_of_range=out_of_range)


class VLMJudge(abc.ABC):
    """A vision-language judge: images + prompt → raw text → parsed scores.

    Subclasses implement :meth:`generate` (one backend call; raise :class:`JudgeError` on a backend
    failure) and :attr:`judge_id`; :attr:`decoding` lists every setting that changes the answer.
    """

    @property
    @abc.abstractmethod
    def judge_id(self) -> str:
        """Identity of the model answering (recorded with every score, part of the cache key)."""

    @property
    def decoding(self) -> dict:
        """Decoding settings that change the answer (part of the cache key)."""
        return {}

    @abc.abstractmethod
    def generate(self, images: Sequence[Image.Image], prompt: str) -> str:
        """One backend call: the raw answer to ``prompt`` with ``images`` placed after the text."""

    def check_reachable(self) -> None:
        """Raise :class:`JudgeUnreachableError` when the backend cannot answer at all (a remote endpoint that
        refuses connections); local backends have nothing to check."""
        return None

    @classmethod
    def preflight(cls, **kwargs: object) -> None:
        """Cheap checks of a backend's settings *before* it is built (an evaluation runs them before it spends
        hours generating edits, and builds the judge, which may load a large model, only afterwards).

        Args:
            kwargs: the constructor's arguments, as configured.
        """
        return None

    def score(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        template: JudgeTemplate | None = None,
        *,
        item_id: str | None = None,
        out_of_range: Literal["reject", "clamp"] = "reject",
    ) -> JudgeResponse:
        """Judge one item with a single attempt (wrap in :class:`CachedJudge` for retries and a cache).

        Args:
            images: the images the template expects, in its ``image_roles`` order.
            prompt: the rendered prompt.
            template: the template ``prompt`` was rendered from; decides the parsed dimensions and scale
                and supplies the recorded ``template_hash``. Without it one overall score is parsed.
            item_id: the caller's id, carried into the response.
            out_of_range: see :func:`rededit.scoring.judges.parsing.parse_scores`.
        """
        return _score_loop(
            self, images, prompt, template, item_id, out_of_range, max_attempts=1, sleep=None, backoff=()
        )


def _score_loop(
    judge: VLMJudge,
    images: Sequence[Image.Image],
    prompt: str,
    template: JudgeTemplate | None,
    item_id: str | None,
    out_of_range: str,
    *,
    max_attempts: int,
    sleep: Callable[[float], None] | None,
    backoff: Sequence[float],
    retry_parse_failures: bool = False,
) -> JudgeResponse:
    """Call ``judge.generate`` up to ``max_attempts`` times; sleep ``backoff[i]`` after failure i."""
    th = None if template is None else template.template_hash
    raw, parsed, error = None, None, None
    attempts = 0
    for attempt in range(max_attempts):
        attempts = attempt + 1
        try:
            text = judge.generate(images, prompt)
        except JudgeError as err:
            error = f"backend: {err}"
            log.warning("judge %s attempt %d/%d failed: %s", judge.judge_id, attempts, max_attempts, err)
            if not err.retryable:
                break
        else:
            raw, parsed = text, _parse(text, template, out_of_range)
            if parsed.ok:
                error = None
                break
            error = f"parse: {parsed.error}"
            if not retry_parse_failures:
                break
        if attempts < max_attempts and sleep is not None:
            sleep(backoff[min(attempt, len(backoff) - 1)])
    ok = parsed is not None and parsed.ok
    return JudgeResponse(
        raw_text=raw,
        parsed=parsed,
        ok=ok,
        attempts=attempts,
        error=None if ok else error,
        judge_id=judge.judge_id,
        template_hash=th,
        item_id=item_id,
    )


# --- caching + retries --------------------------------------------------------------------------------


@dataclass
class JudgeFailure:
    """One failed item, as listed in :attr:`CachedJudge.failed`."""

    item_id: str | None
    error: str | None
    attempts: int
    cache_key: str
    raw_text: str | None


class CachedJudge(VLMJudge):
    """Disk cache of raw judge answers plus retries with exponential backoff and failure accounting.

    The cache key is ``sha256(judge_id, template_hash, prompt, image hashes, decoding settings)``, so a
    changed model, prompt template, instruction, image or decoding setting never reuses an answer.
    Raw text is cached (written atomically) and re-parsed on every read, so parser fixes apply without
    calling the judge again. Backend failures are not cached (the next run tries again).

    Args:
        judge: the backend.
        cache_dir: folder of ``<key[:2]>/<key>.json`` records.
        max_attempts: backend calls per item at most (≥ 1).
        backoff_s: sleep after the first failed attempt; multiplied by ``backoff_factor`` after each
            further one, capped at ``max_backoff_s``.
        sleep: the sleep function (inject a recorder in tests).
        retry_parse_failures: also retry answers that do not parse (useful for sampled API judges;
            pointless for greedy local decoding, hence off by default). A cached unparseable answer
            is then re-queried too.

    Attributes:
        failures: number of failed items scored through this wrapper (cached failures included).
        failed: the failed items (id, error, attempts).
        stats: calls, cache hits, retries and successes.
    """

    def __init__(
        self,
        judge: VLMJudge,
        cache_dir: str | os.PathLike,
        *,
        max_attempts: int = 3,
        backoff_s: float = 2.0,
        backoff_factor: float = 2.0,
        max_backoff_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        retry_parse_failures: bool = False,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be ≥ 1, got {max_attempts}")
        if backoff_s < 0 or backoff_factor < 1:
            raise ValueError(f"need backoff_s ≥ 0 and backoff_factor ≥ 1, got {backoff_s}, {backoff_factor}")
        self.judge = judge
        self.cache_dir = Path(cache_dir)
        self.max_attempts = int(max_attempts)
        self.backoff = [
            min(backoff_s * backoff_factor**i, max_backoff_s) for i in range(max(1, max_attempts))
        ]
        self.sleep = sleep
        self.retry_parse_failures = retry_parse_failures
        self.failures = 0
        self.failed: list[JudgeFailure] = []
        self.stats = {"items": 0, "cache_hits": 0, "backend_calls": 0, "ok": 0, "failed": 0}

    @property
    def judge_id(self) -> str:
        return self.judge.judge_id

    @property
    def decoding(self) -> dict:
        return self.judge.decoding

    def generate(self, images: Sequence[Image.Image], prompt: str) -> str:
        self.stats["backend_calls"] += 1
        return self.judge.generate(images, prompt)

    def check_reachable(self) -> None:
        check = getattr(self.judge, "check_reachable", None)
        if check is not None:
            check()

    def failure_records(self) -> list[dict]:
        """The failed items as JSON-able dicts (for the run's ``judge_failures.json``)."""
        return [dataclasses.asdict(f) for f in self.failed]

    def cache_key(self, images: Sequence[Image.Image], prompt: str, template_hash: str | None) -> str:
        payload = {
            "judge_id": self.judge_id,
            "template_hash": template_hash,
            "prompt": prompt,
            "images": [image_hash(im) for im in images],
            "decoding": self.decoding,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _read(self, key: str) -> dict | None:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            log.warning("ignoring unreadable judge cache record %s (%s)", p, err)
            return None
        if rec.get("key") != key or not isinstance(rec.get("raw_text"), str):
            log.warning("ignoring judge cache record %s: key or raw_text missing", p)
            return None
        return rec

    def score(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        template: JudgeTemplate | None = None,
        *,
        item_id: str | None = None,
        out_of_range: Literal["reject", "clamp"] = "reject",
    ) -> JudgeResponse:
        th = None if template is None else template.template_hash
        key = self.cache_key(images, prompt, th)
        self.stats["items"] += 1
        rec = self._read(key)
        resp = None
        if rec is not None:
            parsed = _parse(rec["raw_text"], template, out_of_range)
            if parsed.ok or not self.retry_parse_failures:
                self.stats["cache_hits"] += 1
                resp = JudgeResponse(
                    raw_text=rec["raw_text"],
                    parsed=parsed,
                    ok=parsed.ok,
                    attempts=0,
                    error=None if parsed.ok else f"parse: {parsed.error}",
                    judge_id=self.judge_id,
                    template_hash=th,
                    cached=True,
                    item_id=item_id,
                )
        if resp is None:
            resp = _score_loop(
                self,
                images,
                prompt,
                template,
                item_id,
                out_of_range,
                max_attempts=self.max_attempts,
                sleep=self.sleep,
                backoff=self.backoff,
                retry_parse_failures=self.retry_parse_failures,
            )
            if resp.raw_text is not None:
                record = {
                    "format": CACHE_FORMAT,
                    "key": key,
                    "judge_id": self.judge_id,
                    "template_hash": th,
                    "decoding": self.decoding,
                    "raw_text": resp.raw_text,
                    "attempts": resp.attempts,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                atomic_write_text(self._path(key), json.dumps(record, ensure_ascii=False, indent=1))
        if resp.ok:
            self.stats["ok"] += 1
        else:
            self.stats["failed"] += 1
            self.failures += 1
            self.failed.append(JudgeFailure(item_id, resp.error, resp.attempts, key, resp.raw_text))
        return resp


# --- aggregation ---------------------------------------------------------------------------------------


def aggregate_scores(responses: Sequence[JudgeResponse], *, allow_mixed_judges: bool = False) -> dict:
    """Mean (and std) per score over the successful items; failures are counted, never averaged as 0.

    Args:
        responses: judged items.
        allow_mixed_judges: permit responses from several judge ids (off: mixing judges is how
            published numbers drift, so it raises).

    Returns:
        ``{"mean": {key: mean or None}, "std": {key: population std}, "n": {key: count},
        "n_ok", "n_failed", "n_total", "failure_rate" (None when empty), "judge_ids",
        "template_hashes", "failed_ids"}``.
    """
    judge_ids = sorted({r.judge_id for r in responses})
    if len(judge_ids) > 1 and not allow_mixed_judges:
        raise ValueError(f"responses come from several judges {judge_ids}; aggregate them separately")
    ok = [r for r in responses if r.ok and r.scores is not None]
    keys: list[str] = []
    for r in ok:
        keys.extend(k for k in r.scores if k not in keys)
    values = {k: [float(r.scores[k]) for r in ok if k in r.scores] for k in keys}
    n_total = len(responses)
    return {
        "mean": {k: (statistics.fmean(v) if v else None) for k, v in values.items()},
        "std": {k: (statistics.pstdev(v) if v else None) for k, v in values.items()},
        "n": {k: len(v) for k, v in values.items()},
        "n_ok": len(ok),
        "n_failed": n_total - len(ok),
        "n_total": n_total,
        "failure_rate": (n_total - len(ok)) / n_total if n_total else None,
        "judge_ids": judge_ids,
        "template_hashes": sorted({r.template_hash for r in responses if r.template_hash is not None}),
        "failed_ids": [r.item_id for r in responses if not (r.ok and r.scores is not None)],
    }


def g_overall(sc: float, pq: float) -> float:
    """GEdit overall score of one item: ``G_O = sqrt(G_SC · G_PQ)`` (report §5.2, Table 4)."""
    if not (math.isfinite(sc) and math.isfinite(pq)) or sc < 0 or pq < 0:
        raise ValueError(f"G_SC and G_PQ must be finite and ≥ 0, got {sc}, {pq}")
    return math.sqrt(sc * pq)


def aggregate_gedit(
    sc_responses: Sequence[JudgeResponse],
    pq_responses: Sequence[JudgeResponse],
    *,
    sc_key: str = "G_SC",
    pq_key: str = "G_PQ",
) -> dict:
    """GEdit means: G_SC and G_PQ over their successful items, G_O = mean over items of
    ``sqrt(G_SC·G_PQ)`` where both calls succeeded. Failed calls are counted, not scored.

    Args:
        sc_responses: semantic-consistency responses, one per item.
        pq_responses: perceptual-quality responses for the same items in the same order.
    """
    if len(sc_responses) != len(pq_responses):
        raise ValueError(f"{len(sc_responses)} G_SC responses but {len(pq_responses)} G_PQ responses")

    def value(r: JudgeResponse, key: str) -> float | None:
        if r.scores is None:
            return None
        if key not in r.scores:
            raise KeyError(f"response {r.item_id!r} has scores {sorted(r.scores)}, expected {key!r}")
        return float(r.scores[key])

    sc = [value(r, sc_key) for r in sc_responses]
    pq = [value(r, pq_key) for r in pq_responses]
    both = [g_overall(s, p) for s, p in zip(sc, pq) if s is not None and p is not None]
    sc_ok = [s for s in sc if s is not None]
    pq_ok = [p for p in pq if p is not None]
    n = len(sc)
    return {
        "G_SC": statistics.fmean(sc_ok) if sc_ok else None,
        "G_PQ": statistics.fmean(pq_ok) if pq_ok else None,
        "G_O": statistics.fmean(both) if both else None,
        "n_ok_sc": len(sc_ok),
        "n_ok_pq": len(pq_ok),
        "n_ok": len(both),
        "n_failed": n - len(both),
        "n_total": n,
        "failure_rate": (n - len(both)) / n if n else None,
    }


# --- backends ------------------------------------------------------------------------------------------


def judge_rgb(img: Image.Image, max_area: int | None) -> Image.Image:
    """RGB copy, downscaled (aspect kept) to at most ``max_area`` pixels."""
    from PIL import Image

    out = img.convert("RGB")
    if max_area is not None and out.width * out.height > max_area:
        s = math.sqrt(max_area / (out.width * out.height))
        out = out.resize((max(1, int(out.width * s)), max(1, int(out.height * s))), Image.Resampling.BICUBIC)
    return out


def fingerprint_folder(folder: Path) -> str:
    """Cheap identity of a model folder: every config/tokenizer JSON in full, and per weight file its
    size plus its first and last 4 MiB (reading tens of GB per run is not an option; two fine-tunes
    with equal configs still differ there)."""
    h = hashlib.sha256()
    chunk = 4 << 20
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".json":
            h.update(f.name.encode())
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            size = f.stat().st_size
            h.update(f"{f.name}|{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(chunk))
                if size > chunk:
                    fh.seek(max(chunk, size - chunk))
                    h.update(fh.read(chunk))
    return h.hexdigest()[:16]


class TransformersVLMJudge(VLMJudge):
    """A local Qwen2.5-VL-class judge (``Qwen2_5_VLForConditionalGeneration`` + ``AutoProcessor``).

    Decoding is greedy (``do_sample=False``) so the same inputs give the same answer; images follow the
    prompt text in the user turn, as REDEdit-Bench's prompts expect ("Below are the images…").

    Args:
        path: local model folder (weights, config, processor/tokenizer files).
        dtype: model dtype (``torch.dtype`` or its name).
        device: where to run (default CPU).
        max_new_tokens: answer length limit.
        max_image_area: images are downscaled to at most this many pixels before the processor.
        weights_id: optional label appended to ``judge_id`` (the id is otherwise a fingerprint of the
            folder's config, tokenizer and weight files, independent of where the folder lives).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dtype: str | object = "bfloat16",
        device: str | None = None,
        max_new_tokens: int = 512,
        max_image_area: int | None = 1024 * 1024,
        weights_id: str | None = None,
    ):
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"judge model folder not found: {self.path}")
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"unknown torch dtype {dtype!r}")
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self.device = torch.device(device or "cpu")
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(self.path), dtype=dtype)
        self.model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(str(self.path))
        self.max_new_tokens = int(max_new_tokens)
        self.max_image_area = max_image_area
        dtype_name = str(dtype).removeprefix("torch.")
        extra = f":{weights_id}" if weights_id else ""
        # Content identity, not the folder path: the same weights anywhere give the same id (and cache
        # keys); pass weights_id for a human-readable label such as "Qwen2.5-VL-72B-Instruct".
        self._judge_id = f"transformers:{fingerprint_folder(self.path)}:{dtype_name}{extra}"

    @classmethod
    def preflight(cls, **kwargs: object) -> None:
        path = Path(str(kwargs.get("path")))
        if not path.is_dir():
            raise FileNotFoundError(f"judge model folder not found: {path}")

    @property
    def judge_id(self) -> str:
        return self._judge_id

    @property
    def decoding(self) -> dict:
        return {
            "do_sample": False,
            "max_new_tokens": self.max_new_tokens,
            "max_image_area": self.max_image_area,
        }

    def _chat_text(self, prompt: str, n_images: int) -> str:
        content = [{"type": "text", "text": prompt}] + [{"type": "image"} for _ in range(n_images)]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        # Folders without a chat template (e.g. test models): Qwen2.5-VL's own chat format.
        vision = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{prompt}{vision}<|im_end|>\n<|im_start|>assistant\n"
        )

    def generate(self, images: Sequence[Image.Image], prompt: str) -> str:
        import torch

        imgs = [judge_rgb(im, self.max_image_area) for im in images]
        text = self._chat_text(prompt, len(imgs))
        inputs = self.processor(text=[text], images=imgs or None, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True)


class OpenAICompatibleJudge(VLMJudge):
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (a vLLM server, or a hosted API).

    Images are sent inline as base64 data URLs after the prompt text. Uses only the standard library
    (``urllib``), so no HTTP client package is required.

    Args:
        base_url: e.g. ``http://localhost:8000/v1``.
        model: the served model name; part of ``judge_id``.
        api_key_env: environment variable holding the API key (no ``Authorization`` header when unset;
            local vLLM servers usually need none). The key never appears in ids, caches or errors.
        timeout: seconds per request.
        temperature: sampling temperature (0 = greedy, for determinism).
        max_tokens: answer length limit.
        seed: request seed, for servers that honour it.
        image_format: ``"png"`` (lossless) or ``"jpeg"``.
        judge_version: extra identity for ``judge_id`` (e.g. the served checkpoint's revision), since the
            same model name can silently point at different weights over time.
        extra_body: additional request fields (recorded in ``decoding``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        seed: int | None = None,
        image_format: str = "png",
        judge_version: str | None = None,
        extra_body: Mapping | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if image_format.lower() not in ("png", "jpeg", "jpg"):
            raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.seed = seed
        self.image_format = "jpeg" if image_format.lower() == "jpg" else image_format.lower()
        self.judge_version = judge_version
        self.extra_body = dict(extra_body or {})
        host = urllib.parse.urlparse(self.url).hostname or ""
        # A loopback server must not be sent through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if host in ("localhost", "127.0.0.1", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def judge_id(self) -> str:
        return f"openai-compatible:{self.model}" + (f"@{self.judge_version}" if self.judge_version else "")

    @classmethod
    def preflight(cls, **kwargs: object) -> None:
        cls(**kwargs).check_reachable()  # building the client is free: no model is loaded

    def check_reachable(self, timeout: float = 10.0) -> None:
        """One ``GET <base_url>/models`` through the same opener (and proxy rules) as the judge calls: any HTTP
        answer, even an error status, proves a server is listening; a transport failure raises.

        Raises:
            JudgeUnreachableError: naming the endpoint and the transport error.
        """
        url = self.url.removesuffix("/chat/completions") + "/models"
        headers = {}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(url, headers=headers, method="GET")
        try:
            with self._opener.open(req, timeout=min(self.timeout, timeout)):
                pass
        except urllib.error.HTTPError:
            return  # the server answered
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise JudgeUnreachableError(
                f"judge endpoint {self.url} is unreachable ({reason}): start the server or fix "
                "judge.backend.base_url"
            ) from err

    @property
    def decoding(self) -> dict:
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "image_format": self.image_format,
            **self.extra_body,
        }

    def _data_url(self, img: Image.Image) -> str:
        buf = io.BytesIO()
        judge_rgb(img, None).save(buf, format=self.image_format.upper())
        return f"data:image/{self.image_format};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"

    def payload(self, images: Sequence[Image.Image], prompt: str) -> dict:
        """The request body for one item."""
        content: list[dict] = [{"type": "text", "text": prompt}]
        content += [{"type": "image_url", "image_url": {"url": self._data_url(im)}} for im in images]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        body.update(self.extra_body)
        return body

    def generate(self, images: Sequence[Image.Image], prompt: str) -> str:
        reply, raw = self.post(self.payload(images, prompt))
        try:
            message = reply["choices"][0]["message"]
            content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            snippet = raw[:200].decode("utf-8", "replace")
            raise JudgeError(f"malformed chat-completion reply from {self.url}: {snippet!r}") from err
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            finish = reply["choices"][0].get("finish_reason")
            raise JudgeError(f"reply from {self.url} has no text content (finish_reason={finish!r})")
        return content

    def post(self, body: Mapping) -> tuple[object, bytes]:
        """POST one request body; returns the decoded JSON reply and its raw bytes (for error snippets).

        Raises:
            JudgeError: HTTP/transport failure (retryable for 5xx, 408/409/429, timeouts) or a reply
                that is not JSON.
        """
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace")
            retryable = err.code >= 500 or err.code in (408, 409, 429)
            raise JudgeError(f"HTTP {err.code} from {self.url}: {detail}", retryable=retryable) from err
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            raise JudgeError(f"request to {self.url} failed: {err}", retryable=True) from err
        try:
            return json.loads(raw), raw
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            snippet = raw[:200].decode("utf-8", "replace")
            raise JudgeError(f"malformed chat-completion reply from {self.url}: {snippet!r}") from err
