"""VLM-judge score parsing on real-world-shaped responses, and judge prompt templates (report §4.2, §5.2)."""

from __future__ import annotations

import json

import pytest

from rededit.scoring.judges.parsing import normalize_key, parse_scores
from rededit.scoring.judges.prompts import (
    BUILTIN_PROMPT_SETS,
    CANONICAL_DIMENSIONS,
    JudgeTemplate,
    PromptSet,
    builtin_prompt_set,
    gedit_prompt_set,
    load_rededit_prompts,
)

DIMS = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Coherence")
CN = {
    "Prompt Compliance": ["指令遵循"],
    "Visual Naturalness": ["视觉自然度"],
    "Physical & Detail Coherence": ["物理与细节一致性"],
}
S5, S10 = (1.0, 5.0), (0.0, 10.0)

# (id, response, dimensions, kwargs, expected scores or None, substring of the error)
CASES = [
    ("plain_score", "Score: 4", None, {"scale": S5}, {"score": 4.0}, None),
    (
        "rate_fraction",
        "The cat was added cleanly. I would rate this 4/5.",
        None,
        {"scale": S5},
        {"score": 4.0},
        None,
    ),
    ("out_of_ten", "I'd rate this edit 8 out of 10.", None, {"scale": S10}, {"score": 8.0}, None),
    ("bare_number", " 3.\n", None, {"scale": S5}, {"score": 3.0}, None),
    ("decimal_score", "Overall score: **7.5**", None, {"scale": S10}, {"score": 7.5}, None),
    (
        "format_lines",
        "Brief reasoning: ladybug added on the leaf, slightly large.\nPrompt Compliance: 4\n"
        "Visual Naturalness: 3\nPhysical & Detail Coherence: 3",
        DIMS,
        {"scale": S5},
        {"Prompt Compliance": 4.0, "Visual Naturalness": 3.0, "Physical & Detail Coherence": 3.0},
        None,
    ),
    (
        "markdown",
        "### Evaluation\n**Prompt Compliance**: 4\n**Visual Naturalness:** 5\n"
        "- **Physical & Detail Coherence** — 4/5",
        DIMS,
        {"scale": S5},
        {"Prompt Compliance": 4.0, "Visual Naturalness": 5.0, "Physical & Detail Coherence": 4.0},
        None,
    ),
    (
        "parenthesised_scale",
        "Prompt Compliance (1-5): 4\nVisual Naturalness (1-5): 4\nPhysical & Detail Coherence (1-5): 5",
        DIMS,
        {"scale": S5},
        {"Prompt Compliance": 4.0, "Visual Naturalness": 4.0, "Physical & Detail Coherence": 5.0},
        None,
    ),
    (
        "json_snake_keys",
        '{"prompt_compliance": 5, "visual_naturalness": 4, "physical_and_detail_coherence": 4, "reason": "ok"}',
        DIMS,
        {"scale": S5},
        {"Prompt Compliance": 5.0, "Visual Naturalness": 4.0, "Physical & Detail Coherence": 4.0},
        None,
    ),
    (
        "fenced_json_trailing_comma",
        'Here is my assessment:\n```json\n{\n  "Prompt Compliance": 3,\n  "Visual Naturalness": 2,\n'
        '  "Physical & Detail Coherence": 2,\n}\n```\nLet me know if you need more.',
        DIMS,
        {"scale": S5},
        {"Prompt Compliance": 3.0, "Visual Naturalness": 2.0, "Physical & Detail Coherence": 2.0},
        None,
    ),
    (
        "single_quoted_json_string_values",
        "{'Prompt Compliance': '4', 'Visual Naturalness': 4, 'Physical & Detail Coherence': '3/5'}",
        DIMS,
        {"scale": S5},
        {"Prompt Compliance": 4.0, "Visual Naturalness": 4.0, "Physical & Detail Coherence": 3.0},
        None,
    ),
    (
        "nested_json",
        '{"scores": {"Prompt Compliance": {"score": 5, "why": "exact"}, "Visual Naturalness": 4, '
        '"Physical & Detail Coherence": 4}}',
        DIMS,
        {"scale": S5},
        {"Prompt Compliance": 5.0, "Visual Naturalness": 4.0, "Physical & Detail Coherence": 4.0},
        None,
    ),
    (
        "viescore_list",
        '{"score": [7, 9], "reasoning": "The hat was added; nothing else changed."}',
        ("Editing Success", "Over-editing"),
        {"scale": S10},
        {"Editing Success": 7.0, "Over-editing": 9.0},
        None,
    ),
    (
        "restated_last_wins",
        "Prompt Compliance: 3 at first sight, but the count is right, so\nPrompt Compliance: 4\n"
        "Visual Naturalness: 4\nPhysical & Detail Coherence: 3",
        DIMS,
        {"scale": S5},
        {"Prompt Compliance": 4.0, "Visual Naturalness": 4.0, "Physical & Detail Coherence": 3.0},
        None,
    ),
    (
        "suffix_names",
        "Visual Quality: 4\nText Visual Quality: 2",
        ("Text Visual Quality", "Visual Quality"),
        {"scale": S5},
        {"Text Visual Quality": 2.0, "Visual Quality": 4.0},
        None,
    ),
    (
        "json_single_key",
        'Result: {"overall_rating": "4/5", "comment": "ok"}',
        None,
        {"scale": S5},
        {"score": 4.0},
        None,
    ),
    ("unrelated_json_number", 'Score: 4\n{"confidence": 0.9}', None, {"scale": S5}, {"score": 4.0}, None),
    (
        "chinese_single",
        "理由：猫添加得很自然，光影一致。\n评分：4分",
        None,
        {"scale": S5},
        {"score": 4.0},
        None,
    ),
    ("chinese_inline", "我给这次编辑打4分。", None, {"scale": S5}, {"score": 4.0}, None),
    (
        "chinese_dims_fullwidth",
        "理由：背景替换自然。\n指令遵循：４\n视觉自然度：3\n物理与细节一致性：3",
        DIMS,
        {"scale": S5, "aliases": CN},
        {"Prompt Compliance": 4.0, "Visual Naturalness": 3.0, "Physical & Detail Coherence": 3.0},
        None,
    ),
    (
        "refusal_cannot_see",
        "I can't seem to see any images attached; could you upload them again?",
        None,
        {"scale": S5},
        None,
        "refusal",
    ),
    (
        "refusal_with_dims",
        "I'm sorry, but I cannot evaluate images of real people.",
        DIMS,
        {"scale": S5},
        None,
        "refusal",
    ),
    ("refusal_chinese", "抱歉，我无法评估这张图片。", None, {"scale": S5}, None, "refusal"),
    (
        "not_a_refusal",
        "I cannot see any artefacts at all. Score: 5",
        None,
        {"scale": S5},
        {"score": 5.0},
        None,
    ),
    ("no_score", "The edit looks fine overall, nicely done.", None, {"scale": S5}, None, "no score"),
    ("empty", "   \n", None, {"scale": S5}, None, "empty"),
    ("garbage_tokens", "ĠĠ ĊĊ <|im_end|> ãģ®", DIMS, {"scale": S5}, None, "missing"),
    (
        "missing_dimension",
        "Prompt Compliance: 4\nVisual Naturalness: 4",
        DIMS,
        {"scale": S5},
        None,
        "Physical & Detail Coherence",
    ),
    (
        "echoed_rubric_only",
        "Prompt Compliance\n1  Nothing added or the added content is corrupt.\n2  Wrong class.\n"
        "Visual Naturalness\n1  Broken.\nPhysical & Detail Coherence\n1  Floating.",
        DIMS,
        {"scale": S5},
        None,
        "missing",
    ),
    (
        "echoed_format_only",
        "Prompt Compliance: A number from 1 to 5.\nVisual Naturalness: A number from 1 to 5.\n"
        "Physical & Detail Coherence: A number from 1 to 5.",
        DIMS,
        {"scale": S5},
        None,
        "missing",
    ),
    (
        "hedged_range",
        "Prompt Compliance: 4-5\nVisual Naturalness: 4\nPhysical & Detail Coherence: 4",
        DIMS,
        {"scale": S5},
        None,
        "missing",
    ),
    ("ambiguous_fractions", "Adherence 3/5, quality 4/5.", None, {"scale": S5}, None, "ambiguous"),
    ("only_overall_for_dims", "Score: 4", DIMS, {"scale": S5}, None, "missing"),
    (
        "out_of_range_reject",
        "Prompt Compliance: 7\nVisual Naturalness: 4\nPhysical & Detail Coherence: 4",
        DIMS,
        {"scale": S5},
        None,
        "outside",
    ),
    (
        "out_of_range_clamp",
        "Prompt Compliance: 7\nVisual Naturalness: 0\nPhysical & Detail Coherence: 4",
        DIMS,
        {"scale": S5, "out_of_range": "clamp"},
        {"Prompt Compliance": 5.0, "Visual Naturalness": 1.0, "Physical & Detail Coherence": 4.0},
        None,
    ),
    ("wrong_denominator", "Score: 8/10", None, {"scale": S5}, None, "not on the requested"),
    ("negative", "Score: -1", None, {"scale": S10}, None, "outside"),
    ("nan_json", '{"score": NaN}', None, {"scale": S10}, None, "non-finite"),
]


@pytest.mark.parametrize(
    ("text", "dims", "kwargs", "expected", "err"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_parse_table(text, dims, kwargs, expected, err):
    res = parse_scores(text, dims, **kwargs)
    if expected is None:
        assert not res.ok and res.scores is None, res
        assert err.lower() in res.error.lower(), res.error
    else:
        assert res.ok and res.error is None, res
        assert res.scores == expected
        assert all(isinstance(v, float) for v in res.scores.values())


def test_table_is_large_enough():
    assert len(CASES) >= 15
    assert sum(c[4] is None for c in CASES) >= 8  # failures are well represented


def test_clamp_is_reported_not_silent():
    res = parse_scores("Score: 12", scale=S10, out_of_range="clamp")
    assert res.ok and res.scores == {"score": 10.0}
    assert len(res.warnings) == 1 and "12" in res.warnings[0] and "clamped" in res.warnings[0]
    assert parse_scores("Score: 9", scale=S10).warnings == ()


def test_failure_never_zero():
    for text in ("", "I cannot evaluate this.", "no idea", "Score: 9", "Prompt Compliance: 4"):
        res = parse_scores(text, DIMS, scale=S5)
        assert not res.ok and res.scores is None and res.error


def test_parse_options_validated():
    with pytest.raises(ValueError):
        parse_scores("Score: 3", out_of_range="zero")
    with pytest.raises(ValueError):
        parse_scores("Score: 3", scale=(5, 1))


def test_normalize_key():
    assert normalize_key("Physical & Detail Coherence") == normalize_key("physical_and_detail_coherence")
    assert normalize_key("PHYSICAL-DETAIL coherence") == normalize_key("Physical & Detail Coherence")
    assert normalize_key("Visual Quality") != normalize_key("Text Visual Quality")


def test_parse_result_roundtrip():
    res = parse_scores("Score: 12", scale=S10, out_of_range="clamp")
    assert type(res).from_dict(json.loads(json.dumps(res.to_dict()))) == res


# --- prompt templates -------------------------------------------------------------------------------

_FORMAT = (
    "\nExample Response Format:\nBrief reasoning: one short sentence.\n{lines}"
    "editing instruction is : <edit_prompt>.\n\n{tail}\n"
)


def _bench_prompt(title: str, dims: tuple[str, ...], tail: str) -> str:
    """A judge prompt in the REDEdit-Bench prompts.json shape, with our own (short) rubric text."""
    body = f"\nYou grade {title} edits. Rate each aspect from 1 to 5.\n\n"
    body += "".join(f"{d}\n1  bad.\n5  perfect.\n\n" for d in dims)
    lines = "".join(f"{d}: A number from 1 to 5.\n" for d in dims)
    return body + _FORMAT.format(lines=lines, tail=tail)


@pytest.fixture
def bench_folder(tmp_path):
    prompts = {
        "add": _bench_prompt("addition", DIMS, "Below are the images before and after editing:"),
        "background": _bench_prompt(
            "background",
            ("Instruction Compliance", "Visual Seamlessness", "Physical Consistency"),
            "Below are the images before and after editing:",
        ),
        "extract": _bench_prompt(
            "extraction",
            ("Object Identity", "Mask Precision", "Visual Quality"),
            "Below is the extracted object image:",
        ),
        "stylize": _bench_prompt(
            "style",
            ("Style Fidelity", "Content Preservation", "Rendering Quality"),
            "Below are the input, reference style, and styled output image:",
        ),
        "lowlevel": _bench_prompt("restoration", DIMS, "Below are the images before and after editing:"),
    }
    (tmp_path / "prompts.json").write_text(
        json.dumps(prompts, ensure_ascii=False, indent=4), encoding="utf-8"
    )
    return tmp_path


def test_load_rededit_prompts(bench_folder):
    ps = load_rededit_prompts(bench_folder)
    assert ps.tasks == ["add", "background", "extract", "lowlevel", "stylize"]
    bg = ps.template("BG")  # category spelling from the report's figure
    assert bg.dimensions == ("Instruction Compliance", "Visual Seamlessness", "Physical Consistency")
    assert bg.keys == CANONICAL_DIMENSIONS and bg.scale == (1.0, 5.0)
    assert ps.template("Low-level") is ps.template("lowlevel")
    # The official scorer sends source + result for every task, whatever a prompt's last line says
    # (stylize speaks of a style reference, extract of the extracted object alone).
    for task in ("extract", "stylize", "add"):
        assert ps.template(task).image_roles == ("source", "edited")
    with pytest.raises(KeyError, match="portrait"):
        ps.template("portrait")
    # the file path works as well as the folder
    assert load_rededit_prompts(bench_folder / "prompts.json").set_hash == ps.set_hash


def test_render_and_parse_with_template(bench_folder):
    t = load_rededit_prompts(bench_folder).template("background")
    p = t.render("把背景换成海滩")
    assert "editing instruction is : 把背景换成海滩." in p and "<edit_prompt>" not in p
    res = t.parse(
        "Brief reasoning: fine.\nInstruction Compliance: 5\nVisual Seamlessness: 4\nPhysical Consistency: 4"
    )
    assert res.ok and res.scores == dict(zip(CANONICAL_DIMENSIONS, (5.0, 4.0, 4.0)))
    assert not t.parse("Instruction Compliance: 5").ok
    with pytest.raises(ValueError, match="empty"):
        t.render("  ")
    with pytest.raises(ValueError, match="target"):
        t.render("add a sign", target="HELLO")


def test_template_hash_tracks_wording(bench_folder):
    ps = load_rededit_prompts(bench_folder)
    h = ps.template_hash("add")
    assert len(h) == 64 and h == load_rededit_prompts(bench_folder).template_hash("add")
    assert h != ps.template_hash("lowlevel")  # different text, same dimensions
    data = json.loads((bench_folder / "prompts.json").read_text())
    data["add"] = data["add"].replace("You grade", "You assess")
    (bench_folder / "prompts.json").write_text(json.dumps(data))
    ps2 = load_rededit_prompts(bench_folder)
    assert ps2.template_hash("add") != h and ps2.template_hash("background") == ps.template_hash("background")
    assert ps2.set_hash != ps.set_hash
    # line endings and trailing whitespace are not part of the canonical text
    t = ps.template("add")
    t_crlf = JudgeTemplate(t.text.replace("\n", "\r\n") + "  ", t.dimensions, t.keys, t.scale, t.image_roles)
    assert t_crlf.template_hash == t.template_hash
    assert JudgeTemplate(t.text, t.dimensions, t.keys, (0.0, 10.0), t.image_roles).template_hash != h


def test_load_rededit_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_rededit_prompts(tmp_path)
    (tmp_path / "prompts.json").write_text(json.dumps({"add": "Rate the edit <edit_prompt> from 1 to 5."}))
    with pytest.raises(ValueError, match="dimensions="):
        load_rededit_prompts(tmp_path)
    ps = load_rededit_prompts(tmp_path, dimensions=["Score"], scale=(1, 5))
    assert ps.template("add").keys == ("score",)
    (tmp_path / "prompts.json").write_text(json.dumps({"add": "Prompt Compliance: A number from 1 to 5."}))
    with pytest.raises(ValueError, match="placeholder"):
        load_rededit_prompts(tmp_path)
    (tmp_path / "prompts.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_rededit_prompts(tmp_path)


def test_builtin_prompt_sets():
    g = gedit_prompt_set()
    sc, pq = g.template("sc"), g.template("pq")
    assert sc.scale == pq.scale == (0.0, 10.0) and sc.keys == ("G_SC",) and pq.keys == ("G_PQ",)
    assert sc.image_roles == ("source", "edited") and pq.image_roles == ("edited",)
    assert sc.origin.startswith("builtin:ours/")
    assert sc.parse("Reason: hat added.\nSemantic Consistency: 8").scores == {"G_SC": 8.0}
    assert not sc.parse("Reason: x.\nSemantic Consistency: an integer from 0 to 10").ok
    img = builtin_prompt_set("imgedit")
    assert img.template("anything").scale == (1.0, 5.0) and len(img.template("add").keys) == 3
    assert img.template("add").parse("Instruction Adherence: <1-5>\nEdit Quality: <1-5>").ok is False
    text = builtin_prompt_set("rededit_text").template("text")
    assert text.keys == ("success_edit", "over_edit", "style", "consistency")
    generic = builtin_prompt_set("rededit_generic").template("Motion")
    assert generic.keys == CANONICAL_DIMENSIONS
    assert generic.parse("指令遵循：5\n视觉自然度：4\n物理与细节一致性：4").ok  # Chinese aliases
    # A text-to-image row has no Picture 1: its template asks for the one generated image (it used to be a
    # judge failure on every t2i item of the synthetic bench, "item has no ['source'] image").
    t2i = builtin_prompt_set("rededit_generic").template("t2i")
    assert t2i.image_roles == ("edited",) and t2i.keys == CANONICAL_DIMENSIONS and "one image" in t2i.text
    hashes = {builtin_prompt_set(n).set_hash for n in BUILTIN_PROMPT_SETS}
    assert len(hashes) == len(BUILTIN_PROMPT_SETS)
    with pytest.raises(KeyError):
        builtin_prompt_set("nope")
    d = g.describe()
    assert d["templates"]["sc"]["template_hash"] == sc.template_hash and d["set_hash"] == g.set_hash


def test_prompt_set_validation():
    t = builtin_prompt_set("imgedit").template("x")
    with pytest.raises(ValueError, match="collide"):
        PromptSet({"Low-level": t, "lowlevel": t}, name="x")
    with pytest.raises(ValueError):
        JudgeTemplate("no marker", ("A",), ("a",), (1, 5))
    with pytest.raises(ValueError):
        JudgeTemplate("<edit_prompt>", ("A", "B"), ("a",), (1, 5))
