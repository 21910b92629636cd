"""The OCR metric of REDEdit-Bench's text-editing evaluation (report §4.2, Table 7 "OCR" column).

§4.2: "The OCR metric quantifies character generation precision by comparing OCR results against the
ground truth to calculate the Levenshtein distance, completion rate, and word accuracy, producing a
weighted normalized score." The report names the three parts but gives neither their exact definitions
nor the weights, so this module fixes them (and records them next to every score it produces):

* **Levenshtein distance** ``d`` between the normalised predicted and target strings, in characters;
  its normalised form ``NED = d / max(|pred|, |tgt|)`` lies in [0, 1] (the ICDAR "1 − N.E.D." convention;
  eq. 5's text reward divides by ``max(|tgt|, 1)`` instead, which is unbounded for long predictions and
  lives in ``rededit.rewards``).
* **completion rate** ``CR = LCS(pred, tgt) / |tgt|`` over characters (whitespace ignored): the share of
  the requested characters that were written, in order. It is a recall: extra text does not lower it.
* **word accuracy** ``WA``: the share of target tokens reproduced exactly (bag-of-tokens match, each
  predicted token used at most once). Tokens are words for English and characters for Chinese, where
  there are no spaces to split on and a "word" is ill-defined.
* **score** ``= (w_ed · (1 − NED) + w_cr · CR + w_wa · WA) / (w_ed + w_cr + w_wa)`` in [0, 1]. The weights
  are :class:`OCRWeights` (default equal, 1 : 1 : 1, because the report states none; pass others to match
  a different protocol).

Normalisation (:func:`normalise_text`) before any comparison: Unicode NFKC (full-width forms →
ASCII, so OCR engines that emit "ＡＢＣ" or "，" are not penalised), case folding, punctuation
removed (Unicode category ``P*``: OCR engines confuse and drop it and §4.2 measures glyph spelling),
symbols such as ``$``/``%`` kept. English collapses whitespace runs to one space (a missing or extra word
break costs one edit); Chinese drops whitespace (engines insert spaces between CJK glyphs at will) and is
compared per character.

Empty strings: both empty → perfect (score 1). An empty target means "no text should be read" (e.g. a
remove-text edit): an empty prediction is perfect and any predicted text scores 0 on every part. An empty
prediction for a non-empty target scores 0 on every part.

Pure Python on purpose: the metric must be exact and runnable without the OCR extras.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Lang = Literal["en", "zh", "auto"]

SCORE_KEYS = ("edit_distance", "normalised_edit_distance", "completion_rate", "word_accuracy", "score")

# Code-point ranges treated as CJK for tokenisation and 'auto' detection: CJK Unified Ideographs and
# their extensions/compatibility blocks, CJK punctuation, kana, Hangul, half/full-width forms are
# handled by NFKC first. Anything in these scripts has no word spaces, so it is compared per character.
_CJK_RANGES = (
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3000, 0x303F),  # CJK symbols and punctuation
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x31BF),  # Bopomofo
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x3134F),  # Extensions B–G
)


def is_cjk(ch: str) -> bool:
    """Whether the single character ``ch`` belongs to a CJK script (no spaces between words)."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def detect_lang(text: str) -> Literal["en", "zh"]:
    """``"zh"`` if ``text`` contains any CJK character, else ``"en"`` (the 'auto' rule of :func:`ocr_scores`)."""
    return "zh" if any(is_cjk(ch) for ch in text) else "en"


def _resolve_lang(lang: str, *texts: str) -> Literal["en", "zh"]:
    if lang in ("en", "zh"):
        return lang  # type: ignore[return-value]
    if lang != "auto":
        raise ValueError(f"lang must be 'en', 'zh' or 'auto', got {lang!r}")
    # The target decides (it is what the tokens must match); an empty target falls back to the prediction.
    for text in texts:
        if text.strip():
            return detect_lang(text)
    return "en"


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions) between two sequences.

    Own dynamic programme in O(len a · len b) time and O(min(len a, len b)) memory (two rows), rather than a
    dependency (``python-Levenshtein``, ``rapidfuzz``): it is a dozen lines, exact by construction, and the
    metric stays importable without the OCR extras. Strings are compared per code point; any sequences of
    hashable items (e.g. token lists) work too.
    """
    if len(a) < len(b):
        a, b = b, a  # keep the row over the shorter sequence
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (two-row DP, like :func:`levenshtein`)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0] * (len(b) + 1)
        for j, cb in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def normalise_text(
    text: str, lang: Lang = "auto", *, case_sensitive: bool = False, keep_punctuation: bool = False
) -> str:
    """Normalise a string for OCR comparison (see the module docstring for why each step).

    Args:
        text: raw OCR output or target text.
        lang: ``"en"`` collapses whitespace runs to one space and strips the ends; ``"zh"`` removes all
            whitespace; ``"auto"`` picks by :func:`detect_lang`.
        case_sensitive: keep case (default: ``str.casefold``).
        keep_punctuation: keep Unicode punctuation (default: drop category ``P*``).

    Returns:
        the normalised string.
    """
    resolved = _resolve_lang(lang, text)
    out = unicodedata.normalize("NFKC", text)
    if not case_sensitive:
        out = out.casefold()
    if not keep_punctuation:
        out = "".join(ch for ch in out if not unicodedata.category(ch).startswith("P"))
    if resolved == "zh":
        return "".join(out.split())
    return " ".join(out.split())


def tokenize(normalised: str, lang: Literal["en", "zh"]) -> list[str]:
    """Tokens of an already normalised string: words for English, non-space characters for Chinese."""
    if lang == "zh":
        return [ch for ch in normalised if not ch.isspace()]
    return normalised.split()


@dataclass(frozen=True)
class OCRWeights:
    """Weights of the combined OCR score (report §4.2 names the parts, not the weights: default 1 : 1 : 1).

    Only ratios matter: the score divides by their sum.
    """

    edit: float = 1.0
    completion: float = 1.0
    word: float = 1.0

    def __post_init__(self) -> None:
        values = (self.edit, self.completion, self.word)
        if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
            raise ValueError(f"OCR weights must be finite, non-negative and not all zero, got {values}")

    @classmethod
    def coerce(cls, weights: OCRWeights | Mapping[str, float] | Sequence[float] | None) -> OCRWeights:
        """Build from ``None`` (defaults), a mapping (``{"edit": 2, ...}``, e.g. from Hydra) or a 3-sequence."""
        if weights is None:
            return cls()
        if isinstance(weights, cls):
            return weights
        if isinstance(weights, Mapping):
            unknown = set(weights) - {"edit", "completion", "word"}
            if unknown:
                raise ValueError(f"unknown OCR weight keys {sorted(unknown)}; use edit, completion, word")
            return cls(**{k: float(v) for k, v in weights.items()})
        values = [float(v) for v in weights]
        if len(values) != 3:
            raise ValueError(f"OCR weights need 3 values (edit, completion, word), got {len(values)}")
        return cls(*values)


@dataclass(frozen=True)
class OCRScores:
    """Per-sample OCR metric (report §4.2). ``score`` and the rates are in [0, 1], higher is better.

    Attributes:
        edit_distance: Levenshtein distance in characters between the normalised strings.
        normalised_edit_distance: ``edit_distance / max(|pred|, |tgt|)`` (0 when both are empty).
        completion_rate: ``LCS / |tgt|`` over non-space characters.
        word_accuracy: share of target tokens (EN words, CN characters) found in the prediction.
        score: weighted mean of ``1 − NED``, completion rate and word accuracy.
        lang: the language the sample was scored as (``"en"`` or ``"zh"``).
    """

    edit_distance: int
    normalised_edit_distance: float
    completion_rate: float
    word_accuracy: float
    score: float
    lang: str = "en"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ocr_scores(
    predicted: str,
    target: str,
    lang: Lang = "auto",
    *,
    weights: OCRWeights | Mapping[str, float] | Sequence[float] | None = None,
    case_sensitive: bool = False,
    keep_punctuation: bool = False,
) -> OCRScores:
    """Score OCR'd text against the target text (report §4.2; definitions in the module docstring).

    Args:
        predicted: text read from the edited image (e.g. :meth:`rededit.scoring.ocr.OCRBackend.read_text`).
        target: the text the edit should have produced.
        lang: ``"en"`` (word tokens), ``"zh"`` (character tokens) or ``"auto"`` (``"zh"`` when the target,
            or the prediction if the target is empty, contains CJK characters).
        weights: :class:`OCRWeights` of the combined score (default equal).
        case_sensitive: see :func:`normalise_text`.
        keep_punctuation: see :func:`normalise_text`.

    Returns:
        :class:`OCRScores`.
    """
    resolved = _resolve_lang(lang, target, predicted)
    w = OCRWeights.coerce(weights)
    kw = {"case_sensitive": case_sensitive, "keep_punctuation": keep_punctuation}
    pred = normalise_text(predicted, resolved, **kw)
    tgt = normalise_text(target, resolved, **kw)

    dist = levenshtein(pred, tgt)
    denom = max(len(pred), len(tgt))
    ned = dist / denom if denom else 0.0

    pred_chars = [ch for ch in pred if not ch.isspace()]
    tgt_chars = [ch for ch in tgt if not ch.isspace()]
    pred_tokens = tokenize(pred, resolved)
    tgt_tokens = tokenize(tgt, resolved)
    if not tgt_chars:
        # Nothing should be read: reading nothing is complete and exact, reading anything is a failure.
        completion = word_acc = 1.0 if not pred_chars else 0.0
    else:
        completion = lcs_length(pred_chars, tgt_chars) / len(tgt_chars)
        matched = sum((Counter(pred_tokens) & Counter(tgt_tokens)).values())
        word_acc = matched / len(tgt_tokens)

    score = (w.edit * (1.0 - ned) + w.completion * completion + w.word * word_acc) / (
        w.edit + w.completion + w.word
    )
    return OCRScores(
        edit_distance=dist,
        normalised_edit_distance=ned,
        completion_rate=completion,
        word_accuracy=word_acc,
        score=score,
        lang=resolved,
    )


def _row(item: OCRScores | Mapping[str, Any]) -> Mapping[str, Any]:
    return item.as_dict() if isinstance(item, OCRScores) else item


def _means(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for key in SCORE_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        out[key] = sum(values) / len(values) if values else None
    return out


def aggregate_ocr(items: Iterable[OCRScores | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean of every OCR metric per language and overall (Table 7 reports the overall mean ``score``).

    Args:
        items: :class:`OCRScores` or their :meth:`~OCRScores.as_dict` rows (e.g. reloaded from a resumable
            evaluation's JSONL); a row without ``lang`` counts as ``"en"``.

    Returns:
        ``{"overall": {...}, "en": {...}, "zh": {...}}`` where each value holds ``n`` and the mean of each
        key in :data:`SCORE_KEYS` (``None`` when a group is empty). Languages without samples are omitted,
        except ``overall``, which is always present.
    """
    rows = [_row(item) for item in items]
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[str(r.get("lang") or "en")].append(r)
    result = {"overall": _means(rows)}
    for lang in sorted(groups):
        result[lang] = _means(groups[lang])
    return result
