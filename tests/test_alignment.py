"""Stochastic Instruction Alignment: mention parsing, single-pass re-indexing, deterministic draws."""

from __future__ import annotations

import numpy as np
import pytest

from rededit.data.alignment import (
    SIAConfig,
    apply_alignment,
    find_mentions,
    is_reindexable,
    reindex,
    sample_alignment,
)


def _spans(text: str) -> list[tuple[str, int, str]]:
    return [(text[m.start : m.end], m.index, m.style) for m in find_mentions(text)]


def test_find_mentions_en_styles():
    text = (
        "Picture 1, image 2, Fig 3, Fig. 4, fig.5, Figure 6, Pic 7, Img 8, Photo 9, Image #10 and picture 12."
    )
    assert [(s, i) for s, i, _ in _spans(text)] == [
        ("Picture 1", 1),
        ("image 2", 2),
        ("Fig 3", 3),
        ("Fig. 4", 4),
        ("fig.5", 5),
        ("Figure 6", 6),
        ("Pic 7", 7),
        ("Img 8", 8),
        ("Photo 9", 9),
        ("Image #10", 10),
        ("picture 12", 12),
    ]


def test_find_mentions_rejects_non_mentions():
    # ordinals glued to letters, decimals, words containing the keyword, letters after the number
    for text in ("Image 1.5 times larger", "picture 12b", "an epicture 2", "Images 2", "imagery 3", "Fig 2x"):
        assert find_mentions(text) == [], text


def test_find_mentions_zh_styles():
    text = "把图1的猫放进图片２，参考第三张图和第2幅图片，参考图4，图十二，照片3。"
    assert _spans(text) == [
        ("图1", 1, "zh"),
        ("图片２", 2, "zh"),
        ("第三张图", 3, "zh_ordinal"),
        ("第2幅图片", 2, "zh_ordinal"),
        ("参考图4", 4, "zh"),
        ("图十二", 12, "zh"),
        ("照片3", 3, "zh"),
    ]
    # "原图一样" = "same as the original image": 一 starts a word, not a numeral
    assert find_mentions("和原图一样亮") == []


def test_find_mentions_en_ordinals():
    text = "Put the first image's hat on the Second picture and the 3rd reference image."
    assert [(s, i) for s, i, _ in _spans(text)] == [
        ("the first image", 1),
        ("the Second picture", 2),
        ("the 3rd reference image", 3),
    ]


def test_swap_has_no_chained_replacement():
    text = "Put the hat from Picture 1 on the person in Picture 2."
    assert reindex(text, [1, 0]) == "Put the hat from Picture 2 on the person in Picture 1."
    # three-cycle: a chained str.replace would collapse everything onto one index
    assert reindex("Fig 1, Fig 2, Fig 3", [2, 0, 1]) == "Fig 2, Fig 3, Fig 1"


def test_reindex_keeps_style_and_language():
    assert reindex("Fig 3 then fig.1 and Image #2", [2, 1, 0]) == "Fig 1 then fig.3 and Image #2"
    assert (
        reindex("the first image and the Third picture", [2, 1, 0]) == "the third image and the First picture"
    )
    assert (
        reindex("把图3的帽子给图片１里的人，参考第一张图", [2, 1, 0])
        == "把图1的帽子给图片３里的人，参考第三张图"
    )
    assert reindex("图三和图一", [2, 1, 0]) == "图一和图三"


def test_reindex_punctuation_adjacent():
    assert reindex("Picture 2's hat goes on (Picture 1).", [1, 0]) == "Picture 1's hat goes on (Picture 2)."
    assert reindex("把帽子(图2)戴到「图1」上", [1, 0]) == "把帽子(图1)戴到「图2」上"
    assert reindex("Picture 1:blue;Picture 2!", [1, 0]) == "Picture 2:blue;Picture 1!"


def test_reindex_drops_become_neutral_phrases():
    # keep original images 3 and 1 (0-based 2 and 0), drop image 2
    out = reindex(
        "Take the cat of Picture 2 and put it in Picture 3. Picture 1 is the style.", [2, 0], num_refs=3
    )
    assert out == "Take the cat of the reference image and put it in Picture 1. Picture 2 is the style."
    assert reindex("Picture 2 shows a cat.", [0], num_refs=2) == "The reference image shows a cat."
    assert reindex("把图2的猫放进图1", [0], num_refs=2) == "把参考图的猫放进图1"
    assert reindex("参考图2和第二张图", [0], num_refs=2) == "参考图和参考图"


def test_reindex_out_of_range_left_unchanged_when_count_known():
    # index 5 of a 2-reference sample is a data bug: left as is (and logged), not attributed
    assert reindex("Picture 5 and Picture 1", [1, 0], num_refs=2) == "Picture 5 and Picture 2"
    # without the count, anything not kept is treated as dropped (never names a missing position)
    assert reindex("Picture 5 and Picture 1", [1, 0]) == "The reference image and Picture 2"


def test_reindex_rejects_bad_orders():
    with pytest.raises(ValueError, match="repeated"):
        reindex("Picture 1", [0, 0])
    with pytest.raises(ValueError, match="outside"):
        reindex("Picture 1", [3], num_refs=2)


_EN_FORMS = ("Picture {}", "picture {}", "Image {}", "Fig {}", "Fig. {}", "Figure {}", "Pic {}", "image #{}")
_ZH_FORMS = ("图{}", "图片{}", "第{}张图", "参考图{}")
_FILLER = (
    "put the hat from",
    ", then",
    " (",
    ") and",
    "'s color onto",
    " 把",
    "的猫放进",
    "，",
    ".",
    " with ",
)


def _random_text(rng: np.random.Generator, n: int) -> tuple[str, list[int]]:
    """Random instruction mentioning random 1-based indices in 1..n; returns (text, indices in order)."""
    parts, indices = [], []
    for _ in range(rng.integers(1, 7)):
        idx = int(rng.integers(1, n + 1))
        forms = _EN_FORMS if rng.random() < 0.6 else _ZH_FORMS
        parts.append(str(rng.choice(_FILLER)))
        parts.append(forms[int(rng.integers(len(forms)))].format(idx))
        indices.append(idx)
    parts.append(str(rng.choice(_FILLER)))
    return " ".join(parts), indices


def test_reindex_property_identity_preserved_and_no_missing_reference():
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.integers(1, 6))
        text, indices = _random_text(rng, n)
        keep = int(rng.integers(1, n + 1))
        new_order = [int(i) for i in rng.permutation(n)[:keep]]
        out = reindex(text, new_order, num_refs=n)
        before = find_mentions(text)
        after = find_mentions(out)
        assert [m.index for m in before] == indices
        # dropped mentions disappear; the others map one to one, in text order
        kept = [i for i in indices if i - 1 in new_order]
        assert len(after) == len(kept), (text, new_order, out)
        for m, orig in zip(after, kept):
            assert 1 <= m.index <= len(new_order)  # never names a missing image
            assert new_order[m.index - 1] == orig - 1  # still names the same content
        if keep == n and new_order == list(range(n)):
            assert out == text


def test_is_reindexable():
    assert is_reindexable("Put Picture 1 into Picture 2")
    assert is_reindexable("把图1放进图2")
    for text in (
        "Combine Images 1 and 2",
        "Picture 1 and 2 are cats",
        "Fig 1-3",
        "图1、2合并",
        "use the last image",
        "用最后一张图",
    ):
        assert not is_reindexable(text), text


def test_sample_alignment_deterministic_and_varies():
    cfg = SIAConfig(permute_prob=0.5, drop_prob=0.3)
    a = [sample_alignment(4, seed=1, step=s, sample_id="x", cfg=cfg) for s in range(50)]
    b = [sample_alignment(4, seed=1, step=s, sample_id="x", cfg=cfg) for s in range(50)]
    assert a == b
    assert len({tuple(o) for o in a}) > 5
    assert a != [sample_alignment(4, seed=2, step=s, sample_id="x", cfg=cfg) for s in range(50)]
    assert a != [sample_alignment(4, seed=1, step=s, sample_id="y", cfg=cfg) for s in range(50)]
    for o in a:
        assert len(set(o)) == len(o) and all(0 <= i < 4 for i in o)


def test_sample_alignment_min_keep_and_max_drop():
    always_drop = SIAConfig(permute_prob=1.0, drop_prob=1.0, min_keep=2)
    for s in range(100):
        o = sample_alignment(5, seed=0, step=s, sample_id="r", cfg=always_drop)
        assert len(o) == 2
    # which survive is random, not always the first positions
    kept = {
        tuple(sorted(sample_alignment(5, seed=0, step=s, sample_id="r", cfg=always_drop))) for s in range(100)
    }
    assert len(kept) > 3
    capped = SIAConfig(permute_prob=0.0, drop_prob=1.0, min_keep=0, max_drop=1)
    assert all(len(sample_alignment(3, seed=0, step=s, sample_id="r", cfg=capped)) == 2 for s in range(20))
    assert sample_alignment(1, seed=0, step=0, sample_id="r", cfg=SIAConfig(drop_prob=1.0)) == [0]


def test_sample_alignment_identity_cases():
    cfg = SIAConfig(permute_prob=1.0, drop_prob=0.0)
    assert all(sample_alignment(1, seed=0, step=s, sample_id="a", cfg=cfg) == [0] for s in range(20))
    assert sample_alignment(0, seed=0, step=0, sample_id="a", cfg=cfg) == []
    never = SIAConfig(permute_prob=0.0, drop_prob=0.0)
    assert all(
        sample_alignment(4, seed=0, step=s, sample_id="a", cfg=never) == [0, 1, 2, 3] for s in range(20)
    )
    only_multi = SIAConfig(permute_prob=1.0, drop_prob=0.5, apply_to_tasks=["multi_ref"])
    assert all(
        sample_alignment(3, seed=0, step=s, sample_id="a", cfg=only_multi, task="edit") == [0, 1, 2]
        for s in range(20)
    )
    assert any(
        sample_alignment(3, seed=0, step=s, sample_id="a", cfg=only_multi, task="multi_ref") != [0, 1, 2]
        for s in range(20)
    )
    # a text naming several images in one mention cannot be rewritten: keep the order
    assert all(
        sample_alignment(3, seed=0, step=s, sample_id="a", cfg=cfg, texts=["merge Images 1 and 3"])
        == [0, 1, 2]
        for s in range(20)
    )


def test_sia_config_validation():
    with pytest.raises(ValueError):
        SIAConfig(permute_prob=1.5)
    with pytest.raises(ValueError):
        SIAConfig(min_keep=-1)


def test_apply_alignment():
    text, refs = apply_alignment("Put Picture 1 in Picture 3; ignore Picture 2", ["a", "b", "c"], [2, 0])
    assert refs == ["c", "a"]
    assert text == "Put Picture 2 in Picture 1; ignore the reference image"
