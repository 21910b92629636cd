"""The OCR metric of report §4.2 against hand-computed cases (EN and CN, empty strings, weights, aggregation)."""

from __future__ import annotations

import itertools
import random

import pytest

from rededit.scoring.ocr_metric import (
    OCRScores,
    OCRWeights,
    aggregate_ocr,
    detect_lang,
    lcs_length,
    levenshtein,
    normalise_text,
    ocr_scores,
)


def _check(s: OCRScores, d: int, ned: float, cr: float, wa: float, lang: str = "en") -> None:
    assert s.edit_distance == d
    assert s.normalised_edit_distance == pytest.approx(ned)
    assert s.completion_rate == pytest.approx(cr)
    assert s.word_accuracy == pytest.approx(wa)
    assert s.score == pytest.approx(((1 - ned) + cr + wa) / 3)  # default weights 1:1:1
    assert s.lang == lang


# --- Levenshtein / LCS -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("欢迎光临", "欢迎光", 1),
        (["hello", "world"], ["hello", "big", "world"], 1),
    ],
)
def test_levenshtein_known_values(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def _lev_reference(a: str, b: str) -> int:
    """Full-matrix textbook recursion, independent of the two-row implementation."""
    m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        m[i][0] = i
    for j in range(len(b) + 1):
        m[0][j] = j
    for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
        m[i][j] = min(m[i - 1][j] + 1, m[i][j - 1] + 1, m[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return m[-1][-1]


def test_levenshtein_matches_full_matrix_on_random_strings():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        assert levenshtein(a, b) == _lev_reference(a, b), (a, b)


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length("", "abc") == 0
    assert lcs_length("abc", "abc") == 3
    assert lcs_length("acb", "abc") == 2  # order matters


# --- normalisation -------------------------------------------------------------------------------------


def test_normalise_text_en():
    assert normalise_text("  HELLO,   World!\n", "en") == "hello world"
    assert normalise_text("ＨＥＬＬＯ", "en") == "hello"  # full-width forms (NFKC)
    assert normalise_text("don't", "en") == "dont"
    assert normalise_text("$5 off", "en") == "$5 off"  # symbols are kept, only punctuation goes
    assert normalise_text("Hello, World", "en", case_sensitive=True) == "Hello World"
    assert normalise_text("Hello, World", "en", keep_punctuation=True) == "hello, world"


def test_normalise_text_zh_drops_whitespace_and_punctuation():
    assert normalise_text("欢 迎 光临。", "zh") == "欢迎光临"
    assert normalise_text("欢迎，光临！", "auto") == "欢迎光临"  # full-width CJK punctuation


# --- per-sample scores ---------------------------------------------------------------------------------


def test_identical_strings_are_perfect():
    s = ocr_scores("Hello World", "Hello World")
    _check(s, 0, 0.0, 1.0, 1.0)
    assert s.score == 1.0


def test_one_substitution():
    # "hallo world" vs "hello world": 1 edit over 11 chars; LCS of "halloworld"/"helloworld" = 9 of 10;
    # one of the two words exact.
    _check(ocr_scores("hallo world", "hello world", "en"), 1, 1 / 11, 9 / 10, 1 / 2)


def test_insertion_and_deletion():
    # insertion: the whole target is there (completion 1) but the word is not exact
    _check(ocr_scores("helloo", "hello", "en"), 1, 1 / 6, 1.0, 0.0)
    # deletion: one of five characters missing
    _check(ocr_scores("helo", "hello", "en"), 1, 1 / 5, 4 / 5, 0.0)


def test_case_and_punctuation_are_normalised():
    _check(ocr_scores("HELLO, WORLD!", "hello world", "en"), 0, 0.0, 1.0, 1.0)
    _check(ocr_scores("hello\n  world", "hello world", "en"), 0, 0.0, 1.0, 1.0)
    s = ocr_scores("HELLO", "hello", "en", case_sensitive=True)
    _check(s, 5, 1.0, 0.0, 0.0)
    s = ocr_scores("hello, world", "hello world", "en", keep_punctuation=True)
    # "hello, world" (12) vs "hello world" (11): one deletion; the token "hello," ≠ "hello"
    _check(s, 1, 1 / 12, 10 / 10, 1 / 2)


def test_en_missing_word():
    # target "hello big world" (15 chars), prediction "hello world": delete "big " → 4 edits;
    # LCS "helloworld" = 10 of 13 non-space target characters; 2 of 3 words.
    _check(ocr_scores("hello world", "hello big world", "en"), 4, 4 / 15, 10 / 13, 2 / 3)


def test_en_word_accuracy_counts_repeated_words_once_each():
    # target has "la" twice, prediction once: 1 of the 2 "la" matched + "land" → 2 of 3
    s = ocr_scores("la land", "la la land", "en")
    assert s.word_accuracy == pytest.approx(2 / 3)
    # word accuracy is order-free, completion is not
    s = ocr_scores("world hello", "hello world", "en")
    assert s.word_accuracy == 1.0
    assert s.completion_rate == pytest.approx(5 / 10)


def test_cn_per_character():
    # 欢迎光临 → 欢迎光: one missing character of four, compared per character
    _check(ocr_scores("欢迎光", "欢迎光临"), 1, 1 / 4, 3 / 4, 3 / 4, lang="zh")
    assert ocr_scores("欢迎光", "欢迎光临").score == pytest.approx(0.75)
    _check(ocr_scores("欢 迎 光 临。", "欢迎光临"), 0, 0.0, 1.0, 1.0, lang="zh")
    _check(ocr_scores("欢迎光顾", "欢迎光临", "zh"), 1, 1 / 4, 3 / 4, 3 / 4, lang="zh")
    # forcing English tokenisation treats the run as one word: no partial word credit
    assert ocr_scores("欢迎光", "欢迎光临", "en").word_accuracy == 0.0


def test_both_empty_is_perfect():
    _check(ocr_scores("", ""), 0, 0.0, 1.0, 1.0)
    _check(ocr_scores("  ", "!?"), 0, 0.0, 1.0, 1.0)  # empty after normalisation
    assert ocr_scores("", "").score == 1.0


def test_empty_prediction_scores_zero():
    _check(ocr_scores("", "hello"), 5, 1.0, 0.0, 0.0)
    assert ocr_scores("", "hello").score == 0.0
    _check(ocr_scores("", "欢迎"), 2, 1.0, 0.0, 0.0, lang="zh")


def test_empty_target_with_text_scores_zero():
    # an empty target means "no text should be read" (e.g. remove the text): any reading fails
    _check(ocr_scores("hello", ""), 5, 1.0, 0.0, 0.0)
    assert ocr_scores("hello", "").score == 0.0


def test_auto_language_detection():
    assert detect_lang("hello") == "en"
    assert detect_lang("欢迎") == "zh"
    assert detect_lang("Hello 世界") == "zh"
    assert detect_lang("こんにちは") == "zh"  # kana: no word spaces either, compared per character
    assert ocr_scores("hello", "hello").lang == "en"
    assert ocr_scores("", "欢迎").lang == "zh"
    assert ocr_scores("欢迎", "").lang == "zh"  # empty target: the prediction decides
    assert ocr_scores("欢迎", "hello", "en").lang == "en"
    with pytest.raises(ValueError, match="lang"):
        ocr_scores("a", "a", "fr")


def test_score_is_monotone_in_errors():
    target = "the quick brown fox"
    positions = [i for i, ch in enumerate(target) if ch != " "]
    scores = []
    for k in range(len(positions) + 1):
        chars = list(target)
        for i in positions[:k]:
            chars[i] = "0"  # not in the target (punctuation such as '#' would be normalised away)
        scores.append(ocr_scores("".join(chars), target, "en").score)
    assert scores[0] == 1.0
    assert all(b < a for a, b in itertools.pairwise(scores)), scores
    # dropping words one by one also lowers the score each time
    words = target.split()
    dropped = [ocr_scores(" ".join(words[k:]), target, "en").score for k in range(len(words) + 1)]
    assert all(b < a for a, b in itertools.pairwise(dropped)), dropped
    assert dropped[-1] == 0.0


# --- weights -------------------------------------------------------------------------------------------


def test_weights():
    base = ocr_scores("hallo world", "hello world", "en")
    only_ed = ocr_scores("hallo world", "hello world", "en", weights=OCRWeights(1, 0, 0))
    assert only_ed.score == pytest.approx(1 - 1 / 11)
    weighted = ocr_scores("hallo world", "hello world", "en", weights={"edit": 2, "completion": 1, "word": 1})
    assert weighted.score == pytest.approx((2 * (1 - 1 / 11) + 0.9 + 0.5) / 4)
    assert ocr_scores("hallo world", "hello world", "en", weights=[1, 1, 1]).score == pytest.approx(
        base.score
    )
    with pytest.raises(ValueError, match="non-negative"):
        OCRWeights(0, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        OCRWeights(-1, 1, 1)
    with pytest.raises(ValueError, match="unknown OCR weight"):
        OCRWeights.coerce({"levenshtein": 1})
    with pytest.raises(ValueError, match="3 values"):
        OCRWeights.coerce([1, 1])


# --- aggregation ---------------------------------------------------------------------------------------


def test_aggregate_per_language_and_overall():
    rows = [
        ocr_scores("hello world", "hello world"),  # en, 1.0
        ocr_scores("", "hello"),  # en, 0.0
        ocr_scores("欢迎光", "欢迎光临"),  # zh, 0.75
    ]
    agg = aggregate_ocr(rows)
    assert set(agg) == {"overall", "en", "zh"}
    assert agg["overall"]["n"] == 3
    assert agg["en"]["n"] == 2
    assert agg["zh"]["n"] == 1
    assert agg["en"]["score"] == pytest.approx(0.5)
    assert agg["zh"]["score"] == pytest.approx(0.75)
    assert agg["overall"]["score"] == pytest.approx(1.75 / 3)
    assert agg["overall"]["edit_distance"] == pytest.approx((0 + 5 + 1) / 3)
    # rows reloaded as dicts aggregate the same
    assert aggregate_ocr([r.as_dict() for r in rows]) == agg


def test_aggregate_empty():
    agg = aggregate_ocr([])
    assert agg == {
        "overall": {
            "n": 0,
            "edit_distance": None,
            "normalised_edit_distance": None,
            "completion_rate": None,
            "word_accuracy": None,
            "score": None,
        }
    }
