"""Stochastic Instruction Alignment (report §3.2, "Collate Shuffle & Drop").

During collation the reference images of a multi-reference sample are randomly dropped and permuted,
and every textual mention of a reference ("Picture 2", "Fig. 1", "图2", "第二张图", "the first image")
is re-indexed so that the text keeps naming the same *content* at its new *position*. A mention of a
dropped image becomes a neutral phrase ("the reference image" / "参考图"), so the text never names a
picture that is not in the input.

Conventions:

* ``new_order[j]`` is the ORIGINAL 0-based index of the reference that now sits at position ``j``;
  only kept references are listed. ``[2, 0]`` means: keep original images 3 and 1, in that order,
  drop image 2.
* Mentions in text are 1-based ("Picture 1" is position 0).
* Re-indexing is ONE pass over non-overlapping mentions that rebuilds the string, so swaps never chain
  (a naive ``replace("Picture 1", "Picture 2")`` then ``replace("Picture 2", "Picture 1")`` would).

Texts whose references cannot be rewritten mention by mention ("Images 1 and 2", "图1、2",
"the last image") are detected by :func:`is_reindexable`; :func:`sample_alignment` returns the
identity order for them rather than silently breaking the text-image correspondence.

Everything is deterministic from ``(seed, step, sample_id)`` (:func:`rededit.utils.seeding.numpy_rng`),
so every rank/worker/restart makes the same choice for the same sample at the same step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rededit.utils.logging import get_logger
from rededit.utils.seeding import numpy_rng

log = get_logger(__name__)

T = TypeVar("T")

# --- numerals -------------------------------------------------------------------------------------

_ZH_DIGITS = "零一二三四五六七八九"
_ZH_NUM_CHARS = "一二三四五六七八九十"
_EN_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


def _zh_to_int(s: str) -> int | None:
    """Chinese numeral 1..99 ("三", "十二", "二十", "九十九") to int; None if not a valid numeral."""
    if not s or any(c not in _ZH_NUM_CHARS for c in s):
        return None
    if "十" not in s:
        return _ZH_DIGITS.index(s) if len(s) == 1 else None
    tens, _, units = s.partition("十")
    if "十" in units or len(tens) > 1 or len(units) > 1:
        return None
    t = 1 if tens == "" else _ZH_DIGITS.index(tens)
    u = 0 if units == "" else _ZH_DIGITS.index(units)
    return 10 * t + u


def _int_to_zh(n: int) -> str | None:
    if not 1 <= n <= 99:
        return None
    tens, units = divmod(n, 10)
    out = ("" if tens == 1 else _ZH_DIGITS[tens]) + "十" if tens else ""
    return out + (_ZH_DIGITS[units] if units else "")


def _en_ordinal_suffix(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


# --- mention patterns -----------------------------------------------------------------------------

_SP = r"[ \t\u00a0]"
_EN_WORD = r"(?:figure|fig\.|fig|picture|pic|image|img|photo)"
_ZH_NUM = r"[一二三四五六七八九十]+"
_ZH_DIG = r"[0-9０-９]+"
# Chinese numerals after 图 often start ordinary words ("和原图一样" = "same as the original image"),
# so those continuations are excluded.
_ZH_NOT_WORD = r"(?![样下起些点般直定边侧致同切共])"

_PATTERNS: tuple[tuple[str, str, re.Pattern[str]], ...] = (
    # "Picture 2", "Fig. 3", "fig.3", "Image #1", "Pic2" (not "Image 1st", "Image 1.5", "picture 12b").
    (
        "en",
        "en",
        re.compile(
            rf"(?<![A-Za-z0-9_])(?P<pre>{_EN_WORD}{_SP}*#?{_SP}*)(?P<num>[0-9]+)(?![0-9A-Za-z_])(?!\.[0-9])",
            re.IGNORECASE,
        ),
    ),
    # "the first image", "Second picture", "the 2nd reference image".
    (
        "en_ordinal",
        "en",
        re.compile(
            rf"(?<![A-Za-z0-9_])(?P<pre>(?:the{_SP}+)?)"
            rf"(?P<num>{'|'.join(_EN_ORDINALS)}|[0-9]+(?:st|nd|rd|th))"
            rf"(?P<suf>{_SP}+(?:(?:input|reference|source){_SP}+)?(?:image|picture|photo|pic|img|figure))"
            r"(?![A-Za-z0-9_])",
            re.IGNORECASE,
        ),
    ),
    # "第2张图", "第二幅图片", "第３张参考图".
    (
        "zh_ordinal",
        "zh",
        re.compile(
            rf"(?P<pre>第)(?P<num>{_ZH_DIG}|{_ZH_NUM})"
            r"(?P<suf>[张幅个]?(?:参考|输入|原始?)?(?:图片|图像|照片|图))"
        ),
    ),
    # "图2", "图片３", "参考图1", "图三" (prefix words belong to the mention so a drop rewrites them too).
    (
        "zh",
        "zh",
        re.compile(
            rf"(?P<pre>(?:参考|输入|原始?)?(?:图片|图像|照片|图))"
            rf"(?:(?P<num>{_ZH_DIG})(?![0-9０-９])|(?P<znum>{_ZH_NUM}){_ZH_NOT_WORD})"
        ),
    ),
)

# Text shapes that name several references in one mention, or name them relative to the end; such
# texts cannot be rewritten mention by mention, so SIA leaves their samples in the original order.
_UNSUPPORTED = (
    re.compile(rf"(?<![A-Za-z0-9_])(?:figures|figs\.?|pictures|pics|images|imgs|photos){_SP}*[0-9]", re.I),
    re.compile(
        rf"(?<![A-Za-z0-9_]){_EN_WORD}{_SP}*#?{_SP}*[0-9]+{_SP}*(?:,|&|-|–|/|and|or|to|through){_SP}*[0-9]",
        re.I,
    ),
    re.compile(
        rf"(?<![A-Za-z0-9_])(?:last|final|penultimate){_SP}+(?:image|picture|photo|pic|img|figure)", re.I
    ),
    re.compile(
        rf"(?:图片|图像|照片|图|第)(?:{_ZH_DIG}|{_ZH_NUM})[张幅个]?{_SP}*[、,，和与及或到至~～\-—]{_SP}*(?:{_ZH_DIG}|{_ZH_NUM})"
    ),
    re.compile(r"最后[一1]?[张幅个]?(?:图片|图像|照片|图)"),
)


@dataclass(frozen=True)
class Mention:
    """One textual reference to an image.

    Attributes:
        start: offset of the first character of the mention in the text.
        end: offset one past its last character (``text[start:end]`` is the mention).
        index: the 1-based image number as written ("Picture 3" → 3, "第三张图" → 3).
        style: ``"en"`` ("Picture 3"), ``"en_ordinal"`` ("the third image"), ``"zh"`` ("图3"),
            ``"zh_ordinal"`` ("第3张图").
        lang: ``"en"`` or ``"zh"`` (picks the neutral phrase used when the image is dropped).
        prefix: the text before the number inside the mention ("Fig. ", "the ", "参考图", "第").
        suffix: the text after the number inside the mention (" image", "张图", "").
        numeral: how the number is written: ``"ascii"``, ``"fullwidth"``, ``"zh"`` (一二三),
            ``"en_word"`` (first), ``"en_num"`` (1st).
    """

    start: int
    end: int
    index: int
    style: str
    lang: str = "en"
    prefix: str = ""
    suffix: str = ""
    numeral: str = "ascii"
    number_text: str = field(default="", repr=False)

    def render(self, index: int) -> str:
        """The same mention (style, language, numeral kind, capitalisation) naming 1-based ``index``."""
        return self.prefix + _format_number(index, self.numeral, self.number_text) + self.suffix


def _format_number(n: int, numeral: str, original: str) -> str:
    if numeral == "fullwidth":
        return str(n).translate(_FULLWIDTH)
    if numeral == "zh":
        return _int_to_zh(n) or str(n)
    if numeral in ("en_word", "en_num"):
        word = _EN_ORDINALS[n - 1] if numeral == "en_word" and n <= len(_EN_ORDINALS) else None
        word = word or f"{n}{_en_ordinal_suffix(n)}"
        if original[:1].isupper():
            word = word.upper() if original.isupper() else word[:1].upper() + word[1:]
        return word
    return str(n)


def _parse(style: str, lang: str, m: re.Match[str]) -> Mention | None:
    groups = m.groupdict()
    num = groups.get("num") or groups.get("znum") or ""
    key = "num" if groups.get("num") else "znum"
    if style == "en_ordinal":
        low = num.lower()
        if low in _EN_ORDINALS:
            index, numeral = _EN_ORDINALS.index(low) + 1, "en_word"
        else:
            digits = low[:-2]
            if low[-2:] != _en_ordinal_suffix(int(digits)):  # "2th" is not an ordinal we rewrite
                return None
            index, numeral = int(digits), "en_num"
    elif num.isdigit():  # str.isdigit / int() accept full-width digits too
        index = int(num)
        numeral = "ascii" if num.isascii() else "fullwidth"
    else:
        parsed = _zh_to_int(num)
        if parsed is None:
            return None
        index, numeral = parsed, "zh"
    return Mention(
        start=m.start(),
        end=m.end(),
        index=index,
        style=style,
        lang=lang,
        prefix=m.string[m.start() : m.start(key)],
        suffix=m.string[m.end(key) : m.end()],
        numeral=numeral,
        number_text=num,
    )


def find_mentions(text: str) -> list[Mention]:
    """All image mentions in ``text``, sorted by position and non-overlapping.

    Recognised (case-insensitive for English, 1-based numbers):

    * EN: "Picture N", "Pic N", "Image N", "Img N", "Photo N", "Fig N", "Fig. N", "Figure N",
      "Image #N"; ordinals "the first image", "Second picture", "the 3rd reference image".
    * ZH: "图N", "图片N", "图像N", "照片N", "参考图N", "第N张图", "第N幅图片", with ASCII or full-width
      digits or Chinese numerals 一..九十九 ("图三", "第二张图").

    A number glued to more word characters is not a mention ("Image 1st", "picture 12b", "Image 1.5").
    Overlapping candidates resolve to the leftmost, then the longest.
    """
    candidates: list[Mention] = []
    for style, lang, pattern in _PATTERNS:
        for m in pattern.finditer(text):
            mention = _parse(style, lang, m)
            if mention is not None:
                candidates.append(mention)
    candidates.sort(key=lambda c: (c.start, -(c.end - c.start)))
    out: list[Mention] = []
    for c in candidates:
        if not out or c.start >= out[-1].end:
            out.append(c)
    return out


def is_reindexable(text: str) -> bool:
    """False when ``text`` names references in a way :func:`reindex` cannot rewrite one mention at a
    time: plural lists ("Images 1 and 2", "Pictures 1-3", "图1、2") or end-relative names
    ("the last image", "最后一张图")."""
    return not any(p.search(text) for p in _UNSUPPORTED)


def _sentence_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip(" \t")
    return before == "" or before[-1] in ".!?:\n"


def reindex(
    text: str,
    new_order: Sequence[int],
    *,
    num_refs: int | None = None,
    dropped_phrase_en: str = "the reference image",
    dropped_phrase_zh: str = "参考图",
) -> str:
    """Rewrite every image mention of ``text`` for the reference order ``new_order``.

    A mention of original image ``i`` (0-based; written ``i + 1``) becomes a mention of its new
    position ``new_order.index(i) + 1`` in the mention's own style and language ("Fig 3" → "Fig 1",
    "图3" → "图1", "the third image" → "the first image"). A mention of a dropped image becomes the
    neutral phrase of its language (capitalised at a sentence start in English).

    Args:
        text: the instruction (any language mix).
        new_order: ``new_order[j]`` = original 0-based index of the reference now at position ``j``;
            kept references only, no repeats.
        num_refs: the ORIGINAL number of references. When given, a mention outside ``1..num_refs`` is a
            data bug (the text names an image the sample never had): it is left unchanged and logged,
            because it cannot be attributed to any image. When None, any mention not in ``new_order``
            is treated as dropped, which guarantees the output never names a missing position.
        dropped_phrase_en: replacement for English mentions of dropped images.
        dropped_phrase_zh: replacement for Chinese mentions of dropped images.

    Returns:
        The rewritten text (a single pass over the mentions, so swaps never chain).
    """
    if len(set(new_order)) != len(new_order):
        raise ValueError(f"new_order has repeated indices: {list(new_order)}")
    if num_refs is not None and any(not 0 <= i < num_refs for i in new_order):
        raise ValueError(f"new_order {list(new_order)} indexes outside the {num_refs} original references")
    position = {orig: j for j, orig in enumerate(new_order)}
    pieces: list[str] = []
    cursor = 0
    for m in find_mentions(text):
        orig = m.index - 1
        pieces.append(text[cursor : m.start])
        cursor = m.end
        if orig in position:
            pieces.append(m.render(position[orig] + 1))
        elif num_refs is not None and not 0 <= orig < num_refs:
            log.warning("image mention %r is outside 1..%d; left unchanged", text[m.start : m.end], num_refs)
            pieces.append(text[m.start : m.end])
        elif m.lang == "zh":
            pieces.append(dropped_phrase_zh)
        else:
            phrase = dropped_phrase_en
            if text[m.start].isupper() and _sentence_start(text, m.start):
                phrase = phrase[:1].upper() + phrase[1:]
            pieces.append(phrase)
    pieces.append(text[cursor:])
    return "".join(pieces)


@dataclass
class SIAConfig:
    """Collate Shuffle & Drop settings.

    Attributes:
        permute_prob: probability that a sample's kept references are randomly permuted.
        drop_prob: independent per-reference drop probability.
        min_keep: never keep fewer references than this (nor more than the sample has). 0 lets an edit
            sample lose every reference (it becomes text-to-image).
        max_drop: at most this many references dropped per sample (None: no limit beyond ``min_keep``).
        apply_to_tasks: only samples whose ``task`` is listed are augmented (None: every task).
    """

    permute_prob: float = 0.5
    drop_prob: float = 0.1
    min_keep: int = 1
    max_drop: int | None = None
    apply_to_tasks: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("permute_prob", "drop_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SIAConfig.{name} must be in [0, 1], got {value}")
        if self.min_keep < 0:
            raise ValueError(f"SIAConfig.min_keep must be >= 0, got {self.min_keep}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError(f"SIAConfig.max_drop must be >= 0 or None, got {self.max_drop}")


def sample_alignment(
    num_refs: int,
    *,
    seed: int,
    step: int,
    sample_id: str | int,
    cfg: SIAConfig,
    task: str | None = None,
    texts: Sequence[str] = (),
) -> list[int]:
    """Draw the reference order (``new_order``) of one sample at one training step.

    The draw is a pure function of ``(seed, step, sample_id)`` and ``cfg``: the same sample at the
    same step gets the same order on every rank and worker, and a different one at another step.
    The random stream is consumed the same way whatever the outcome, so changing ``permute_prob``
    does not reshuffle which references are dropped.

    Args:
        num_refs: number of reference images of the sample.
        seed: the run seed.
        step: the global training step (or epoch-and-index; any int that changes between visits).
        sample_id: the sample's manifest id.
        cfg: probabilities and limits.
        task: the sample's task; identity when ``cfg.apply_to_tasks`` excludes it.
        texts: the text variants that will be re-indexed; identity when one of them is not
            :func:`is_reindexable`.

    Returns:
        ``new_order`` (see module docstring); ``list(range(num_refs))`` means "unchanged".
    """
    identity = list(range(num_refs))
    if num_refs == 0:
        return identity
    if cfg.apply_to_tasks is not None and task not in cfg.apply_to_tasks:
        return identity
    if not all(is_reindexable(t) for t in texts if t):
        return identity
    rng = numpy_rng(seed, step, str(sample_id), "sia")
    do_permute = rng.random() < cfg.permute_prob
    perm = [int(i) for i in rng.permutation(num_refs)]
    drop_flags = rng.random(num_refs) < cfg.drop_prob

    budget = max(0, num_refs - min(cfg.min_keep, num_refs))
    if cfg.max_drop is not None:
        budget = min(budget, cfg.max_drop)
    # When more references are flagged than the budget allows, the ones dropped are chosen in the
    # (random) order of `perm`, so no position is favoured.
    dropped = set([i for i in perm if drop_flags[i]][:budget])
    order = perm if do_permute else identity
    return [i for i in order if i not in dropped]


def permute(items: Sequence[T], new_order: Sequence[int]) -> list[T]:
    """``[items[i] for i in new_order]``: apply ``new_order`` to any per-reference list (URIs, sizes)."""
    return [items[i] for i in new_order]


def apply_alignment(
    instruction: str,
    references: Sequence[Any],
    new_order: Sequence[int],
    *,
    dropped_phrase_en: str = "the reference image",
    dropped_phrase_zh: str = "参考图",
) -> tuple[str, list[Any]]:
    """Apply ``new_order`` to a sample: re-indexed instruction and reordered/dropped references.

    Args:
        instruction: the text to rewrite.
        references: the ORIGINAL reference list (URIs, tensors, sizes: anything per reference).
        new_order: from :func:`sample_alignment`.

    Returns:
        ``(new_instruction, [references[i] for i in new_order])``.
    """
    text = reindex(
        instruction,
        new_order,
        num_refs=len(references),
        dropped_phrase_en=dropped_phrase_en,
        dropped_phrase_zh=dropped_phrase_zh,
    )
    return text, permute(references, new_order)
