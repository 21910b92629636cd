"""Captioning-engine prompt templates (report §2.5; EN and ZH) and how their answers are read.

Four template kinds, one per step of the progressive engine (§2.5, Fig. 6):

* ``structured`` (§2.5.1): one image → a JSON object with the fields the report lists (main subject,
  background, lighting, style, camera angle, plus visible text); stored as one ``caption`` string.
* ``detailed`` (§2.5.2 "Detailed Instruction Captioning"): source image(s) + edited image → one precise
  instruction, with the report's high-sensitivity dimensions (left/right, viewpoint, fine attributes)
  spelled out in the prompt.
* ``concise`` (§2.5.2 "Concise Instruction Refinement"): text-only rewrite of the detailed instruction at a
  sampled simplification level in a sampled syntactic pattern (inversion, subjectless imperative,
  fragment, informal …), so training text does not inherit one captioner's template.
* ``user`` (§2.5.2 "User-Like Instruction Refinement"): text-only rewrite of the concise instruction in a
  sampled persona, with a help-seeking marker at a configurable ratio.

Templates are plain text with ``<name>`` markers. Every template has a :attr:`CaptionTemplate.template_hash`
(canonical text + kind + language + output format); it is part of the answer cache key and is recorded in
each row's ``caption_meta``, so texts from different prompts are never mixed silently. The built-in
wording is our own. :func:`load_templates` reads replacements from a YAML/JSON file (one entry per
``<kind>_<lang>``), which is how a deployment swaps in its fine-tuned captioner's prompts.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rededit.scoring.judges.parsing import ParseResult

__all__ = [
    "HELP_MARKERS",
    "KINDS",
    "LANGUAGES",
    "PERSONAS",
    "SIMPLIFICATION_LEVELS",
    "STRUCTURED_FIELDS",
    "SYNTAX_PATTERNS",
    "CaptionTemplate",
    "TemplateSet",
    "default_templates",
    "load_templates",
]

KINDS = ("structured", "detailed", "concise", "user")
LANGUAGES = ("en", "zh")
# §2.5.1: "main subject, background elements, lighting conditions, artistic style, and camera angles".
STRUCTURED_FIELDS: tuple[str, ...] = ("subject", "background", "lighting", "style", "camera")
_FIELD_LABELS = {
    "en": {"subject": "Subject", "background": "Background", "lighting": "Lighting", "style": "Style",
           "camera": "Camera", "text": "Text"},
    "zh": {"subject": "主体", "background": "背景", "lighting": "光照", "style": "风格", "camera": "镜头",
           "text": "文字"},
}  # fmt: skip

# §2.5.2: "inversions and subjectless imperatives to informal phrasings and various other linguistic patterns".
SYNTAX_PATTERNS: dict[str, tuple[str, ...]] = {
    "en": (
        "a subjectless imperative (start with the verb)",
        "an inversion (put the changed object or attribute first, then the action)",
        "a short noun-phrase fragment with no verb",
        "an arrow form 'X → Y'",
        "an informal, chatty phrasing in lower case",
        "a passive sentence ('… should be …')",
        "a polite request with 'please'",
        "a goal statement ('I want …' / 'Let …')",
    ),
    "zh": (
        "无主语的祈使句（以动词开头）",
        "倒装句（先说被修改的对象或属性，再说动作）",
        "不含动词的短名词短语",
        "箭头形式“X → Y”",
        "随意口语化的说法",
        "“把”字句",
        "带“请”的礼貌请求",
        "目标陈述（“我要……”/“让……”）",
    ),
}
SIMPLIFICATION_LEVELS: dict[str, tuple[str, ...]] = {
    "en": (
        "Keep the key details (object, attribute, position) but drop every redundant modifier.",
        "Keep only the core action and its object; drop positions and secondary details unless they are needed to find the object.",
        "Make it as short as possible (at most six words) while keeping the editing intent unambiguous.",
    ),
    "zh": (
        "保留关键信息（对象、属性、位置），删去所有冗余修饰。",
        "只保留核心动作和对象；除非需要用来定位对象，否则删去位置和次要细节。",
        "尽量简短（不超过十个字），但编辑意图必须明确。",
    ),
}
# §2.5.2: "persona-driven tones and help-seeking markers".
PERSONAS: dict[str, tuple[str, ...]] = {
    "en": (
        "a casual social-media user typing quickly on a phone",
        "a polite office worker preparing slides",
        "a beginner who is unsure about editing terms",
        "an enthusiastic hobby photographer",
        "a busy parent fixing a family photo",
        "a small shop owner editing a product picture",
    ),
    "zh": (
        "用手机快速打字的社交媒体用户",
        "正在做幻灯片的礼貌上班族",
        "不太懂修图术语的新手",
        "热情的摄影爱好者",
        "忙着修家庭照片的家长",
        "给商品图修图的小店主",
    ),
}
HELP_MARKERS: dict[str, tuple[str, ...]] = {
    "en": (
        "Can you help me fix this?",
        "Could you save this image by changing something?",
        "I really need a hand with this one.",
        "Not sure how to do this myself…",
        "Would you mind helping me out?",
    ),
    "zh": ("你能帮我改一下吗？", "能帮我救救这张图吗？", "我自己不会弄……", "麻烦帮个忙。", "可以帮帮我吗？"),
}

_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|sorry,|i cannot|i can'?t|i am unable|as an ai|抱歉|对不起|我无法|我不能)", re.IGNORECASE
)
_LABEL = re.compile(
    r"^\s*(?:concise|detailed|user[- ]like|rewritten|final)?\s*(?:instruction|rewrite|answer|output)\s*[:：]\s*",
    re.IGNORECASE,
)
_CJK = re.compile(r"[\u4e00-\u9fff]")
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|「[^」]*」")
_MARKER = re.compile(r"<([a-z_]+)>")


def _fail(error: str) -> ParseResult:
    return ParseResult(scores=None, ok=False, error=error)


def _json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (bare, or inside a ```json fence)."""
    fence = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.DOTALL)
    candidates = [fence.group(1)] if fence else []
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


@dataclass(frozen=True)
class CaptionTemplate:
    """One captioning prompt and how its answer becomes a manifest text.

    Attributes:
        kind: ``structured`` | ``detailed`` | ``concise`` | ``user``.
        language: ``en`` | ``zh`` (the language the answer must be in).
        text: the prompt, with ``<name>`` markers filled by :meth:`render`.
        max_chars: answers longer than this are rejected (a rambling answer is not an instruction).
        origin: where the text comes from, for the record.
    """

    kind: str
    language: str
    text: str
    max_chars: int = 600
    origin: str = "builtin:ours/v1"
    markers: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"caption template kind must be one of {KINDS}, got {self.kind!r}")
        if self.language not in LANGUAGES:
            raise ValueError(f"caption template language must be one of {LANGUAGES}, got {self.language!r}")
        if not self.text.strip():
            raise ValueError(f"caption template {self.kind}_{self.language} ({self.origin}) is empty")
        object.__setattr__(self, "markers", tuple(dict.fromkeys(_MARKER.findall(self.text))))
        need = {"concise": "instruction", "user": "instruction"}.get(self.kind)
        if need and need not in self.markers:
            raise ValueError(f"{self.kind}_{self.language} template ({self.origin}) needs an <{need}> marker")

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.language}"

    @property
    def template_hash(self) -> str:
        """sha256 over the NFC-normalised text and everything that decides how the answer is read."""
        payload = {
            "kind": self.kind,
            "language": self.language,
            "text": unicodedata.normalize("NFC", self.text.replace("\r\n", "\n")).strip(),
            "max_chars": self.max_chars,
            "fields": list(STRUCTURED_FIELDS) if self.kind == "structured" else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def render(self, **fields: str) -> str:
        """The prompt with every ``<name>`` marker replaced; a missing or unused field is an error."""
        missing = [m for m in self.markers if m not in fields]
        extra = [k for k in fields if k not in self.markers]
        if missing or extra:
            raise ValueError(
                f"template {self.key} ({self.origin}) has markers {list(self.markers)}; "
                f"missing {missing}, unexpected {extra}"
            )
        out = self.text
        for name, value in fields.items():
            out = out.replace(f"<{name}>", str(value).strip())
        return out

    def extract(self, raw: str | None) -> tuple[str | None, str | None]:
        """(text for the manifest, None) or (None, why the answer is unusable)."""
        if raw is None or not raw.strip():
            return None, "empty answer"
        if _REFUSAL.match(raw):
            return None, f"refusal: {raw.strip()[:80]!r}"
        if self.kind == "structured":
            obj = _json_object(raw)
            if obj is None:
                return None, "no JSON object in the answer"
            labels = _FIELD_LABELS[self.language]
            missing = [k for k in STRUCTURED_FIELDS if not isinstance(obj.get(k), str) or not obj[k].strip()]
            if missing:
                return None, f"structured caption lacks fields {missing}"
            keys = [*STRUCTURED_FIELDS] + (
                ["text"] if isinstance(obj.get("text"), str) and obj["text"].strip() else []
            )
            if self.language == "zh":
                text = "".join(f"{labels[k]}：{obj[k].strip().rstrip('。')}。" for k in keys)
            else:
                text = " ".join(f"{labels[k]}: {obj[k].strip().rstrip('.')}." for k in keys)
        else:
            text = raw.strip().strip("`").strip()
            text = _LABEL.sub("", text).strip()
            if len(text) >= 2 and text[0] in "\"'“「" and text[-1] in "\"'”」":
                text = text[1:-1].strip()
            if "\n\n" in text:  # a second paragraph is commentary, not part of the instruction
                text = text.split("\n\n", 1)[0].strip()
            if not text:
                return None, "empty answer after cleaning"
        if len(text) > self.max_chars:
            return None, f"answer too long ({len(text)} > {self.max_chars} chars)"
        # Language of the content, not of our field labels; quoted text (sign words) may be in any script.
        content = " ".join(obj[k] for k in keys) if self.kind == "structured" else text
        has_cjk = bool(_CJK.search(_QUOTED.sub("", content)))
        if self.language == "zh" and not has_cjk:
            return None, "answer is not in Chinese"
        if self.language == "en" and has_cjk:
            return None, "answer is not in English"
        return text, None

    def parse(self, text: str | None, out_of_range: str = "reject") -> ParseResult:
        """:class:`~rededit.scoring.judges.vlm.CachedJudge` hook: ``ok`` when :meth:`extract` accepts."""
        value, error = self.extract(text)
        return ParseResult(scores={}, ok=True, error=None) if value is not None else _fail(error)


_BUILTIN: dict[str, str] = {
    "structured_en": (
        "Describe this image for training an image generator. Answer with one JSON object and nothing else, "
        'with these string fields: "subject" (the main subject(s) with their attributes and colours), '
        '"background" (background elements and setting), "lighting" (light sources, direction, contrast, '
        'time of day), "style" (photographic or artistic style, medium, colour palette), "camera" (shot type, '
        'camera angle, viewpoint, framing), and "text" (any visible text, quoted exactly, or an empty string). '
        "Use left/right from the viewer's point of view. Be factual; do not guess what is not visible."
    ),
    "structured_zh": (
        "请为训练图像生成模型描述这张图片。只输出一个 JSON 对象，不要输出其他内容，字段均为中文字符串："
        '"subject"（主体及其属性和颜色）、"background"（背景元素与场景）、"lighting"（光源、方向、对比度、时间）、'
        '"style"（摄影或艺术风格、媒介、色调）、"camera"（景别、拍摄角度、视角、构图）、'
        '"text"（图中可见文字，原样引用；没有则为空字符串）。左右以观看者视角为准。只描述可见内容，不要猜测。'
    ),
    "detailed_en": (
        "The first <n_inputs> image(s) are the input(s) of an image edit (Picture 1 … Picture <n_inputs>); the "
        "last image is the edited result. Write the single editing instruction that turns the input(s) into the "
        "result. Be accurate and complete: name every changed object with its attributes, what it changes into, "
        "and where it is. Pay special attention to left/right orientation (from the viewer's point of view), "
        "viewpoint or camera changes, counts, colours, text content and fine-grained attributes. Do not mention "
        "anything that did not change. Refer to inputs as 'Picture N' when there is more than one. "
        "Answer with the instruction only, in English."
    ),
    "detailed_zh": (
        "前 <n_inputs> 张图片是一次图像编辑的输入（图1……图<n_inputs>），最后一张是编辑结果。请写出把输入变成结果的"
        "一条编辑指令。要求准确完整：写明每个被修改的对象及其属性、改成什么、位于何处。特别注意左右方向（以观看者视角）、"
        "视角或镜头变化、数量、颜色、文字内容和细粒度属性。不要提及没有变化的内容。多张输入时用“图N”指代。"
        "只输出指令本身，用中文。"
    ),
    "concise_en": (
        "Rewrite this image-editing instruction more concisely without changing what the edit does.\n"
        "Instruction: <instruction>\n<level>\nUse this sentence pattern: <pattern>.\n"
        "Answer with the rewritten instruction only, in English."
    ),
    "concise_zh": (
        "在不改变编辑意图的前提下，把下面的图像编辑指令改写得更简洁。\n指令：<instruction>\n<level>\n"
        "使用这种句式：<pattern>。\n只输出改写后的指令，用中文。"
    ),
    "user_en": (
        "Rewrite this image-editing instruction the way a real person would ask for it in a chat, speaking as "
        "<persona>. Keep the editing intent exactly. <help>\nInstruction: <instruction>\n"
        "Answer with the message only, in English."
    ),
    "user_zh": (
        "把下面的图像编辑指令改写成真实用户在聊天中会说的话，身份是：<persona>。编辑意图必须完全保持。<help>\n"
        "指令：<instruction>\n只输出这条消息，用中文。"
    ),
}
_HELP_LINE = {
    "en": ("Include a help-seeking phrase such as: <marker>", "Do not add greetings or thanks."),
    "zh": ("加入一句求助的话，例如：<marker>", "不要加问候或感谢。"),
}


def help_line(language: str, marker: str | None) -> str:
    """The ``<help>`` field of a user-like prompt: ask for ``marker`` or forbid filler."""
    with_marker, without = _HELP_LINE[language]
    return with_marker.replace("<marker>", marker) if marker else without


def default_templates() -> dict[str, CaptionTemplate]:
    """The built-in templates, keyed ``<kind>_<lang>``."""
    return {key: CaptionTemplate(*key.split("_"), text=text) for key, text in _BUILTIN.items()}


def load_templates(path: str | Path) -> dict[str, CaptionTemplate]:
    """Built-in templates overridden by a YAML/JSON file ``{<kind>_<lang>: text | {text, max_chars}}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown key or an invalid template (the message names the file and key).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"caption template file not found: {p}")
    if p.suffix in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    else:
        data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, Mapping):
        raise ValueError(f"{p}: expected a mapping of <kind>_<lang> → template, got {type(data).__name__}")
    out = default_templates()
    for key, spec in data.items():
        kind, _, lang = str(key).partition("_")
        if kind not in KINDS or lang not in LANGUAGES:
            raise ValueError(
                f"{p}: unknown template key {key!r}; expected <kind>_<lang> with kind in {KINDS}"
            )
        spec = {"text": spec} if isinstance(spec, str) else dict(spec)
        try:
            out[key] = CaptionTemplate(kind, lang, origin=f"file:{p.name}", **spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{p}: template {key!r}: {err}") from err
    return out


@dataclass(frozen=True)
class TemplateSet:
    """The templates a caption run uses; :attr:`set_hash` identifies them all."""

    templates: Mapping[str, CaptionTemplate]

    def get(self, kind: str, language: str) -> CaptionTemplate:
        key = f"{kind}_{language}"
        if key not in self.templates:
            raise KeyError(f"no caption template {key!r}; have {sorted(self.templates)}")
        return self.templates[key]

    @property
    def hashes(self) -> dict[str, str]:
        return {k: t.template_hash for k, t in sorted(self.templates.items())}

    @property
    def set_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.hashes, sort_keys=True).encode()).hexdigest()
