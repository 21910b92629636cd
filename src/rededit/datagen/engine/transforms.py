"""Task Inversion and Task Splitting as manifest transforms (report §2.3, last paragraph).

**Task Inversion** "leverages the reversibility of certain edits by swapping source and target images,
thereby reducing instruction direction bias". :func:`invert_tasks` appends, for each eligible forward row
(invertible task, one reference, not itself an inverse, kept, chosen with probability ``prob`` from
``(seed, id)``), a row ``<id>-inv`` with target and reference swapped, the inverse task
(add↔remove, replace/colour/background/text ↔ themselves) and ``inverse_of = <id>``. Instruction texts
are rewritten by rule tables (verb/article/preposition swaps, swapping the two colour words or quoted
strings, "A → B" → "B → A", EN and ZH). A text no rule can invert (e.g. a background change, whose old
background the instruction never names) is left **null** and the row gets ``inversion_text = "pending"``:
the captioning engine (:class:`~rededit.datagen.engine.captioning.CaptionStage`, which fills null columns)
then writes it from the swapped images — a differential captioner is exactly the tool for that. The
synthetic corpus already inverts at synthesis time (writer ``inverse_of``); this transform is for real
data and for corpora synthesised with ``inverse_prob = 0``. Rows that already have an inverse are skipped.

**Task Splitting** "addresses high-difficulty requests by decomposing multi-operation edits into
sequential atomic steps, applying our iterable pipeline that performs one modification at a time". Two
parts, honestly separated:

* :class:`TaskSplitStage` (an :class:`~rededit.datagen.engine.stage.EngineStage`) *marks* composite
  instructions: ``edit_steps`` (the atomic step texts from a rule-based clause splitter) and
  ``n_edit_steps``. Rows with ≥ 2 steps are the ones to route through a step-by-step producer.
* :func:`split_tasks` *decomposes* rows whose intermediate images exist (``intermediates``: URIs of the
  images after steps 1…S-1, as an iterable producer writes them) into S single-step rows
  ``<id>-step<k>``: source = the previous image, target = the next, instruction = step k, ``split_of`` =
  the parent id. Without intermediates nothing is fabricated: the row stays marked only. Our model-free
  template engine does not produce multi-step intermediates, so in this repository the decomposition is
  exercised on manifests that carry them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from rededit.data.schema import ALL_FIELDS
from rededit.data.uri import resolve_uri
from rededit.datagen.engine.stage import (
    DROP_COLUMN,
    BaseEngineStage,
    StageContext,
    apply_drops,
    kept_mask,
    set_column,
)
from rededit.utils.logging import get_logger
from rededit.utils.seeding import derive_seed

__all__ = [
    "INVERSE_TASKS",
    "TaskSplitStage",
    "invert_instruction",
    "invert_tasks",
    "split_instruction",
    "split_tasks",
]

log = get_logger(__name__)

# forward task → task of the swapped pair. Style transfer, restoration, viewpoint zoom, T2I are not
# invertible (the inverse "un-stylise" is ill-posed or the source is not recoverable).
INVERSE_TASKS: dict[str, str] = {
    "add": "remove",
    "remove": "add",
    "replace": "replace",
    "color": "color",
    "background": "background",
    "text": "text",
}
_INSTRUCTION_COLUMNS = ("instruction", "instruction_concise", "instruction_user")

_COLOURS_EN = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "white", "black", "grey",
               "gray", "brown", "magenta", "teal", "navy", "gold", "silver", "beige", "violet")  # fmt: skip
_COLOURS_ZH = ("红色", "绿色", "蓝色", "黄色", "橙色", "紫色", "粉色", "青色", "白色", "黑色", "灰色", "棕色",
               "金色", "银色")  # fmt: skip

_I = re.IGNORECASE
_EN_ADD = r"(?:add|place|insert|put|draw)"
_EN_REMOVE = r"(?:remove|delete|erase|get rid of)"
_ZH_END = r"(?=[，。！？,.!?]|$)"

# (pattern, replacement) applied in order; the first that matches rewrites the text (re.subn, count=1).
_RULES: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("add", "en"): (
        (rf"\b{_EN_ADD}\s+(?:an?|one)\s+(.+?)\s+(?:into|onto|to)\s+", r"remove the \1 from "),
        (rf"\b{_EN_ADD}\s+(?:an?|one)\s+", "remove the "),
        (rf"\b{_EN_ADD}\s+the\s+", "remove the "),
        (r"^\+\s*", "- "),
        (r"^an?\s+", "no "),  # a bare noun phrase ("a red star on the left") is an add; "no X" removes
        (rf"\b{_EN_ADD}\s+", "remove "),
    ),
    ("remove", "en"): (
        (rf"\b{_EN_REMOVE}\s+the\s+(.+?)\s+from\s+", r"add a \1 to "),
        (rf"\b{_EN_REMOVE}\s+the\s+", "add a "),
        (r"\btake the (.+?) out of the scene", r"add a \1 to the scene"),
        (r"^no\s+", "add a "),
        (rf"\b{_EN_REMOVE}\s+", "add "),
    ),
    ("add", "zh"): (
        (rf"在(.+?)(?:添加|画|加上|加)(?:一个|个)?(.+?){_ZH_END}", r"删除\1的\2"),
        (r"(?:添加|加上|加一个|加个)", "去掉"),
    ),
    ("remove", "zh"): (
        (rf"(?:删除|去掉|删掉)(.+?)的(.+?){_ZH_END}", r"在\1添加一个\2"),
        (rf"把(.+?)(?:去掉|删除|删掉){_ZH_END}", r"加上\1"),
        (r"(?:删除|去掉|删掉)", "加上"),
    ),
    ("replace", "en"): (
        (r"\b(swap) the (.+?) (for) an? (.+?) of the same size", r"\1 the \4 \3 a \2 of the same size"),
        (r"\b(replace|swap) the (.+?) (with|for) (?:an?|the) (.+?)(?=[,.;]|$)", r"\1 the \4 \3 a \2"),
        (r"\b(turn|change|make) the (.+?) (into) (?:an?) (.+?)(?=[,.;]|$)", r"\1 the \4 \3 a \2"),
        (r"\bswap (?:the )?(.+?) for (?:an? )?(.+?)(?=[,.;]|$)", r"swap the \2 for a \1"),
        (r"\bmake the (\w+) an? (\w+)(?=[,.;]|$)", r"make the \2 a \1"),
    ),
    ("replace", "zh"): (
        (rf"(把|将)(.+?)的(.+?)(替换成|换成|改成|变成)(同样大小的)?(.+?){_ZH_END}", r"\1\2的\6\4\5\3"),
        (rf"(把|将)(.+?)(替换成|换成|改成|变成)(.+?){_ZH_END}", r"\1\4\3\2"),
        (rf"^(.+?)(替换成|换成|改成|变成)(.+?){_ZH_END}", r"\3\2\1"),
    ),
}
_CLEANUP = {
    "en": ((r"\s+and fill the area with the background", ""), (r"\ba ([aeiouAEIOU])", r"an \1"), (r"\ban ([^aeiouAEIOU\W])", r"a \1")),
    "zh": ((r"，用背景填补该区域", ""),),
}  # fmt: skip
_QUOTES = re.compile(r"\"([^\"]+)\"|“([^”]+)”")


def _swap_two(text: str, words: Sequence[str]) -> str | None:
    """Swap the two distinct words of ``words`` found in ``text`` (None unless exactly two occur)."""
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)), _I)
    found = list(dict.fromkeys(m.group(0).lower() for m in pattern.finditer(text)))
    if len(found) != 2:
        return None
    a, b = found
    return pattern.sub(
        lambda m: b if m.group(0).lower() == a else (a if m.group(0).lower() == b else m.group(0)), text
    )


def _swap_quotes(text: str) -> str | None:
    spans = list(_QUOTES.finditer(text))
    if len(spans) != 2:
        return None
    (a, b) = (s.group(1) or s.group(2) for s in spans)
    out, last = [], 0
    for s, new in zip(spans, (b, a)):
        inner = s.span(1) if s.group(1) is not None else s.span(2)
        out += [text[last : inner[0]], new]
        last = inner[1]
    return "".join(out) + text[last:]


def _lang(text: str) -> str:
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


def invert_instruction(text: str, task: str) -> str | None:
    """The instruction of the swapped pair, or None when no rule applies (then caption from images).

    Args:
        text: the forward instruction (any style; EN or ZH, detected from the text).
        task: the forward task.
    """
    if not text or not text.strip():
        return None
    lang = _lang(text)
    out: str | None = None
    if "→" in text and task in ("replace", "color", "text"):
        left, _, right = text.partition("→")
        if left.strip() and right.strip() and "→" not in right:
            out = f"{right.strip()} → {left.strip()}"
    elif task == "color":
        out = _swap_two(text, _COLOURS_ZH if lang == "zh" else _COLOURS_EN)
    elif task == "text":
        out = _swap_quotes(text)
    else:
        for pattern, repl in _RULES.get((task, lang), ()):
            new, n = re.subn(pattern, repl, text, count=1, flags=_I)
            if n:
                out = new
                break
    if out is None or out == text:
        return None
    for pattern, repl in _CLEANUP[lang]:
        out = re.sub(pattern, repl, out)
    return out[:1].upper() + out[1:] if text[:1].isupper() else out


def invert_tasks(
    table: pa.Table,
    prob: float = 1.0,
    seed: int = 0,
    inverse_tasks: Mapping[str, str] | None = None,
    keep_pending: bool = True,
) -> tuple[pa.Table, dict]:
    """Append Task Inversion rows (see module docstring); returns ``(table, report)``.

    Args:
        table: the manifest (extra engine columns are kept; new rows get nulls there).
        prob: fraction of eligible rows inverted, chosen from ``(seed, id)``.
        seed: selection seed.
        inverse_tasks: forward → inverse task map (default :data:`INVERSE_TASKS`).
        keep_pending: also append rows whose instruction no rule could invert (null text,
            ``inversion_text = "pending"``). They fail manifest validation until the captioning stage
            fills them; pass False when no captioner runs afterwards.

    Report: ``{"eligible", "added", "pending_text", "skipped": {reason: n}}``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    mapping = dict(INVERSE_TASKS if inverse_tasks is None else inverse_tasks)
    rows = table.to_pylist()
    kept = kept_mask(table)
    ids = {r["id"] for r in rows}
    has_inverse = {r.get("inverse_of") for r in rows if r.get("inverse_of")}
    cols = list(table.column_names)
    extra_cols = [name for c in _INSTRUCTION_COLUMNS for name in (c, f"{c}_zh")]
    new_rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    pending = eligible = 0

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for row, keep in zip(rows, kept):
        if row["task"] not in mapping:
            skip("task not invertible")
            continue
        if not keep:
            skip("dropped")
            continue
        if row.get("inverse_of"):
            skip("is an inverse")
            continue
        if len(row["references"]) != 1:
            skip("not exactly one reference")
            continue
        inv_id = f"{row['id']}-inv"
        if row["id"] in has_inverse or inv_id in ids:
            skip("already inverted")
            continue
        eligible += 1
        if derive_seed(seed, "task-inversion", row["id"]) / 2.0**63 >= prob:
            continue
        new = {c: None for c in cols}
        new |= {
            "id": inv_id,
            "task": mapping[row["task"]],
            "target": row["references"][0],
            "target_width": row["reference_widths"][0],
            "target_height": row["reference_heights"][0],
            "references": [row["target"]],
            "reference_widths": [row["target_width"]],
            "reference_heights": [row["target_height"]],
            "inverse_of": row["id"],
            "edit_mask": row.get("edit_mask"),  # the changed pixels are the same set in both directions
            "split": row.get("split"),
            "caption_type": "instructive",
            "source": f"{row.get('source') or 'unknown'}/inverse",
        }
        if row.get("cluster") is not None:
            new["cluster"] = derive_seed("task-inversion-cluster", new["task"], row["cluster"]) % 2**31
        if DROP_COLUMN in cols:
            new[DROP_COLUMN] = None
        missing_text = False
        for c in extra_cols:
            if row.get(c):
                new[c] = invert_instruction(row[c], row["task"])
                missing_text |= new[c] is None
        if not new.get("instruction") and not new.get("instruction_zh"):
            missing_text = True
        new["inversion_text"] = "pending" if missing_text else "rule"
        if missing_text and not keep_pending and not (new.get("instruction") or new.get("instruction_zh")):
            skip("no rule for the instruction")
            continue
        pending += missing_text
        new_rows.append(new)
    report = {"eligible": eligible, "added": len(new_rows), "pending_text": pending, "skipped": skipped}
    if not new_rows:
        return table, report
    if "inversion_text" not in table.column_names:
        table = table.append_column("inversion_text", pa.nulls(table.num_rows, pa.string()))
    for c in [*extra_cols, "inverse_of", "caption_type", "source", "split", "edit_mask", "cluster"]:
        if c not in table.column_names:
            table = table.append_column(ALL_FIELDS[c].name, pa.nulls(table.num_rows, ALL_FIELDS[c].type))
    new_table = pa.Table.from_pylist(
        [{c: r.get(c) for c in table.column_names} for r in new_rows], schema=table.schema
    )
    return pa.concat_tables([table, new_table]), report


# --- Task Splitting -----------------------------------------------------------------------------------

_EN_VERBS = (r"add|remove|delete|erase|change|make|turn|replace|swap|put|place|insert|recolou?r|rotate|flip|"
             r"move|paint|convert|apply|give|zoom|crop|brighten|darken|blur|sharpen|write|draw|fill|set|use")  # fmt: skip
_EN_SPLIT = re.compile(
    rf"\s*(?:;|,?\s*and then\s+|,\s*then\s+|\.\s+then\s+|\bthen\s+|,?\s*after that,?\s+|\.\s+(?=[A-Z])|,?\s+and\s+(?=(?:{_EN_VERBS})\b)|,\s+(?=(?:{_EN_VERBS})\b))\s*",
    _I,
)
_ZH_SPLIT = re.compile(r"\s*(?:；|;|。(?=.)|，?然后|，?接着|，?再|，?并且|，并|，同时)\s*")


def split_instruction(text: str | None) -> list[str]:
    """Atomic steps of a (possibly multi-operation) instruction; ``[text]`` when it is one step.

    Rule-based clause splitting: sequence markers ("then", "after that", ";", "然后", "再", "并且") and
    "and"/"," followed by an edit verb. "add the X and the Y" stays one step (one operation, two objects).
    """
    if text is None or not text.strip():
        return []
    splitter = _ZH_SPLIT if _lang(text) == "zh" else _EN_SPLIT
    parts = [p.strip(" ,，.。") for p in splitter.split(text.strip())]
    steps = [p for p in parts if len(p) >= 2]
    if len(steps) <= 1:
        return [text.strip()]
    return [s[:1].upper() + s[1:] if text[:1].isupper() else s for s in steps]


class TaskSplitStage(BaseEngineStage):
    """Marks composite instructions: adds ``edit_steps`` (list of step texts) and ``n_edit_steps``.

    Args:
        column: the instruction column to split (detailed instruction by default).
        max_steps: instructions with more steps than this are dropped (``split:too_many_steps``) when
            ``drop_over_max``; a request that long is rarely executable as one edit.
        drop_over_max: see ``max_steps``.
    """

    name = "split"
    version = "1"
    needs_model = False

    def __init__(self, column: str = "instruction", max_steps: int = 4, drop_over_max: bool = False):
        if max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {max_steps}")
        self.column = column
        self.max_steps = int(max_steps)
        self.drop_over_max = bool(drop_over_max)

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        if self.column not in table.column_names:
            raise ValueError(f"{self.name}: partition {ctx.partition!r} has no column {self.column!r}")
        kept = kept_mask(table)
        texts = table.column(self.column).to_pylist()
        steps: list[list[str] | None] = [split_instruction(t) if k else None for t, k in zip(texts, kept)]
        n = [None if s is None else len(s) for s in steps]
        reasons = [
            self.drop("too_many_steps")
            if self.drop_over_max and c is not None and c > self.max_steps
            else None
            for c in n
        ]
        table = set_column(table, "edit_steps", pa.array(steps, pa.list_(pa.string())))
        table = set_column(table, "n_edit_steps", pa.array(n, pa.int32()))
        return apply_drops(table, reasons)


def _image_size(uri: str, root: str | Path) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(resolve_uri(uri, root))) as im:
        return im.size


def split_tasks(
    table: pa.Table,
    root: str | Path,
    steps_column: str = "edit_steps",
    intermediates_column: str = "intermediates",
    drop_parent: bool = False,
) -> tuple[pa.Table, dict]:
    """Append single-step rows for composite rows whose intermediate images exist (see module docstring).

    Args:
        table: a manifest with ``steps_column`` (from :class:`TaskSplitStage` or hand-written) and
            ``intermediates_column`` (list of URIs, S-1 per S-step row; null for rows without).
        root: folder relative URIs resolve against (to read intermediate image sizes).
        drop_parent: mark decomposed parents ``drop_reason = "split:decomposed"`` (default: keep both).

    Returns:
        ``(table, report)`` with report ``{"composite", "split", "added", "skipped": {reason: n}}``.
    """
    for c in (steps_column, intermediates_column):
        if c not in table.column_names:
            raise ValueError(f"split_tasks: manifest has no {c!r} column")
    rows = table.to_pylist()
    kept = kept_mask(table)
    ids = {r["id"] for r in rows}
    cols = list(table.column_names)
    added: list[dict] = []
    skipped: dict[str, int] = {}
    composite = n_split = 0
    parents: set[str] = set()
    for row, keep in zip(rows, kept):
        steps = row.get(steps_column) or []
        if not keep or len(steps) < 2:
            continue
        composite += 1
        inter = row.get(intermediates_column)
        why = None
        if not inter:
            why = "no intermediate images"
        elif len(inter) != len(steps) - 1:
            why = "intermediates do not match steps"
        elif len(row["references"]) != 1:
            why = "not exactly one reference"
        elif any(f"{row['id']}-step{k}" in ids for k in range(len(steps))):
            why = "already split"
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        images = [row["references"][0], *inter, row["target"]]
        sizes = [(row["reference_widths"][0], row["reference_heights"][0])]
        sizes += [_image_size(u, root) for u in inter] + [(row["target_width"], row["target_height"])]
        for k, step in enumerate(steps):
            new = {c: None for c in cols} | {
                "id": f"{row['id']}-step{k}", "task": row["task"], "instruction": step,
                "target": images[k + 1], "target_width": sizes[k + 1][0], "target_height": sizes[k + 1][1],
                "references": [images[k]], "reference_widths": [sizes[k][0]], "reference_heights": [sizes[k][1]],
                "split": row.get("split"), "caption_type": "instructive",
                "source": f"{row.get('source') or 'unknown'}/split", "split_of": row["id"], "split_step": k,
                steps_column: [step],
            }  # fmt: skip
            if "n_edit_steps" in cols:
                new["n_edit_steps"] = 1
            added.append(new)
        parents.add(row["id"])
        n_split += 1
    report = {"composite": composite, "split": n_split, "added": len(added), "skipped": skipped}
    if not added:
        return table, report
    for c, t in (("split_of", pa.string()), ("split_step", pa.int32()), ("split", pa.string()),
                 ("caption_type", pa.string()), ("source", pa.string())):  # fmt: skip
        if c not in table.column_names:
            table = table.append_column(c, pa.nulls(table.num_rows, t))
    if drop_parent:
        table = apply_drops(table, ["split:decomposed" if r["id"] in parents else None for r in rows])
        added = [a | {DROP_COLUMN: None} for a in added]
    new_table = pa.Table.from_pylist(
        [{c: r.get(c) for c in table.column_names} for r in added], schema=table.schema
    )
    return pa.concat_tables([table, new_table]), report
