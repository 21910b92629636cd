"""Which text conditions a sample: the caption mixture of report Table 1 and the instruction styles of §2.5.2.

Table 1 mixes three caption kinds per stage (Pretrain 55/40/5, CT 20/60/20, SFT 10/45/45, DPO and NFT
10/30/60 for Original / Structured / Instructive captions). A T2I row draws one of its text columns with
those weights; an edit row draws one of its instruction styles (detailed / concise / user-like, §2.5.2).
When the drawn column is missing or empty the weights are renormalised over the columns that do have
text, so a manifest without e.g. ``caption_original`` still trains (and the fallback is deterministic).

The draw is a pure function of (seed, epoch, sample id), so every rank and worker agrees and a resumed
run repeats it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rededit.utils.seeding import numpy_rng

# Table 1 column → manifest column for T2I rows ("Instructive Cap." of a T2I row is its instruction).
CAPTION_KIND_COLUMNS = {"original": "caption_original", "structured": "caption", "instructive": "instruction"}
INSTRUCTION_STYLE_COLUMNS = {
    "detailed": "instruction",
    "concise": "instruction_concise",
    "user": "instruction_user",
}


@dataclass
class TextMix:
    """Weights of the text kinds a stage trains on.

    Attributes:
        captions: T2I rows, Table 1 kinds ``original`` / ``structured`` / ``instructive`` → weight.
        instructions: edit rows, §2.5.2 styles ``detailed`` / ``concise`` / ``user`` → weight.
        zh_prob: probability of using the Chinese variant (``<column>_zh``) when the row has one.
    """

    captions: dict[str, float] = field(
        default_factory=lambda: {"original": 0.55, "structured": 0.40, "instructive": 0.05}
    )
    instructions: dict[str, float] = field(
        default_factory=lambda: {"detailed": 0.4, "concise": 0.3, "user": 0.3}
    )
    zh_prob: float = 0.3

    def __post_init__(self) -> None:
        for name, weights, known in (
            ("captions", self.captions, CAPTION_KIND_COLUMNS),
            ("instructions", self.instructions, INSTRUCTION_STYLE_COLUMNS),
        ):
            unknown = set(weights) - set(known)
            if unknown:
                raise ValueError(
                    f"text_mix.{name}: unknown kinds {sorted(unknown)}; expected {sorted(known)}"
                )
            if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"text_mix.{name}: weights must be >= 0 and not all 0, got {weights}")
        if not 0.0 <= self.zh_prob <= 1.0:
            raise ValueError(f"text_mix.zh_prob must be in [0, 1], got {self.zh_prob}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> TextMix:
        return (
            cls()
            if cfg is None
            else cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()})
        )


@dataclass(frozen=True)
class ChosenText:
    text: str
    column: str  # the manifest column it came from, e.g. "instruction_user_zh"
    kind: str  # Table 1 kind or §2.5.2 style
    lang: str  # "en" or "zh"


def choose_text(row: Mapping[str, Any], mix: TextMix, *, seed: int, epoch: int) -> ChosenText:
    """Draw the conditioning text of one manifest row (see module docstring).

    Raises:
        ValueError: the row has no text in any column of its kind (the validator rejects such rows).
    """
    is_t2i = not row.get("references")
    table = CAPTION_KIND_COLUMNS if is_t2i else INSTRUCTION_STYLE_COLUMNS
    weights = mix.captions if is_t2i else mix.instructions
    rng = numpy_rng(seed, epoch, row["id"], "text")
    use_zh = rng.random() < mix.zh_prob
    lang_order = ("zh", "en") if use_zh else ("en",)
    for lang in lang_order:
        suffix = "_zh" if lang == "zh" else ""
        available = {k: w for k, w in weights.items() if w > 0 and row.get(table[k] + suffix)}
        if not available:
            continue
        kinds = sorted(available)
        probs = [available[k] for k in kinds]
        total = sum(probs)
        kind = kinds[int(rng.choice(len(kinds), p=[p / total for p in probs]))]
        column = table[kind] + suffix
        return ChosenText(text=row[column], column=column, kind=kind, lang=lang)
    # Last resort: any non-empty text column of the row (e.g. an edit row with only a caption).
    for column in (*table.values(), *CAPTION_KIND_COLUMNS.values()):
        if row.get(column):
            return ChosenText(text=row[column], column=column, kind="fallback", lang="en")
    raise ValueError(f"row {row.get('id')!r} has no text in any of {sorted(set(table.values()))}")
