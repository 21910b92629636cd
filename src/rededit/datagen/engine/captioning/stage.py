"""The captioning engine as a data-engine stage (report §2.5): structured captions, detailed / concise /
user-like instructions, EN and ZH, through any :class:`~rededit.scoring.judges.vlm.VLMJudge` backend.

Per kept row and language (``""`` / ``"_zh"`` column suffix)::

    caption{sfx}              = structured(target)                               §2.5.1
    instruction{sfx}          = detailed(references…, target)        (edits only)  §2.5.2
    instruction_concise{sfx}  = concise(instruction{sfx}; level, pattern)        §2.5.2
    instruction_user{sfx}     = user(instruction_concise{sfx}; persona, help)    §2.5.2

The backends are the evaluation judges' clients (local transformers Qwen2.5-VL or an OpenAI-compatible
endpoint), wrapped in :class:`~rededit.scoring.judges.vlm.CachedJudge`: answers are cached on disk under
``sha256(model id, template hash, prompt, image content hashes, decoding)``, retried with backoff, and a
failed call is **null plus a recorded reason**, never an empty string. The concise rewriter is drawn per
row from a suite of backends (``rewriters``, "random VLM models", §2.5.2); the simplification level,
syntax pattern, persona and whether a help-seeking marker is asked for are drawn from
``(seed, row id, column)``, so a rerun asks the same questions (and hits the cache).

Fallback (``fallback: rule``): the rule-based texts the synthetic corpus wrote at synthesis time
(:mod:`rededit.datagen.synth.text`) are kept when a call fails or no backend is configured, and a missing
user-like text is derived from the concise one with the synthetic corpus's user-like wrappers. Each
row's ``caption_meta`` (JSON) records, per column, where the text came from (``vlm`` / ``cache`` /
``existing`` / ``rule``), the template hash and model id, and ``caption_errors`` (JSON, null when none)
why a column is null or fell back. Per-partition counts go to ``<stage_dir>/stats/<partition>.json``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from rededit.data.images import ImageDecodeError, load_image
from rededit.data.schema import ALL_FIELDS
from rededit.datagen.engine.captioning.prompts import (
    HELP_MARKERS,
    LANGUAGES,
    PERSONAS,
    SIMPLIFICATION_LEVELS,
    SYNTAX_PATTERNS,
    TemplateSet,
    default_templates,
    help_line,
    load_templates,
)
from rededit.datagen.engine.stage import BaseEngineStage, StageContext, apply_drops, kept_mask, set_column
from rededit.datagen.synth.text import user_like
from rededit.scoring.judges.vlm import CachedJudge, judge_rgb
from rededit.utils.io import atomic_write_text
from rededit.utils.logging import get_logger
from rededit.utils.seeding import numpy_rng

__all__ = ["CAPTION_FIELDS", "CaptionStage", "rule_user_like"]

log = get_logger(__name__)

CAPTION_FIELDS = ("caption", "instruction", "instruction_concise", "instruction_user")
_KIND = {"caption": "structured", "instruction": "detailed", "instruction_concise": "concise",
         "instruction_user": "user"}  # fmt: skip
_SFX = {"en": "", "zh": "_zh"}

BackendSpec = Any  # a VLMJudge, a zero-argument factory returning one (Hydra ``_partial_: true``), or None


def rule_user_like(concise: str, language: str, seed: int, row_id: str) -> str:
    """Rule-based user-like refinement: the synthetic corpus's help-seeking wrappers around ``concise``."""
    vp = concise.strip().rstrip(".。!！")
    if language == "en":
        vp = vp[:1].lower() + vp[1:] if not vp[:2].isupper() else vp
    en, zh = user_like(numpy_rng(seed, "caption-rule-user", row_id), vp, vp)
    return en if language == "en" else zh


def _spec_id(spec: BackendSpec) -> Any:
    """A stable, JSON-able identity of a backend spec without building it (for the partition hash)."""
    if spec is None:
        return None
    if isinstance(spec, functools.partial):
        f = spec.func
        return {
            "factory": f"{f.__module__}.{f.__qualname__}",
            "kwargs": {k: repr(v) for k, v in sorted(spec.keywords.items())},
        }
    judge_id = getattr(spec, "judge_id", None)
    if judge_id is not None:
        return {"judge_id": judge_id, "decoding": getattr(spec, "decoding", {})}
    return {"factory": f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', repr(spec))}"}


class CaptionStage(BaseEngineStage):
    """Captioning engine stage (``needs_model=True``: the runner gives each worker its own instance).

    Args:
        backend: the VLM for structured captions and detailed instructions (and rewrites when
            ``rewriters`` is empty): a :class:`~rededit.scoring.judges.vlm.VLMJudge`, a factory returning one
            (built lazily in :meth:`setup`), or None for rule-based fallback only.
        rewriters: backends for the concise rewrite, one drawn per row (default: ``[backend]``).
        fields: which of :data:`CAPTION_FIELDS` to produce.
        languages: subset of ``("en", "zh")``.
        overwrite: regenerate texts that are already present (default: fill only null columns).
        fallback: ``"rule"`` (keep existing / rule-based texts on failure) or ``"none"`` (null + reason).
        drop_on_failure: mark rows whose primary text (instruction for edits, caption for T2I) ends up
            null as dropped (``caption:failed``).
        help_ratio: fraction of user-like rewrites that are asked to include a help-seeking marker.
        templates_file: YAML/JSON overriding built-in templates (see :func:`load_templates`).
        cache_dir: answer cache (default ``<stage_dir>/cache``); share it between runs to avoid re-asking.
        max_attempts, backoff_s: retries per call (see :class:`~rededit.scoring.judges.vlm.CachedJudge`).
        retry_parse_failures: also retry (and re-ask for cached) unusable answers; worth it for sampled
            API models, pointless for greedy local decoding (default off: a cached answer is final).
        max_image_area: images are downscaled to at most this many pixels before the call.
    """

    name = "caption"
    version = "1"
    needs_model = True

    def __init__(
        self,
        backend: BackendSpec = None,
        rewriters: Sequence[BackendSpec] = (),
        fields: Sequence[str] = CAPTION_FIELDS,
        languages: Sequence[str] = ("en",),
        overwrite: bool = False,
        fallback: str = "rule",
        drop_on_failure: bool = False,
        help_ratio: float = 0.5,
        templates_file: str | None = None,
        cache_dir: str | None = None,
        max_attempts: int = 3,
        backoff_s: float = 2.0,
        retry_parse_failures: bool = False,
        max_image_area: int | None = 1024 * 1024,
    ):
        bad = [f for f in fields if f not in CAPTION_FIELDS]
        if bad:
            raise ValueError(f"caption fields must be in {CAPTION_FIELDS}, got {bad}")
        bad = [lang for lang in languages if lang not in LANGUAGES]
        if bad or not languages:
            raise ValueError(
                f"caption languages must be a non-empty subset of {LANGUAGES}, got {list(languages)}"
            )
        if fallback not in ("rule", "none"):
            raise ValueError(f"fallback must be 'rule' or 'none', got {fallback!r}")
        if not 0.0 <= help_ratio <= 1.0:
            raise ValueError(f"help_ratio must be in [0, 1], got {help_ratio}")
        self._backend_spec = backend
        self._rewriter_specs = list(rewriters)
        self.fields = list(fields)
        self.languages = list(languages)
        self.overwrite = bool(overwrite)
        self.fallback = fallback
        self.drop_on_failure = bool(drop_on_failure)
        self.help_ratio = float(help_ratio)
        self.templates_file = templates_file
        self.cache_dir = cache_dir
        self.max_attempts = int(max_attempts)
        self.backoff_s = float(backoff_s)
        self.retry_parse_failures = bool(retry_parse_failures)
        self.max_image_area = max_image_area
        self._templates = TemplateSet(
            load_templates(templates_file) if templates_file else default_templates()
        )
        self._backend = None
        self._rewriters: list = []
        self._cached: dict[tuple[int, str], Any] = {}
        self._ready = False

    def __getstate__(self) -> dict:
        # Workers get the specs, not built models / open caches: each builds its own in setup().
        state = dict(self.__dict__)
        state.update(_backend=None, _rewriters=[], _cached={}, _ready=False)
        return state

    # --- identity --------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "fields": self.fields,
            "languages": self.languages,
            "overwrite": self.overwrite,
            "fallback": self.fallback,
            "drop_on_failure": self.drop_on_failure,
            "help_ratio": self.help_ratio,
            "templates": self._templates.set_hash,
            "backend": _spec_id(self._backend_spec),
            "rewriters": [_spec_id(s) for s in self._rewriter_specs],
            "max_image_area": self.max_image_area,
        }

    @property
    def templates(self) -> TemplateSet:
        return self._templates

    # --- models ----------------------------------------------------------------------------------------
    @staticmethod
    def _build(spec: BackendSpec):
        if spec is None:
            return None
        if hasattr(spec, "generate") and hasattr(spec, "judge_id"):
            return spec
        if callable(spec):
            built = spec()
            if not (hasattr(built, "generate") and hasattr(built, "judge_id")):
                raise TypeError(
                    f"caption backend factory {spec!r} returned {type(built).__name__}, not a VLMJudge"
                )
            return built
        raise TypeError(f"caption backend must be a VLMJudge, a factory or None, got {type(spec).__name__}")

    def setup(self) -> None:
        if self._ready:
            return
        self._backend = self._build(self._backend_spec)
        self._rewriters = [self._build(s) for s in self._rewriter_specs] or [self._backend]
        self._ready = True

    def _cached_judge(self, judge, ctx: StageContext):
        cache = Path(self.cache_dir) if self.cache_dir else Path(ctx.stage_dir) / "cache"
        key = (id(judge), str(cache))
        if key not in self._cached:
            self._cached[key] = CachedJudge(
                judge,
                cache,
                max_attempts=self.max_attempts,
                backoff_s=self.backoff_s,
                retry_parse_failures=self.retry_parse_failures,
            )
        return self._cached[key]

    # --- one call --------------------------------------------------------------------------------------
    def _ask(
        self, judge, ctx, kind, lang, images, fields, item_id, stats
    ) -> tuple[str | None, str, str | None]:
        """(text, source, error) of one templated call."""
        tpl = self._templates.get(kind, lang)
        prompt = tpl.render(**fields)
        imgs = [judge_rgb(im, self.max_image_area) for im in images]
        cj = self._cached_judge(judge, ctx)
        before = cj.stats["backend_calls"]
        resp = cj.score(imgs, prompt, template=tpl, item_id=item_id)
        stats["backend_calls"] += cj.stats["backend_calls"] - before
        if resp.cached:
            stats["cache_hits"] += 1
        if not resp.ok:
            stats["failed"] += 1
            reason = (resp.error or "unknown").split(":", 1)[0]
            stats["failure_reasons"][reason] = stats["failure_reasons"].get(reason, 0) + 1
            return None, "vlm", resp.error or "unknown failure"
        text, err = tpl.extract(resp.raw_text)
        return text, ("cache" if resp.cached else "vlm"), err

    # --- rows ------------------------------------------------------------------------------------------
    def _row(self, row: dict, ctx: StageContext, stats: dict) -> tuple[dict, dict, dict]:
        """New texts, per-column sources and per-column errors of one kept row."""
        rid = str(row["id"])
        is_edit = bool(row.get("references"))
        out: dict[str, str | None] = {}
        src: dict[str, str] = {}
        errs: dict[str, str] = {}
        images: dict[str, Any] = {}

        def img(uri: str):
            if uri not in images:
                images[uri] = load_image(uri, ctx.root)
            return images[uri]

        for lang in self.languages:
            sfx = _SFX[lang]
            for fld in CAPTION_FIELDS:
                if fld not in self.fields or (fld != "caption" and not is_edit):
                    continue
                col = fld + sfx
                existing = row.get(col)
                if existing is not None and not self.overwrite:
                    out[col] = existing
                    src[col] = "existing"
                    continue
                text, source, err = None, "none", None
                judge = self._backend
                if fld == "instruction_concise":
                    pick = numpy_rng(ctx.seed, "caption-rewriter", rid, lang).integers(len(self._rewriters))
                    judge = self._rewriters[int(pick)]
                upstream = {
                    "instruction_concise": "instruction",
                    "instruction_user": "instruction_concise",
                }.get(fld)
                up_text = None
                if upstream is not None:
                    up_text = out.get(upstream + sfx, row.get(upstream + sfx))
                if judge is None:
                    err = "no caption backend configured"
                elif upstream is not None and not up_text:
                    err = f"upstream {upstream + sfx} is null"
                else:
                    try:
                        text, source, err = self._ask(
                            judge,
                            ctx,
                            _KIND[fld],
                            lang,
                            *self._inputs(fld, lang, row, rid, ctx, img, up_text),
                            item_id=f"{rid}:{col}",
                            stats=stats,
                        )
                    except (OSError, ValueError, ImageDecodeError) as e:
                        err = f"input: {e}"
                if text is None and self.fallback == "rule":
                    if existing is not None:
                        text, source = existing, "existing"
                    elif fld == "instruction_user" and up_text:
                        text, source = rule_user_like(up_text, lang, ctx.seed, rid), "rule"
                if err is not None:
                    errs[col] = err
                out[col] = text
                src[col] = source if text is not None else "none"
        return out, src, errs

    def _inputs(self, fld, lang, row, rid, ctx, img, up_text):
        """(images, template fields) of one call."""
        rng = numpy_rng(ctx.seed, "caption-style", rid, fld, lang)
        if fld == "caption":
            return [img(row["target"])], {}
        if fld == "instruction":
            refs = list(row["references"])
            return [*(img(u) for u in refs), img(row["target"])], {"n_inputs": str(len(refs))}
        if fld == "instruction_concise":
            levels, patterns = SIMPLIFICATION_LEVELS[lang], SYNTAX_PATTERNS[lang]
            return [], {
                "instruction": up_text,
                "level": levels[int(rng.integers(len(levels)))],
                "pattern": patterns[int(rng.integers(len(patterns)))],
            }
        personas, markers = PERSONAS[lang], HELP_MARKERS[lang]
        persona = personas[int(rng.integers(len(personas)))]
        marker = markers[int(rng.integers(len(markers)))] if rng.random() < self.help_ratio else None
        return [], {"instruction": up_text, "persona": persona, "help": help_line(lang, marker)}

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        self.setup()
        kept = kept_mask(table)
        rows = table.to_pylist()
        stats = {"rows": 0, "backend_calls": 0, "cache_hits": 0, "failed": 0, "failure_reasons": {},
                 "null_columns": 0, "sources": {}}  # fmt: skip
        cols = [f + _SFX[lang] for lang in self.languages for f in self.fields]
        new = {c: [r.get(c) for r in rows] for c in cols}
        ctype = [r.get("caption_type") for r in rows]
        meta: list[str | None] = [r.get("caption_meta") for r in rows]
        errors: list[str | None] = [r.get("caption_errors") for r in rows]
        reasons: list[str | None] = [None] * len(rows)
        model = {"backend": None if self._backend is None else self._backend.judge_id,
                 "rewriters": sorted({j.judge_id for j in self._rewriters if j is not None})}  # fmt: skip
        for i, (row, keep) in enumerate(zip(rows, kept)):
            if not keep:
                continue
            stats["rows"] += 1
            out, src, errs = self._row(row, ctx, stats)
            for c, v in out.items():
                new[c][i] = v
                stats["null_columns"] += v is None
                stats["sources"][src[c]] = stats["sources"].get(src[c], 0) + 1
            is_edit = bool(row.get("references"))
            if ctype[i] is None:
                ctype[i] = "instructive" if is_edit else "structured"
            used = {
                c: {
                    "source": src[c],
                    "template": self._templates.get(
                        _KIND[c.removesuffix("_zh")], "zh" if c.endswith("_zh") else "en"
                    ).template_hash[:16],
                }
                for c in out
            }
            meta[i] = json.dumps({"model": model, "columns": used}, sort_keys=True, ensure_ascii=False)
            errors[i] = json.dumps(errs, sort_keys=True, ensure_ascii=False) if errs else None
            primary = (
                out.get("instruction", row.get("instruction"))
                if is_edit
                else out.get("caption", row.get("caption"))
            )
            if self.drop_on_failure and not primary:
                reasons[i] = self.drop("failed")
        for c in cols:
            field = ALL_FIELDS.get(c)
            table = set_column(table, c, pa.array(new[c], type=field.type if field else pa.string()))
        table = set_column(table, "caption_type", pa.array(ctype, type=pa.string()))
        table = set_column(table, "caption_meta", pa.array(meta, type=pa.string()))
        table = set_column(table, "caption_errors", pa.array(errors, type=pa.string()))
        table = apply_drops(table, reasons)
        stats_path = Path(ctx.stage_dir) / "stats" / f"{ctx.partition or 'all'}.json"
        atomic_write_text(stats_path, json.dumps(stats, indent=1, sort_keys=True))
        if stats["failed"]:
            log.warning(
                "caption %s: %d failed calls %s", ctx.partition, stats["failed"], stats["failure_reasons"]
            )
        self.last_stats = stats
        return table
