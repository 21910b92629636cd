"""Task-specific VLM-judge prompt templates (report §4, Table 2 "Task-Specific Evaluation Prompts"; §4.2; §5.2).

Two sources of templates:

* A user's REDEdit-Bench folder: ``prompts.json`` maps each of the 15 tasks to one judge prompt that
  scores three dimensions on 1–5 (Prompt Compliance, Visual Naturalness, Physical & Detail Coherence,
  named per task) and contains the ``<edit_prompt>`` placeholder. :func:`load_rededit_prompts` reads it;
  the dimension names and scale are taken from each prompt's "Example Response Format" lines, so the
  parser asks for exactly what the prompt asked for. The file is the user's; nothing of it ships here.
  The benchmark's own scorer sends the judge two images for every task, the source and the result, even
  where a prompt's last line speaks of a style reference (``stylize``) or of the extracted object alone
  (``extract``); the public release has no reference images. Every template loaded from such a file
  therefore asks for ``("source", "edited")`` (:data:`REDEDIT_BENCH_IMAGE_ROLES`), so our scores follow
  the official protocol.
* Built-in templates for the public GEdit (G_SC, G_PQ on 0–10, G_O = sqrt(G_SC·G_PQ)) and ImgEdit (1–5)
  protocols, the §4.2 text-editing judge (SuccessEdit, OverEdit, Style, Consistency) and a generic
  REDEdit-style judge. Their wording is OUR OWN, written for this project: they follow those
  protocols' scales and criteria but are not the benchmarks' official prompts, so scores from them are
  comparable with each other, not with published numbers (record the template hash with every score).

Every template has a :attr:`JudgeTemplate.template_hash`, recorded with each judge response and in
``metrics.json``: a changed word in a prompt changes the hash, so scores from different prompts are
never silently averaged together (the judge-drift trap in docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rededit.scoring.judges.parsing import ParseResult, normalize_key, parse_scores

__all__ = [
    "BUILTIN_PROMPT_SETS",
    "CANONICAL_DIMENSIONS",
    "REDEDIT_BENCH_IMAGE_ROLES",
    "JudgeTemplate",
    "PromptSet",
    "builtin_prompt_set",
    "gedit_prompt_set",
    "imgedit_prompt_set",
    "load_rededit_prompts",
    "rededit_generic_prompt_set",
    "rededit_text_prompt_set",
]

PLACEHOLDER = "<edit_prompt>"
# Report §4.2: REDEdit-Bench's three axes. Task prompts name them differently ("Instruction Compliance",
# "Visual Seamlessness", …) and a few tasks grade task-specific aspects in the same slots (extract:
# identity, mask precision, quality), always instruction first. Three-score prompts are stored under
# these keys by position so per-task tables line up; ``JudgeTemplate.dimensions`` keeps the task's names.
CANONICAL_DIMENSIONS = ("prompt_compliance", "visual_naturalness", "physical_detail_coherence")
# Category spellings (report §4 Fig. 9, our configs) → prompts.json task keys.
_TASK_ALIASES = {"bg": "background", "colour": "color", "style": "stylize", "lowlevelediting": "lowlevel"}
# REDEdit-Bench's official scorer: source + result for every task (the public release has no reference).
REDEDIT_BENCH_IMAGE_ROLES = ("source", "edited")


def _snake(name: str) -> str:
    words = [w for w in re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", name).lower()) if w != "and"]
    return "_".join(words)


def _task_key(task: str) -> str:
    key = normalize_key(task)
    return _TASK_ALIASES.get(key, key)


@dataclass(frozen=True)
class JudgeTemplate:
    """One judge prompt and how to read its answer.

    Attributes:
        text: the prompt with ``placeholder`` where the editing instruction goes.
        dimensions: the score names as the prompt asks for them (what the parser looks for).
        keys: the names the scores are stored under (same order/length as ``dimensions``).
        scale: inclusive ``(low, high)`` range of every score.
        image_roles: the images the prompt expects after the text, in order
            (``"source"``, ``"reference"``, ``"edited"``).
        placeholder: the instruction marker in ``text``.
        origin: where the text comes from (``"builtin:ours/…"`` or the user's file), for the record.
        aliases: extra names per dimension accepted by the parser (e.g. Chinese labels).
    """

    text: str
    dimensions: tuple[str, ...]
    keys: tuple[str, ...]
    scale: tuple[float, float]
    image_roles: tuple[str, ...] = ("source", "edited")
    placeholder: str = PLACEHOLDER
    origin: str = "builtin"
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    def __post_init__(self):
        if self.placeholder not in self.text:
            raise ValueError(f"judge template ({self.origin}) has no {self.placeholder!r} placeholder")
        if not self.dimensions or len(self.dimensions) != len(self.keys):
            raise ValueError(
                f"need ≥1 dimension and one key per dimension, got {self.dimensions} / {self.keys}"
            )
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"duplicate score keys {self.keys}")
        if not self.scale[0] < self.scale[1]:
            raise ValueError(f"scale must be (low, high) with low < high, got {self.scale}")
        if not self.image_roles:
            raise ValueError("a judge template needs at least one image role")

    @property
    def canonical_text(self) -> str:
        """The text as hashed: NFC-normalised, ``\\n`` line ends, no surrounding whitespace."""
        return unicodedata.normalize("NFC", self.text.replace("\r\n", "\n")).strip()

    @property
    def template_hash(self) -> str:
        """sha256 over the canonical text and everything that decides how the answer is read
        (dimensions, keys, scale, image roles); recorded with every score."""
        payload = {
            "text": self.canonical_text,
            "dimensions": list(self.dimensions),
            "keys": list(self.keys),
            "scale": [float(self.scale[0]), float(self.scale[1])],
            "image_roles": list(self.image_roles),
            "placeholder": self.placeholder,
            "aliases": [[d, list(a)] for d, a in self.aliases],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def render(self, instruction: str, **fields: str) -> str:
        """The prompt for one item: ``instruction`` in place of the placeholder, ``<name>`` markers
        replaced by ``fields``."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"empty editing instruction for judge template ({self.origin})")
        out = self.text.replace(self.placeholder, instruction.strip())
        for name, value in fields.items():
            marker = f"<{name}>"
            if marker not in out:
                raise ValueError(f"template ({self.origin}) has no {marker} marker for field {name!r}")
            out = out.replace(marker, str(value))
        return out

    def parse(self, text: str | None, out_of_range: Literal["reject", "clamp"] = "reject") -> ParseResult:
        """Parse a response to this template; scores come back under :attr:`keys`."""
        res = parse_scores(
            text, self.dimensions, scale=self.scale, out_of_range=out_of_range, aliases=dict(self.aliases)
        )
        if not res.ok or res.scores is None:
            return res
        renamed = {k: res.scores[d] for d, k in zip(self.dimensions, self.keys)}
        return ParseResult(scores=renamed, ok=True, error=None, warnings=res.warnings)

    def describe(self) -> dict:
        """JSON-able summary for ``metrics.json``."""
        return {
            "template_hash": self.template_hash,
            "origin": self.origin,
            "dimensions": list(self.dimensions),
            "keys": list(self.keys),
            "scale": list(self.scale),
            "image_roles": list(self.image_roles),
        }


class PromptSet:
    """Judge templates per task, looked up case/spelling-insensitively (``"Low-level"`` → ``lowlevel``,
    ``"BG"`` → ``background``); ``default`` serves tasks without their own template.

    Args:
        templates: ``{task: template}``.
        name: the set's name (recorded with scores).
        default: template for any other task, or ``None`` to raise on unknown tasks.
    """

    def __init__(
        self, templates: Mapping[str, JudgeTemplate], name: str, default: JudgeTemplate | None = None
    ):
        if not templates and default is None:
            raise ValueError(f"prompt set {name!r} has no templates")
        self.name = name
        self.templates = {_task_key(k): v for k, v in templates.items()}
        if len(self.templates) != len(templates):
            raise ValueError(
                f"prompt set {name!r}: task names collide after normalisation: {list(templates)}"
            )
        self.default = default

    @property
    def tasks(self) -> list[str]:
        return sorted(self.templates)

    def template(self, task: str) -> JudgeTemplate:
        t = self.templates.get(_task_key(task))
        if t is not None:
            return t
        if self.default is not None:
            return self.default
        raise KeyError(f"prompt set {self.name!r} has no template for task {task!r}; tasks: {self.tasks}")

    def render(self, task: str, instruction: str, **fields: str) -> str:
        return self.template(task).render(instruction, **fields)

    def template_hash(self, task: str) -> str:
        return self.template(task).template_hash

    @property
    def set_hash(self) -> str:
        """sha256 over every task's template hash (and the default's)."""
        items = sorted((k, v.template_hash) for k, v in self.templates.items())
        if self.default is not None:
            items.append(("*", self.default.template_hash))
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()

    def describe(self) -> dict:
        """JSON-able record of the set (name, set hash, every template's hash/dimensions/scale)."""
        out = {"name": self.name, "set_hash": self.set_hash, "templates": {}}
        for k, v in sorted(self.templates.items()):
            out["templates"][k] = v.describe()
        if self.default is not None:
            out["templates"]["*"] = self.default.describe()
        return out


# --- REDEdit-Bench prompts.json --------------------------------------------------------------------

_FORMAT_LINE = re.compile(
    r"^[ \t]*(?P<name>[^\n:：]{1,80}?)[ \t]*[:：][ \t]*A number from (?P<lo>\d+(?:\.\d+)?) to (?P<hi>\d+(?:\.\d+)?)",
    re.MULTILINE | re.IGNORECASE,
)


def _rededit_template(
    task: str, text: str, origin: str, dimensions, scale, image_roles: tuple[str, ...]
) -> JudgeTemplate:
    found = [
        (m.group("name").strip(), float(m.group("lo")), float(m.group("hi")))
        for m in _FORMAT_LINE.finditer(text)
    ]
    if found:
        dims = tuple(dict.fromkeys(n for n, _, _ in found))
        scales = {(lo, hi) for _, lo, hi in found}
        if len(scales) != 1:
            raise ValueError(f"{origin} task {task!r}: dimensions use different scales {sorted(scales)}")
        tscale = scales.pop()
    elif dimensions:
        dims, tscale = tuple(dimensions), tuple(scale)
    else:
        raise ValueError(
            f"{origin} task {task!r}: no 'Name: A number from L to H' lines in the prompt's response format; "
            "pass dimensions=[...] (and scale=) to load_rededit_prompts for custom prompts"
        )
    keys = CANONICAL_DIMENSIONS if len(dims) == len(CANONICAL_DIMENSIONS) else tuple(_snake(d) for d in dims)
    return JudgeTemplate(
        text=text,
        dimensions=dims,
        keys=tuple(keys),
        scale=tscale,
        image_roles=tuple(image_roles),
        origin=origin,
    )


def load_rededit_prompts(
    path: str | Path,
    *,
    dimensions: Sequence[str] | None = None,
    scale: tuple[float, float] = (1.0, 5.0),
    name: str = "rededit",
    image_roles: Sequence[str] = REDEDIT_BENCH_IMAGE_ROLES,
) -> PromptSet:
    """Load a REDEdit-Bench ``prompts.json`` (``{task: prompt with <edit_prompt>}``) into a :class:`PromptSet`.

    Args:
        path: the ``prompts.json`` file or the benchmark folder holding it.
        dimensions: fallback score names for prompts whose response format lists none.
        scale: the scale of those fallback dimensions.
        name: the set's name.
        image_roles: the images every template is sent with; the official protocol's source + result by
            default, whatever a prompt's wording says (module docstring).

    Returns:
        one template per task; three-dimension prompts are stored under :data:`CANONICAL_DIMENSIONS`.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "prompts.json"
    if not p.is_file():
        raise FileNotFoundError(f"REDEdit-Bench judge prompts not found: {p} (expected prompts.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{p} must be a JSON object {{task: prompt}}, got {type(data).__name__}")
    templates = {}
    for task, text in data.items():
        if not isinstance(text, str):
            raise ValueError(f"{p} task {task!r}: prompt must be a string, got {type(text).__name__}")
        templates[task] = _rededit_template(
            task, text, f"{p.name}:{task}", dimensions, scale, tuple(image_roles)
        )
    return PromptSet(templates, name=name)


# --- built-in templates (our wording) ---------------------------------------------------------------

_OURS = "builtin:ours/"

# GEdit protocol (report §5.2, Table 4): semantic consistency judged on (source, edited), perceptual
# quality on the edited image alone, both 0–10; G_O = sqrt(G_SC · G_PQ) per item.
_GEDIT_SC = """You are checking whether an image edit did what was asked.
You will see two images: first the original, then the edited result. The requested edit was:
"<edit_prompt>"

Judge SEMANTIC CONSISTENCY on a 0-10 scale, considering two things and scoring the weaker of the two:
(a) success - is the requested change present and correct in the edited image?
(b) restraint - was everything the request did not mention left as it was?
0 means the edit failed completely or the image was changed beyond recognition; 10 means the request
was carried out exactly and nothing else changed.

Answer in this format:
Reason: one short sentence.
Semantic Consistency: an integer from 0 to 10
"""

_GEDIT_PQ = """You are checking the visual quality of an AI-edited image (the edit request was: "<edit_prompt>";
ignore whether it was followed). You will see the edited image.

Judge PERCEPTUAL QUALITY on a 0-10 scale, considering two things and scoring the weaker of the two:
(a) naturalness - do lighting, shadows, perspective and proportions look physically plausible?
(b) cleanliness - is it free of artefacts such as blur, smears, seams, distorted parts or noise?
0 means badly broken; 10 means indistinguishable from a flawless photograph or artwork.

Answer in this format:
Reason: one short sentence.
Perceptual Quality: an integer from 0 to 10
"""

# ImgEdit protocol (report §5.2, Table 3): three 1–5 ratings of the edit; the reported number is their mean.
_IMGEDIT = """You are grading the result of an instruction-based image edit.
You will see two images: first the original, then the edited result. The instruction was:
"<edit_prompt>"

Give three ratings, each an integer from 1 (worst) to 5 (best):
Instruction Adherence - does the edit do what the instruction asks (right object, attribute, amount)?
Edit Quality - does the edited content look natural and well blended, without artefacts?
Detail Preservation - are the parts of the image the instruction did not mention unchanged?
A rating for Edit Quality or Detail Preservation should not exceed Instruction Adherence when the
instruction was not carried out.

Answer in this format:
Reason: one short sentence.
Instruction Adherence: <1-5>
Edit Quality: <1-5>
Detail Preservation: <1-5>
"""

# Report §4.2 text-editing VLM Judge: SuccessEdit, OverEdit, Style, Consistency (background fusion).
_TEXT_JUDGE = """You are grading an edit that changes the text shown in an image.
You will see two images: first the original, then the edited result. The instruction was:
"<edit_prompt>"

Give four ratings, each an integer from 1 (worst) to 5 (best):
SuccessEdit - is the requested text present with the right content, spelling and placement?
OverEdit - were other text and other regions left alone (5 = nothing else changed)?
Style - do font, size, colour and perspective of the new text match the surrounding design?
Consistency - does the new text blend into its background without patches, halos or smudges?

Answer in this format:
Reason: one short sentence.
SuccessEdit: <1-5>
OverEdit: <1-5>
Style: <1-5>
Consistency: <1-5>
"""

# The answer format shared by the REDEdit-style templates below (the parser reads these three lines).
_REDEDIT_ANSWER = """The second and third ratings should not be higher than the first.

Answer in this format:
Reason: one short sentence.
Prompt Compliance: <1-5>
Visual Naturalness: <1-5>
Physical & Detail Coherence: <1-5>
"""

# A REDEdit-style judge for benchmarks without their own prompts (e.g. the synthetic bench).
_REDEDIT_GENERIC = (
    """You are grading an instruction-based image edit.
You will see two images: first the original, then the edited result. The instruction was:
"<edit_prompt>"

Rate three aspects, each an integer from 1 (worst) to 5 (best):
Prompt Compliance - is the requested change made completely and correctly, and nothing else requested missed?
Visual Naturalness - does the edited region blend with the rest of the image (style, lighting, colour, edges)?
Physical & Detail Coherence - are geometry, contact, shadows and fine details plausible, and is everything
the instruction did not mention preserved?
"""
    + _REDEDIT_ANSWER
)

# Text-to-image rows of a mixed bench (no Picture 1): the same three ratings on the one generated image.
_REDEDIT_GENERIC_T2I = (
    """You are grading an image generated from a text description.
You will see one image. The description was:
"<edit_prompt>"

Rate three aspects, each an integer from 1 (worst) to 5 (best):
Prompt Compliance - does the image show everything the description asks for, and nothing that contradicts it?
Visual Naturalness - is the image coherent as a whole (style, lighting, colour, edges)?
Physical & Detail Coherence - are geometry, contact, shadows and fine details plausible?
"""
    + _REDEDIT_ANSWER
)

_CN_ALIASES = (
    ("Prompt Compliance", ("指令遵循", "指令符合度")),
    ("Visual Naturalness", ("视觉自然度",)),
    ("Physical & Detail Coherence", ("物理与细节一致性",)),
)


def gedit_prompt_set() -> PromptSet:
    """GEdit-protocol templates (our wording): tasks ``"sc"`` (G_SC) and ``"pq"`` (G_PQ), both 0–10."""
    sc = JudgeTemplate(
        _GEDIT_SC,
        ("Semantic Consistency",),
        ("G_SC",),
        (0.0, 10.0),
        ("source", "edited"),
        origin=_OURS + "gedit_sc",
    )
    pq = JudgeTemplate(
        _GEDIT_PQ, ("Perceptual Quality",), ("G_PQ",), (0.0, 10.0), ("edited",), origin=_OURS + "gedit_pq"
    )
    return PromptSet({"sc": sc, "pq": pq}, name="gedit")


def imgedit_prompt_set() -> PromptSet:
    """ImgEdit-protocol template (our wording), one for every task, three 1–5 ratings."""
    t = JudgeTemplate(
        _IMGEDIT,
        ("Instruction Adherence", "Edit Quality", "Detail Preservation"),
        ("instruction_adherence", "edit_quality", "detail_preservation"),
        (1.0, 5.0),
        origin=_OURS + "imgedit",
    )
    return PromptSet({}, name="imgedit", default=t)


def rededit_text_prompt_set() -> PromptSet:
    """§4.2 text-editing judge (our wording): SuccessEdit, OverEdit, Style, Consistency on 1–5."""
    t = JudgeTemplate(
        _TEXT_JUDGE,
        ("SuccessEdit", "OverEdit", "Style", "Consistency"),
        ("success_edit", "over_edit", "style", "consistency"),
        (1.0, 5.0),
        origin=_OURS + "rededit_text",
    )
    return PromptSet({"text": t}, name="rededit_text", default=t)


def rededit_generic_prompt_set() -> PromptSet:
    """One REDEdit-style template (our wording) for every edit task, and its one-image form for ``t2i`` rows
    (no Picture 1 to show); scores under :data:`CANONICAL_DIMENSIONS`."""
    names = ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Coherence")
    t = JudgeTemplate(
        _REDEDIT_GENERIC,
        names,
        CANONICAL_DIMENSIONS,
        (1.0, 5.0),
        origin=_OURS + "rededit_generic",
        aliases=_CN_ALIASES,
    )
    t2i = JudgeTemplate(
        _REDEDIT_GENERIC_T2I,
        names,
        CANONICAL_DIMENSIONS,
        (1.0, 5.0),
        ("edited",),
        origin=_OURS + "rededit_generic_t2i",
        aliases=_CN_ALIASES,
    )
    return PromptSet({"t2i": t2i}, name="rededit_generic", default=t)


BUILTIN_PROMPT_SETS = {
    "gedit": gedit_prompt_set,
    "imgedit": imgedit_prompt_set,
    "rededit_text": rededit_text_prompt_set,
    "rededit_generic": rededit_generic_prompt_set,
}


def builtin_prompt_set(name: str) -> PromptSet:
    """A built-in prompt set by name (see :data:`BUILTIN_PROMPT_SETS`)."""
    if name not in BUILTIN_PROMPT_SETS:
        raise KeyError(f"unknown built-in prompt set {name!r}; choose from {sorted(BUILTIN_PROMPT_SETS)}")
    return BUILTIN_PROMPT_SETS[name]()
