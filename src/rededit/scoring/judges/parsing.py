"""Robust score parsing for VLM-judge responses (report §4.2, §5.2).

Real judges answer in many shapes: ``"Score: 4"``, ``"I would rate this 4/5"``, markdown
(``"**Prompt Compliance**: 4"``), JSON (bare, inside a `````json`` fence, with trailing commas or single
quotes), Chinese (``"评分：4分"``), refusals (``"I cannot evaluate…"``) or plain garbage. This module
turns any of them into a :class:`ParseResult` and NEVER invents a number: a response that does not
contain every requested score is a failure (``ok=False``, ``scores=None``) with an error saying why,
so the caller can count it as a failure instead of a 0 (the judge-drift trap in docs/architecture.md).

Out-of-range scores are rejected by default; with ``out_of_range="clamp"`` they are clamped and the
clamp is reported in ``ParseResult.warnings`` (never silently). A fraction whose denominator does not
match the scale (``"8/10"`` on a 1–5 scale) is rejected rather than rescaled.
"""

from __future__ import annotations

import ast
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ParseResult", "normalize_key", "parse_scores"]

SINGLE_KEY = "score"

_NUM = r"(?P<num>[-+]?\d+(?:\.\d+)?)"
_DEN = r"(?:\s*(?:/|out\s+of|of)\s*(?P<den>\d+(?:\.\d+)?))?"
# Between a label and its number: markdown emphasis, a parenthesised scale ("(1-5)"), a separator.
# A line break is allowed only after an explicit ":"/"=", so an echoed rubric line ("Prompt Compliance"
# followed by "1  Nothing added…") is never read as a score.
_GAP = (
    r"[ \t*_`]*(?:\([^()\n]{0,20}\))?[ \t*_`]*"
    r"(?:(?:[:=]|\bis\b|\bwas\b)[\s*_`]*|[-–—][ \t*_`]*|\bof\b[ \t]*)?"
)
_SCORE_LABEL = r"(?<![A-Za-z])(?:(?:final|overall|total)\s+)?(?:score|rating|grade)s?(?![A-Za-z])|评分|得分|分数|打分|总分|最终得分|分值"
_REFUSAL = re.compile(
    r"\b(?:i\s*(?:can\s*not|cannot|can't|can’t|am\s+(?:not\s+able|unable)|'m\s+(?:not\s+able|unable)|’m\s+unable)"
    r"\s+(?:seem\s+to\s+|to\s+)?(?:evaluate|assess|rate|score|grade|judge|help|assist|provide|comply|see|view|access|"
    r"process|analy[sz]e|open|determine))"
    r"|\bas an ai\b|\bi(?:'m| am) sorry,? but\b"
    r"|无法(?:评估|评价|打分|评分|判断|查看|看到|处理|提供)|不能(?:评估|评价|打分|评分)|抱歉",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParseResult:
    """Outcome of parsing one judge response.

    Attributes:
        scores: ``{dimension: score}`` for every requested dimension (``{"score": x}`` when none were
            named), or ``None`` when parsing failed. Never a placeholder 0.
        ok: whether every requested score was found and valid.
        error: why parsing failed (``None`` when ``ok``).
        warnings: non-fatal notes, e.g. a clamped out-of-range score.
    """

    scores: dict[str, float] | None
    ok: bool
    error: str | None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"scores": self.scores, "ok": self.ok, "error": self.error, "warnings": list(self.warnings)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ParseResult:
        return cls(d.get("scores"), bool(d["ok"]), d.get("error"), tuple(d.get("warnings") or ()))


def _fail(error: str) -> ParseResult:
    return ParseResult(scores=None, ok=False, error=error)


def normalize_key(name: str) -> str:
    """Canonical form of a dimension name, so ``"Physical & Detail Coherence"``,
    ``"physical_and_detail_coherence"`` and ``"PHYSICAL-DETAIL COHERENCE"`` compare equal."""
    words = re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", name).lower())
    return "".join(w for w in words if w != "and")


def _name_pattern(name: str) -> str:
    """Regex for a dimension name with flexible separators (``&``/``and``/``_``/``-``/spaces)."""
    words = [w for w in re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", name)) if w.lower() != "and"]
    if not words:
        raise ValueError(f"dimension name {name!r} has no letters or digits")
    sep = r"[\s_\-/]*(?:&|and|＆)?[\s_\-/]*"
    return sep.join(re.escape(w) for w in words)


# --- JSON ------------------------------------------------------------------------------------------


def _json_candidates(text: str) -> list[str]:
    """Fenced blocks first, then every balanced ``{...}`` object in the text (outermost first)."""
    out = [m.group(1) for m in re.finditer(r"```(?:json|JSON|js|python)?\s*(.*?)```", text, re.S)]
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                out.append(text[start : i + 1])
    return out


def _loads_lenient(blob: str) -> object | None:
    """``json.loads`` with repairs for trailing commas and single quotes; ``None`` when hopeless."""
    blob = blob.strip()
    if not blob or blob[0] not in "{[":
        return None
    no_trailing = re.sub(r",\s*([}\]])", r"\1", blob)
    for attempt in (blob, no_trailing):
        try:
            return json.loads(attempt)
        except (json.JSONDecodeError, ValueError):
            pass
    # Single-quoted "JSON" is a Python literal; literal_eval never executes code.
    py = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", no_trailing)))
    try:
        return ast.literal_eval(py)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _as_number(v: object) -> tuple[float, float | None] | None:
    """A score value from JSON: a number, a numeric string (``"4"``, ``"4/5"``, ``"4分"``) or
    ``{"score": 4}``. Returns ``(value, denominator or None)``."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v), None
    if isinstance(v, str):
        m = re.fullmatch(r"\s*\**\s*" + _NUM + _DEN + r"\s*(?:分|points?|pts)?\s*\**\s*\.?\s*", v)
        if m:
            return float(m.group("num")), float(m.group("den")) if m.group("den") else None
        return None
    if isinstance(v, Mapping):
        for k in ("score", "value", "rating"):
            if k in v:
                return _as_number(v[k])
    return None


def _flatten(obj: object) -> dict[str, object]:
    """Nested dicts flattened one key per leaf (the innermost key wins, ``{"scores": {"a": 1}}`` → a)."""
    out: dict[str, object] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, Mapping) and _as_number(v) is None:
                out.update(_flatten(v))
            else:
                out[str(k)] = v
    return out


def _from_json(obj: object, dimensions: Sequence[str], aliases: Mapping[str, Sequence[str]]):
    """``{dim: (value, den)}`` found in a parsed JSON object (possibly incomplete)."""
    found: dict[str, tuple[float, float | None]] = {}
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    flat = _flatten(obj)
    by_key = {normalize_key(k): v for k, v in flat.items()}
    if dimensions:
        for dim in dimensions:
            for name in (dim, *aliases.get(dim, ())):
                v = by_key.get(normalize_key(name))
                num = _as_number(v) if v is not None else None
                if num is not None:
                    found[dim] = num
                    break
        # VIEScore-style {"score": [a, b], "reasoning": …}: scores listed in the order asked for.
        if len(found) < len(dimensions):
            for k in ("score", "scores"):
                v = by_key.get(k)
                if isinstance(v, list) and len(v) == len(dimensions):
                    nums = [_as_number(x) for x in v]
                    if all(n is not None for n in nums):
                        return dict(zip(dimensions, nums))
    else:
        for k in ("score", "finalscore", "overallscore", "rating", "overall", "总分", "评分", "得分", "分数"):
            num = _as_number(by_key.get(k)) if k in by_key else None
            if num is not None:
                return {SINGLE_KEY: num}
        # One score-like key (e.g. {"overall_rating": 4}); an unrelated number such as
        # {"confidence": 0.9} is never taken for the score.
        numeric = {k: _as_number(v) for k, v in by_key.items() if re.search("score|rating|分", k)}
        numeric = {k: n for k, n in numeric.items() if n is not None}
        if len(numeric) == 1:
            return {SINGLE_KEY: next(iter(numeric.values()))}
    return found


# --- free text -------------------------------------------------------------------------------------


def _last_match(pattern: str, text: str) -> tuple[float, float | None] | None:
    # The last occurrence wins: models restate a score in their reasoning before the final answer
    # ("…so Prompt Compliance could be 3, but… Prompt Compliance: 4").
    last = None
    for m in re.finditer(pattern, text, re.IGNORECASE):
        last = m
    if last is None:
        return None
    return float(last.group("num")), float(last.group("den")) if last.group("den") else None


def _label_pattern(name: str) -> str:
    pat = _name_pattern(name)
    # Word boundaries only around Latin names: Chinese has no spaces between words.
    return rf"(?<![^\W_]){pat}(?![^\W_])" if name[:1].isascii() else pat


def _from_text_dims(text: str, dimensions: Sequence[str], aliases: Mapping[str, Sequence[str]]):
    """``{dim: (value, den)}`` for the labelled scores in free text (the last occurrence of each wins).

    All names go into one alternation, longest first, scanned left to right: "Text Visual Quality: 2"
    is consumed whole, so a dimension "Visual Quality" cannot also match inside it.
    """
    names = sorted(
        ((n, i) for i, d in enumerate(dimensions) for n in (d, *aliases.get(d, ()))),
        key=lambda x: -len(x[0]),
    )
    alts = "|".join(f"(?P<dim{j}>{_label_pattern(n)})" for j, (n, _) in enumerate(names))
    pattern = rf"(?:{alts})" + _GAP + _NUM + r"(?![\d.]*[ \t]*[-–~][ \t]*\d)" + _DEN
    found: dict[str, tuple[float, float | None]] = {}
    for m in re.finditer(pattern, text, re.IGNORECASE):
        j = next(int(k[3:]) for k, v in m.groupdict().items() if k.startswith("dim") and v is not None)
        # Later occurrences overwrite earlier ones: models restate a score in their reasoning before
        # the final answer ("…Prompt Compliance could be 3, but… Prompt Compliance: 4").
        found[dimensions[names[j][1]]] = (
            float(m.group("num")),
            float(m.group("den")) if m.group("den") else None,
        )
    return found


def _from_text_single(text: str) -> tuple[float, float | None] | str | None:
    """One overall score from free text, or an error string when it is ambiguous."""
    labelled = rf"(?:{_SCORE_LABEL})" + _GAP + _NUM + r"(?![\d.]*[ \t]*[-–~][ \t]*\d)" + _DEN
    hit = _last_match(labelled, text)
    if hit is not None:
        return hit
    rated = r"\brat(?:e|ed|ing)\b[^\d\n]{0,40}?" + _NUM + r"(?:\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?))"
    hit = _last_match(rated, text)
    if hit is not None:
        return hit
    rated_bare = r"\b(?:i\s+would\s+|i'd\s+)?(?:rate|give|score)\b[^\d\n]{0,30}?" + _NUM + _DEN
    hit = _last_match(rated_bare, text)
    if hit is not None:
        return hit
    fractions = {
        (float(m.group("num")), float(m.group("den")))
        for m in re.finditer(r"(?<![\d.])" + _NUM + r"\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?)", text, re.I)
    }
    if len(fractions) == 1:
        return next(iter(fractions))
    if len(fractions) > 1:
        return f"ambiguous: several different fractions {sorted(fractions)} and no score label"
    cn = {float(m.group("num")) for m in re.finditer(_NUM + r"\s*分(?!钟|之)", text)}
    if len(cn) == 1:
        return next(iter(cn)), None
    bare = re.fullmatch(r"[\s*`\"'(\[]*" + _NUM + _DEN + r"[\s*`\"').\]]*", text)
    if bare:
        return float(bare.group("num")), float(bare.group("den")) if bare.group("den") else None
    return None


# --- validation ------------------------------------------------------------------------------------


def _check(
    found: Mapping[str, tuple[float, float | None]],
    scale: tuple[float, float] | None,
    out_of_range: str,
) -> ParseResult:
    scores: dict[str, float] = {}
    warnings: list[str] = []
    for dim, (value, den) in found.items():
        if not math.isfinite(value):
            return _fail(f"non-finite score {value} for {dim!r}")
        if scale is not None:
            lo, hi = scale
            if den is not None and den != hi:
                return _fail(
                    f"score {value:g}/{den:g} for {dim!r} is not on the requested {lo:g}–{hi:g} scale"
                )
            if not lo <= value <= hi:
                if out_of_range == "clamp":
                    clamped = min(max(value, lo), hi)
                    warnings.append(f"{dim!r}: {value:g} outside [{lo:g}, {hi:g}] clamped to {clamped:g}")
                    value = clamped
                else:
                    return _fail(f"score {value:g} for {dim!r} outside [{lo:g}, {hi:g}]")
        scores[dim] = float(value)
    return ParseResult(scores=scores, ok=True, error=None, warnings=tuple(warnings))


def parse_scores(
    text: str | None,
    dimensions: Sequence[str] | None = None,
    *,
    scale: tuple[float, float] | None = None,
    out_of_range: Literal["reject", "clamp"] = "reject",
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> ParseResult:
    """Parse the scores in one judge response.

    JSON (fenced or inline, leniently repaired) is tried first; then labelled scores in free text
    (``"Name: 4"``, ``"**Name**: 4/5"``, ``"Name (1-5) = 4"``, Chinese labels and full-width colons).
    A response matching a refusal pattern and containing no scores is reported as a refusal.

    Args:
        text: the raw response.
        dimensions: names of the scores to find (e.g. ``["Prompt Compliance", "Visual Naturalness"]``);
            ``None``/empty for one overall score returned under the key ``"score"``.
        scale: inclusive ``(low, high)`` score range; ``None`` accepts any finite number.
        out_of_range: ``"reject"`` (a failure) or ``"clamp"`` (clamped, reported in ``warnings``).
        aliases: extra names per dimension (e.g. ``{"Prompt Compliance": ["指令遵循"]}``).

    Returns:
        a :class:`ParseResult`; ``scores`` holds exactly the requested dimensions when ``ok``.
    """
    if out_of_range not in ("reject", "clamp"):
        raise ValueError(f"out_of_range must be 'reject' or 'clamp', got {out_of_range!r}")
    if scale is not None and not scale[0] < scale[1]:
        raise ValueError(f"scale must be (low, high) with low < high, got {scale}")
    if text is None or not text.strip():
        return _fail("empty response")
    dims = list(dict.fromkeys(dimensions or ()))
    aliases = aliases or {}
    # NFKC folds full-width digits/colons ("４", "：") that Chinese answers use.
    norm = unicodedata.normalize("NFKC", text)

    # A refusal is only reported when no scores parse: "I cannot see any artefacts … 5/5" is an answer.
    refusal = _REFUSAL.search(norm)
    head = norm.strip()[:120]

    found: dict[str, tuple[float, float | None]] = {}
    for blob in _json_candidates(norm):
        obj = _loads_lenient(blob)
        if obj is None:
            continue
        got = _from_json(obj, dims, aliases)
        if len(got) > len(found):
            found = got
        if (dims and len(found) == len(dims)) or (not dims and found):
            break

    if dims:
        if len(found) < len(dims):
            text_found = _from_text_dims(norm, dims, aliases)
            found = {**text_found, **found} if len(found) else text_found
        missing = [d for d in dims if d not in found]
        if missing:
            if refusal:
                return _fail(f"refusal: {head[:120]!r}")
            have = ", ".join(found) or "none"
            return _fail(f"missing scores for {missing} (found: {have})")
        return _check({d: found[d] for d in dims}, scale, out_of_range)

    if not found:
        single = _from_text_single(norm)
        if isinstance(single, str):
            return _fail(single)
        if single is None:
            return _fail(f"refusal: {head[:120]!r}" if refusal else "no score found in response")
        found = {SINGLE_KEY: single}
    return _check(found, scale, out_of_range)
