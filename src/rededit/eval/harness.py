"""The benchmark harness behind ``rededit-eval``: edit a benchmark with a checkpoint, score the edits, report.

    rededit-eval checkpoint=outputs/demo/export benchmark.manifest_path=outputs/demo/corpus/manifest.parquet \\
        out_dir=outputs/demo/eval sampler.seeds=[0,1,2]
    rededit-eval checkpoint=runs/sft/last.ckpt raw=true eval/benchmark@benchmark=redbench benchmark.folder=/data/redbench \\
        out_dir=outputs/eval/redbench ocr=rapidocr

(Hydra config: ``conf/eval.yaml``; benchmark nodes in ``conf/eval/benchmark/``.) Steps, after report §4–§5:

1. **Generate** (:func:`generate_edits`): every item is cover-resized to the editor's training bucket set
   (eq. (1); ``data.buckets`` of the saved config) or, without one, to its size rounded to the backbone's
   multiple under an area cap; the edit loop (:mod:`rededit.inference.edit_loop`) batches items of identical
   shapes and passes their object boxes, and each edit is written atomically to
   ``out_dir/images/<seed>/<id>.png``. **Resumable**: an item whose PNG exists is not generated again, and
   each item's noise derives from (seed, item id) alone, so an interrupted and resumed run writes the same
   pixels as an uninterrupted one (and the demo report, sample grids and DPO pair making edit an item the
   same way). ``generation.json`` pins what the images depend on (checkpoint and
   benchmark hashes, steps, CFG, negative prompt, language, batching); re-running into the same folder
   with other settings fails instead of mixing images.
2. **Score** (:func:`score_edits`) each edit, and two reference "systems" through the same code: the
   **identity** baseline (Picture 1 returned unchanged, resized to the output size) and the **ground
   truth** (where the benchmark has one):

   * reference metrics where a ground truth exists (MagicBrush / Emu Edit L1/L2, PSNR, SSIM via
     torchmetrics, edit-region error and PSNR outside the edit mask; :mod:`rededit.scoring.edit_metrics`);
   * programmatic judges on the synthetic bench (``success`` = passed, ``judge_score``;
     :mod:`rededit.scoring.judges.programmatic`);
   * the OCR metric (§4.2) on items with an OCR target when ``ocr`` names a backend;
   * a VLM judge when ``judge`` is configured. A failed judge call is a failure, never a 0. With a
     benchmark's own ``prompts.json`` (REDEdit-Bench) the judge sees source + result for every task, and
     judge scores aggregate as the benchmark's scorer does: item = mean of its dimensions, category = mean
     of its items, overall = mean of the categories (:func:`summarize_by_category`).

   Every metric the user configured (``ocr``, ``judge``) is built, or its endpoint reached, before the first
   edit is generated, and one that cannot be is an error; only a default-on metric whose optional module
   is missing (``metrics.programmatic``) is skipped with a warning and listed in ``metrics.json``. A judge
   whose endpoint stops answering stops the run; one whose failure rate (failed calls / judged edits) ends
   above ``judge.max_failure_rate`` (default 0.05) fails the run after the report is written.
3. **Report** (all atomic): ``metrics.json`` (per category and overall; mean ± std over seeds; checkpoint
   sha256, benchmark hash, judge id and prompt-template hash, sampler settings, package versions),
   ``table.md`` / ``table.csv`` (per category: model, identity, ground truth), ``chart.png``,
   ``grids/<category>.png`` (Picture 1 | instruction | edit | ground truth) and ``samples.json`` (every
   per-sample score, judge detail and OCR reading).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rededit.data.images import resize_to_bucket, to_tensor
from rededit.eval.provenance import check_generation_settings, checkpoint_hash, package_versions
from rededit.eval.tables import (
    category_order,
    display_category,
    plot_chart,
    render_csv,
    render_grid,
    render_markdown,
)
from rededit.flow.path import scheduler_settings
from rededit.inference.edit_loop import EditRequest, iter_edits
from rededit.inference.editor import load_editor, load_loras
from rededit.inference.images import save_image, tensor_to_pil
from rededit.inference.sizing import bucket_max_area, editor_buckets, sizes_fn
from rededit.scoring.edit_metrics import METRIC_KEYS, aggregate, reference_metrics
from rededit.scoring.judges.prompts import BUILTIN_PROMPT_SETS, builtin_prompt_set, load_rededit_prompts
from rededit.scoring.judges.vlm import CachedJudge, g_overall
from rededit.scoring.ocr_metric import ocr_scores
from rededit.utils.io import atomic_write_text, json_safe, write_json
from rededit.utils.logging import get_logger
from rededit.utils.progress import Progress, track

log = get_logger(__name__)


# ------------------------------------------------------------------------------------------- item prep
@dataclasses.dataclass
class Prepared:
    """An item at the editor's sizes, as tensors ``[C, H, W]`` in [-1, 1] (mask ``[1, H, W]`` in {0, 1})."""

    item: Any
    text: str
    refs: list[torch.Tensor]
    target: torch.Tensor | None
    mask: torch.Tensor | None
    source: torch.Tensor | None  # Picture 1 at the output size: the identity baseline's "edit"
    hw: tuple[int, int]

    @property
    def key(self) -> tuple:
        return (self.hw, tuple(tuple(r.shape[1:]) for r in self.refs))


def prepare(item: Any, sizes: Callable, language: str = "en") -> Prepared:
    """Resize an item to the editor's sizes and convert it to tensors.

    The identity baseline's image (``source``) is Picture 1 at the output size: the resized Picture 1 when
    its bucket is the output's; else (quarter turns, low-resolution restores: the source has another shape
    than the target) Picture 1 stretched to the output size, as the programmatic judges' own baseline
    (:func:`rededit.scoring.judges.programmatic.bench_sample`) does.
    """
    from PIL import Image

    dst = sizes([item.output_hw] + [(r.height, r.width) for r in item.references])
    it = item.resized(dst[0], dst[1:])
    h, w = dst[0]
    refs = [to_tensor(r) for r in it.references]
    source = None
    if refs:
        source = (
            refs[0]
            if tuple(refs[0].shape[1:]) == (h, w)
            else to_tensor(item.references[0].resize((w, h), Image.Resampling.BICUBIC))
        )
    mask = (to_tensor(it.edit_mask, mask=True) > 0.5).float() if it.edit_mask is not None else None
    target = to_tensor(it.target) if it.target is not None else None
    return Prepared(it, item.text(language), refs, target, mask, source, (h, w))


def prepare_or_record(
    bench: Any, i: int, sizes: Callable, language: str, failed: dict[str, str] | None
) -> Prepared | None:
    """Item ``i`` prepared, or None when it cannot be read or resized: the failure is recorded in ``failed``
    (``{item id: "ExceptionType: message"}``) and the run goes on with the other items."""
    try:
        return prepare(bench[i], sizes, language)
    except Exception as err:  # one unreadable item must not abort a whole benchmark run
        item_id = str(bench.records[i].get("id", i)) if hasattr(bench, "records") else str(i)
        if failed is not None and item_id not in failed:
            failed[item_id] = f"{type(err).__name__}: {err}"
            log.warning("item %s failed and is left out: %s", item_id, failed[item_id])
        return None


def image_path(out_dir: Path, seed: int, item_id: str) -> Path:
    return out_dir / "images" / str(seed) / f"{item_id}.png"


# ------------------------------------------------------------------------------------------ generation
def edit_request(p: Prepared) -> EditRequest:
    """The edit loop's request for a prepared item (its object boxes are at the output size already)."""
    return EditRequest(
        id=p.item.id, text=p.text, references=p.refs, hw=p.hw, object_boxes=p.item.object_boxes
    )


def generate_edits(
    editor: Any,
    bench: Any,
    out_dir: str | os.PathLike,
    *,
    seeds: Sequence[int],
    sizes: Callable,
    steps: int | None,
    cfg_scale: float | None,
    negative_prompt: str | None,
    language: str = "en",
    batch_size: int = 8,
    chunk_size: int = 64,
    max_items: int | None = None,
    failed: dict[str, str] | None = None,
) -> int:
    """Write ``out_dir/images/<seed>/<id>.png`` for every item and seed not written yet (module docstring).

    Items are prepared ``chunk_size`` at a time and edited by :func:`rededit.inference.edit_loop.iter_edits`
    (each item's noise from (seed, item id), so an interrupted run resumes with identical images).

    Args:
        max_items: only the first ``max_items`` items are written.
        failed: collects the items that could not be read (see :func:`prepare_or_record`).

    Returns:
        the number of images generated in this call.
    """
    out_dir = Path(out_dir)
    n = len(bench) if max_items is None else min(len(bench), int(max_items))
    written = 0
    exists = sum(image_path(out_dir, s, bench.records[i]["id"]).is_file() for i in range(n) for s in seeds)
    bar = Progress(
        n * len(seeds), "generate", unit="edits", initial=exists
    )  # totals, also outside a terminal
    for lo in range(0, n, chunk_size):
        window = list(range(lo, min(lo + chunk_size, n)))
        todo = {
            s: [i for i in window if not image_path(out_dir, s, bench.records[i]["id"]).is_file()]
            for s in seeds
        }
        if not any(todo.values()):
            continue
        prep = {
            i: prepare_or_record(bench, i, sizes, language, failed)
            for i in sorted({i for t in todo.values() for i in t})
        }
        for seed in seeds:
            requests = [edit_request(prep[i]) for i in todo[seed] if prep[i] is not None]
            bar.update(len(todo[seed]) - len(requests))  # unreadable items: recorded in `failed`
            kwargs = dict(steps=steps, cfg_scale=cfg_scale, negative_prompt=negative_prompt)
            for batch, pred in iter_edits(editor, requests, seed=seed, batch_size=batch_size, **kwargs):
                for j, k in enumerate(batch):
                    save_image(tensor_to_pil(pred[j]), image_path(out_dir, seed, requests[k].id))
                    written += 1
                bar.update(len(batch))
            log.info("seed %d: %d new edits in items %d..%d", seed, len(requests), window[0], window[-1])
    bar.close()
    return written


# -------------------------------------------------------------------------------------------- scoring
@dataclasses.dataclass
class Scorers:
    """The metric functions of one evaluation (None = not configured or not available)."""

    reference: bool = True
    programmatic: Callable | None = None
    ocr: Any = None
    vlm: Any = None
    vlm_reference_rows: bool = True
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def _judge_sample(p: Prepared) -> dict[str, Any]:
    it = p.item
    return {
        "source": p.source,
        "references": p.refs,
        "target": p.target,
        "edit_mask": p.mask,
        "object_boxes": it.object_boxes,
        "task": it.task,
        "instruction": p.text,
        "ocr_target": it.ocr_target,
    }


def score_one(pred: torch.Tensor, p: Prepared, scorers: Scorers, *, use_vlm: bool = True) -> dict[str, Any]:
    """Every configured metric of one edit ``pred`` ``[3, H, W]`` in [-1, 1] of the prepared item ``p``."""

    out: dict[str, Any] = {}
    it = p.item
    if scorers.reference and p.target is not None:
        out.update(reference_metrics(pred, p.target, p.mask, p.source))
    if scorers.programmatic is not None and p.target is not None:
        try:
            res = scorers.programmatic(pred, _judge_sample(p), ocr=scorers.ocr)
        except (NotImplementedError, KeyError, ValueError) as err:
            # A task without a check is reported as such, never as a failure.
            out["judge_error"] = f"{type(err).__name__}: {err}"
        else:
            # An undecided verdict (nothing to compare, OCR call failed) is left out of the success rate.
            defined = bool(getattr(res, "defined", True))
            score = None if res.score is None or not math.isfinite(float(res.score)) else float(res.score)
            out["success"] = float(bool(res.passed)) if defined else None
            out["judge_score"] = score if defined else None
            out["judge_undecided"] = 0.0 if defined else 1.0
            out["judge_detail"] = json_safe(res.detail, fallback=str)
    if scorers.ocr is not None and it.ocr_target:
        try:
            text = scorers.ocr.read_text(tensor_to_pil(pred))
        except Exception as err:
            out["ocr_error"] = f"{type(err).__name__}: {err}"
        else:
            s = ocr_scores(text, it.ocr_target)
            out.update({"ocr_text": text, "ocr_score": s.score, "ocr_completion_rate": s.completion_rate})
            out.update({"ocr_word_accuracy": s.word_accuracy, "ocr_ned": s.normalised_edit_distance})
    if scorers.vlm is not None and use_vlm:
        out.update(scorers.vlm.score(pred, p))
    return out


@dataclasses.dataclass
class VLMScorer:
    """A VLM judge (usually a :class:`~rededit.scoring.judges.vlm.CachedJudge`) with its prompt set.

    ``gedit``: the GEdit protocol, two calls per item (templates ``sc`` and ``pq``) and
    ``vlm_score = G_O = sqrt(G_SC · G_PQ)``; otherwise the item's task template and ``vlm_score`` = the
    mean of its dimensions. A failed call (backend error, refusal, unparseable) gives ``vlm_failed = 1``
    and no score: failures are counted, never averaged in as 0.
    """

    judge: Any
    prompts: Any
    gedit: bool = False

    def score(self, pred: torch.Tensor, p: Prepared) -> dict[str, Any]:
        images = {
            "source": tensor_to_pil(p.source) if p.source is not None else None,
            "reference": tensor_to_pil(p.refs[1]) if len(p.refs) > 1 else None,
            "edited": tensor_to_pil(pred),
        }
        names = ("sc", "pq") if self.gedit else (p.item.task,)
        out: dict[str, Any] = {}
        for name in names:
            try:
                t = self.prompts.template(name)
            except KeyError as err:
                return {"vlm_failed": 1.0, "vlm_error": f"no template: {err}"}
            missing = [r for r in t.image_roles if images.get(r) is None]
            if missing:
                return {"vlm_failed": 1.0, "vlm_error": f"item has no {missing} image for the template"}
            resp = self.judge.score(
                [images[r] for r in t.image_roles], t.render(p.text), t, item_id=p.item.id
            )
            scores = resp.scores if resp.ok else None
            if not scores:
                if str(resp.error).startswith("backend:") and hasattr(self.judge, "check_reachable"):
                    self.judge.check_reachable()  # a server that went away stops the run, not every item
                return {"vlm_failed": 1.0, "vlm_error": str(resp.error)}
            out.update({f"vlm_{k}": float(v) for k, v in scores.items()})
        if self.gedit:
            out["vlm_score"] = g_overall(out["vlm_G_SC"], out["vlm_G_PQ"])
        else:
            vals = [v for k, v in out.items() if k.startswith("vlm_")]
            out["vlm_score"] = sum(vals) / len(vals)
        return {"vlm_failed": 0.0, **out}


def _load_png(path: Path, hw: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if img.size != (hw[1], hw[0]):
        img = resize_to_bucket(img, hw[0], hw[1])
    return to_tensor(img)


def score_edits(
    bench: Any,
    out_dir: str | os.PathLike,
    *,
    seeds: Sequence[int],
    sizes: Callable,
    scorers: Scorers,
    language: str = "en",
    reference_rows: bool = True,
    max_items: int | None = None,
    grid_per_category: int = 4,
    failed: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Per-sample rows of every system: ``({"model": {seed: rows}, "identity": rows, "ground_truth": rows}, grid)``.

    Items whose edit is missing for a seed are skipped for that seed with a warning; items that cannot be
    read are recorded in ``failed`` and left out.
    """
    out_dir = Path(out_dir)
    n = len(bench) if max_items is None else min(len(bench), int(max_items))
    rows: dict[str, Any] = {"model": {s: [] for s in seeds}, "identity": [], "ground_truth": []}
    grid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    missing = 0
    for i in track(range(n), desc="score", unit="items"):
        p = prepare_or_record(bench, i, sizes, language, failed)
        if p is None:
            continue
        it = p.item
        base = {"id": it.id, "task": it.task, "category": it.category}
        first_pred, first_row = None, {}
        for seed in seeds:
            path = image_path(out_dir, seed, it.id)
            if not path.is_file():
                missing += 1
                continue
            pred = _load_png(path, p.hw)
            rows["model"][seed].append({**base, "seed": seed, **score_one(pred, p, scorers)})
            if first_pred is None:
                first_pred, first_row = pred, rows["model"][seed][-1]
        if reference_rows:
            use_vlm = scorers.vlm_reference_rows
            ident = score_one(p.source, p, scorers, use_vlm=use_vlm) if p.source is not None else {}
            rows["identity"].append({**base, **ident})
            if p.target is not None:
                rows["ground_truth"].append({**base, **score_one(p.target, p, scorers, use_vlm=use_vlm)})
        if len(grid[it.category]) < grid_per_category:
            grid[it.category].append(
                {
                    "task": it.task,
                    "text": p.text,
                    "references": p.refs,
                    "target": p.target,
                    "pred": first_pred,
                    "metrics": {k: first_row.get(k) for k in ("error_ratio", "psnr_outside")},
                }
            )
    if missing:
        log.warning("%d edits missing from %s (not generated yet?); they are not scored", missing, out_dir)
    return rows, dict(grid)


# ---------------------------------------------------------------------------------------- aggregation
_NON_METRIC = {"id", "task", "category", "seed"}


def _metric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if (
                k not in _NON_METRIC
                and (v is None or isinstance(v, (int, float)))
                and not isinstance(v, bool)
            ):
                keys[k] = None
    return list(keys)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and defined-count of every numeric metric over rows; ``error_ratio`` as a ratio of means."""
    out: dict[str, Any] = {"n": len(rows)}
    if any(r.get("edit_region_error") is not None for r in rows):
        out.update(aggregate(rows))
    for key in _metric_keys(rows):
        if key in METRIC_KEYS and key in out:
            continue
        vals = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        out[key] = sum(vals) / len(vals) if vals else None
        out[f"{key}_count"] = len(vals)
    return out


def is_judge_score(key: str) -> bool:
    """A VLM judge score (``vlm_score``, ``vlm_<dimension>``), as opposed to its failure flag and counts."""
    return key.startswith("vlm_") and key != "vlm_failed" and not key.endswith("_count")


JUDGE_AGGREGATION = (
    "item = mean of its judge dimensions; category = mean of its items; overall = mean of the categories "
    "(REDEdit-Bench's official aggregation); failed calls are left out and counted in vlm_failed"
)


def summarize_by_category(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """:func:`summarize` per category and overall.

    VLM judge scores follow the REDEdit-Bench aggregation (:data:`JUDGE_AGGREGATION`): their overall value is
    the mean of the category means, so a category with many items weighs no more than one with few (the
    benchmark's categories hold 47 to 156 items). Every other metric's overall value is the mean over items.
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[str(r["category"])].append(r)
    cats = {c: summarize(groups[c]) for c in groups}
    overall = summarize(rows)
    for key in [k for k in overall if is_judge_score(k)]:
        means = [float(st[key]) for st in cats.values() if st.get(key) is not None]
        overall[key] = sum(means) / len(means) if means else None
    return {"overall": overall, "categories": cats}


def combine_seeds(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """``{metric: {mean, std, n_seeds}}`` per category and overall; std (ddof 1) only with ≥ 2 seeds."""

    def merge(stats: list[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": max((s.get("n", 0) for s in stats), default=0)}
        keys = [
            k for k in dict.fromkeys(k for s in stats for k in s) if k != "n" and not k.endswith("_count")
        ]
        for k in keys:
            vals = [
                float(s[k])
                for s in stats
                if isinstance(s.get(k), (int, float)) and math.isfinite(float(s[k]))
            ]
            out[k] = {
                "mean": sum(vals) / len(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) >= 2 else None,
                "n_seeds": len(vals),
                "count": sum(int(s.get(f"{k}_count", 0) or 0) for s in stats),
            }
        return out

    seeds = list(per_seed)
    cats = list(dict.fromkeys(c for s in seeds for c in per_seed[s]["categories"]))
    return {
        "overall": merge([per_seed[s]["overall"] for s in seeds]),
        "categories": {
            c: merge([per_seed[s]["categories"][c] for s in seeds if c in per_seed[s]["categories"]])
            for c in cats
        },
    }


# ---------------------------------------------------------------------------------------------- runner
class MetricUnavailableError(RuntimeError):
    """A metric the user asked for (``ocr=``, ``judge=``) cannot be built: the evaluation stops before it
    generates anything instead of reporting without it."""


class JudgeFailureRateError(RuntimeError):
    """More judge calls failed than ``judge.max_failure_rate`` allows; raised after the report is written."""


DEFAULT_MAX_FAILURE_RATE = 0.05


def _build_scorers(cfg: DictConfig, bench: Any) -> tuple[Scorers, dict[str, Any]]:
    """Metric functions from the config, built before any edit is generated.

    A metric the user configured (``ocr``, ``judge``) that cannot be built is an error
    (:class:`MetricUnavailableError`); only a default-on metric whose optional module is missing
    (``metrics.programmatic``) is skipped with a warning and listed in ``skipped_metrics``. The VLM judge is
    only checked here (:func:`preflight_judge`: its class imports, its settings hold, its endpoint answers);
    :func:`attach_judge` builds it after generation, so a local judge model never shares memory with the
    editor.
    """
    sc = Scorers(reference=bool(cfg.metrics.get("reference", True)))
    judge_info: dict[str, Any] = {"judge_id": None, "prompt_template_hash": None, "programmatic": None}
    if cfg.get("ocr"):
        node = cfg.ocr
        name = node if isinstance(node, str) else node.get("name")
        try:
            from rededit.scoring.ocr import build_ocr_backend

            if isinstance(node, str):
                sc.ocr = build_ocr_backend(node)
            else:
                kw = OmegaConf.to_container(node, resolve=True)
                sc.ocr = build_ocr_backend(kw.pop("name"), **kw)
        except Exception as err:  # asked for by the user: never skipped
            raise MetricUnavailableError(
                f"ocr={name} was asked for but cannot be built ({type(err).__name__}: {err}); install its "
                "extra (pip install -e .[ocr]) or drop ocr="
            ) from err
    if cfg.metrics.get("programmatic", True) and bench.has_ground_truth:
        try:
            from rededit.scoring.judges.programmatic import judge

            sc.programmatic = judge
            judge_info["programmatic"] = "rededit.scoring.judges.programmatic"
        except ImportError as err:  # on by default: a missing optional module skips it
            log.warning("programmatic judges skipped: %s", err)
            sc.skipped["programmatic"] = str(err)
    if cfg.get("judge"):
        preflight_judge(OmegaConf.to_container(cfg.judge, resolve=True))
    return sc, judge_info


def max_failure_rate(node: Mapping[str, Any]) -> float:
    """``judge.max_failure_rate`` (default :data:`DEFAULT_MAX_FAILURE_RATE`), checked to lie in [0, 1]."""
    value = node.get("max_failure_rate", DEFAULT_MAX_FAILURE_RATE)
    try:
        rate = float(DEFAULT_MAX_FAILURE_RATE if value is None else value)
    except (TypeError, ValueError):
        rate = math.nan
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"judge.max_failure_rate must be a number in [0, 1], got {value!r}")
    return rate


def preflight_judge(node: Mapping[str, Any]) -> None:
    """Check a ``judge`` node before anything is generated: a backend ``_target_`` that imports, a valid
    ``max_failure_rate``, and the backend's own :meth:`~rededit.scoring.judges.vlm.VLMJudge.preflight` (an
    OpenAI-compatible endpoint must answer: :class:`~rededit.scoring.judges.vlm.JudgeUnreachableError`
    names it otherwise)."""
    from hydra.utils import get_class

    backend = node.get("backend")
    if not isinstance(backend, Mapping) or not backend.get("_target_"):
        raise ValueError(
            "judge: needs a `backend` node with a _target_ (e.g. rededit.scoring.judges.vlm.OpenAICompatibleJudge)"
        )
    max_failure_rate(node)
    target = str(backend["_target_"])
    try:
        cls = get_class(target)
    except Exception as err:
        raise MetricUnavailableError(
            f"judge.backend._target_={target} was asked for but cannot be imported ({err})"
        ) from err
    check = getattr(cls, "preflight", None)
    if callable(check):
        check(**{k: v for k, v in backend.items() if not str(k).startswith("_")})


def attach_judge(sc: Scorers, judge_info: dict[str, Any], cfg: DictConfig, bench: Any) -> None:
    """Build the configured VLM judge into ``sc`` (after generation); a failure to build is an error."""
    node = OmegaConf.to_container(cfg.judge, resolve=True)
    try:
        sc.vlm = build_vlm_scorer(node, bench, Path(cfg.out_dir))
    except ImportError as err:
        raise MetricUnavailableError(f"judge was asked for but cannot be built: {err}") from err
    sc.vlm.judge.check_reachable()  # the endpoint may have gone away while the edits were generated
    sc.vlm_reference_rows = bool(node.get("reference_rows", True))
    judge_info["judge_id"] = sc.vlm.judge.judge_id
    judge_info["prompt_template_hash"] = sc.vlm.prompts.set_hash
    judge_info["judge_prompts"] = sc.vlm.prompts.describe()


def _prompt_set(spec: str, bench: Any) -> Any:
    """``benchmark`` (the benchmark's own prompts.json, else the built-in set of its protocol), a built-in
    set name (``rededit_generic``, ``rededit_text``, ``imgedit``, ``gedit``) or a ``prompts.json`` path."""
    if spec == "benchmark":
        path = getattr(bench, "prompts_path", None)
        if path is not None:
            return load_rededit_prompts(path)
        spec = {"gedit": "gedit", "imgedit": "imgedit"}.get(bench.name, "rededit_generic")
    if spec in BUILTIN_PROMPT_SETS:
        return builtin_prompt_set(spec)
    return load_rededit_prompts(spec)


def build_vlm_scorer(node: Mapping[str, Any], bench: Any, out_dir: Path) -> VLMScorer:
    """The ``judge`` config node → :class:`VLMScorer` (backend wrapped in a caching, retrying judge).

    Keys: ``backend`` (a ``_target_`` node: ``TransformersVLMJudge``, ``OpenAICompatibleJudge``, ...),
    ``prompts`` (see :func:`_prompt_set`), ``cache_dir`` (default ``out_dir/judge_cache``), ``max_attempts``,
    ``retry_parse_failures``.
    """
    from hydra.utils import instantiate

    node = dict(node)
    if node.get("backend") is None:
        raise ValueError(
            "judge: needs a `backend` node with a _target_ (e.g. rededit.scoring.judges.vlm.OpenAICompatibleJudge)"
        )
    backend = instantiate(node["backend"])
    judge = CachedJudge(
        backend,
        node.get("cache_dir") or out_dir / "judge_cache",
        max_attempts=int(node.get("max_attempts", 3)),
        retry_parse_failures=bool(node.get("retry_parse_failures", False)),
    )
    prompts = _prompt_set(str(node.get("prompts", "benchmark")), bench)
    return VLMScorer(judge, prompts, gedit=prompts.name == "gedit")


def judge_failure_rate(rows: Mapping[str, Any]) -> tuple[float | None, int]:
    """Fraction of judged rows (model and reference rows) whose judge call failed, and how many were judged."""
    flat = [r for seed_rows in rows["model"].values() for r in seed_rows]
    flat += list(rows["identity"]) + list(rows["ground_truth"])
    flags = [float(r["vlm_failed"]) for r in flat if r.get("vlm_failed") is not None]
    return (sum(flags) / len(flags) if flags else None), len(flags)


def _judge_failures(scorers: Scorers, rows: Mapping[str, Any], limit: float) -> dict[str, Any] | None:
    judge = scorers.vlm.judge if scorers.vlm is not None else None
    if judge is None:
        return None
    rate, judged = judge_failure_rate(rows)
    out: dict[str, Any] = {"failure_rate": rate, "judged": judged, "max_failure_rate": limit}
    if hasattr(judge, "stats"):
        out["stats"] = dict(judge.stats)
        out["failed"] = [dataclasses.asdict(f) for f in judge.failed][:1000]
    return out


def evaluate(cfg: DictConfig, *, editor: Any = None, bench: Any = None) -> dict[str, Any]:
    """Run generation, scoring and the report for a composed ``conf/eval.yaml`` (module docstring).

    Args:
        cfg: the config.
        editor: an editor to use instead of loading ``cfg.checkpoint`` (tests); its weights are still hashed
            from ``cfg.checkpoint``.
        bench: a benchmark to use instead of instantiating ``cfg.benchmark``.

    Returns:
        the content of ``metrics.json`` plus ``files``.
    """
    from hydra.utils import instantiate

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in cfg.sampler.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"sampler.seeds must be a non-empty list of distinct ints, got {seeds}")
    language = str(cfg.get("language", "en"))

    cmap = None
    try:
        from rededit.scoring.categories import load_category_map

        cmap = load_category_map(cfg.get("categories"))
    except ImportError as err:
        log.warning("category map unavailable (%s): categories are task names", err)
    if bench is None:
        # _partial_: passing the map through instantiate's kwargs would turn the dataclass into a config node.
        bench = instantiate(cfg.benchmark, _partial_=True)(
            category_map=cmap if cmap is not None else "default"
        )
    # Every metric the user asked for is built (or its endpoint reached) before the editor is loaded and
    # hours go into generation.
    scorers, judge_info = _build_scorers(cfg, bench)
    failure_limit = max_failure_rate(cfg.judge) if cfg.get("judge") else None
    device = cfg.get("device") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if editor is None:
        editor = load_editor(cfg.checkpoint, device, raw=bool(cfg.raw))
    # lora=[PATH[:SCALE], ...] (issue 20): applied as in rededit-edit --lora; their hashes and strengths pin the
    # edits (None without LoRAs, so out_dirs written before this key existed still resume).
    loras = load_loras(editor, [str(x) for x in cfg.get("lora") or []])
    lora_pins = [{"sha256": r["sha256"], "scale": r["scale"]} for r in loras] or None
    buckets = (
        OmegaConf.to_container(cfg.buckets, resolve=True) if cfg.get("buckets") else editor_buckets(editor)
    )
    max_area = cfg.get("max_area") or bucket_max_area(getattr(editor, "inference_config", None))
    sizes = sizes_fn(editor, buckets, max_area)

    steps = int(cfg.sampler.steps or getattr(editor, "sample_steps", 8))
    cfg_scale = float(cfg.sampler.cfg if cfg.sampler.cfg is not None else getattr(editor, "cfg_scale", 1.0))
    neg = cfg.sampler.negative_prompt
    neg = str(neg) if neg is not None else str(getattr(editor, "negative_prompt", ""))
    ckpt_sha = checkpoint_hash(cfg.checkpoint, bool(cfg.raw))

    sampler = {
        "steps": steps,
        "cfg": cfg_scale,
        "negative_prompt": neg,
        "seeds": seeds,
        # generate() uses the editor's pipeline-folder scheduler config (issue 19), else Qwen-Image's constants:
        # the dynamic exponential shift (μ from the token count), no fixed shift.
        "shift": {
            k: scheduler_settings(getattr(getattr(editor, "backbone", None), "scheduler_config", None))[k]
            for k in ("base_shift", "max_shift", "shift_terminal", "use_dynamic_shifting")
        },
        "batch_size": int(cfg.sampler.batch_size),
        "chunk_size": int(cfg.sampler.chunk_size),
        "language": language,
        "buckets": buckets,
        "max_area": max_area,
    }
    check_generation_settings(
        out_dir,
        {
            "checkpoint_sha256": ckpt_sha,
            "loras": lora_pins,
            "benchmark_hash": bench.benchmark_hash,
            # Noise is drawn per item (inference.edit_loop.edit_seed): batching does not change an edit.
            **{k: v for k, v in sampler.items() if k not in ("seeds", "batch_size", "chunk_size")},
        },
        bool(cfg.get("overwrite", False)),
    )

    failed: dict[str, str] = {}
    n_new = generate_edits(
        editor,
        bench,
        out_dir,
        seeds=seeds,
        sizes=sizes,
        steps=steps,
        cfg_scale=cfg_scale,
        negative_prompt=neg,
        language=language,
        batch_size=sampler["batch_size"],
        chunk_size=sampler["chunk_size"],
        max_items=cfg.get("max_items"),
        failed=failed,
    )
    log.info("generated %d new edits into %s", n_new, out_dir / "images")

    if scorers.vlm is None and cfg.get("judge"):
        attach_judge(scorers, judge_info, cfg, bench)
    rows, grid = score_edits(
        bench,
        out_dir,
        seeds=seeds,
        sizes=sizes,
        scorers=scorers,
        language=language,
        reference_rows=bool(cfg.metrics.get("reference_rows", True)),
        max_items=cfg.get("max_items"),
        grid_per_category=int(cfg.get("grid_per_category", 4)),
        failed=failed,
    )
    per_seed = {s: summarize_by_category(rows["model"][s]) for s in seeds}
    systems: dict[str, Any] = {"model": combine_seeds(per_seed)}
    for name in ("identity", "ground_truth"):
        if rows[name]:
            systems[name] = combine_seeds({0: summarize_by_category(rows[name])})

    result: dict[str, Any] = {
        "checkpoint": {
            "path": str(cfg.checkpoint),
            "weights": getattr(editor, "weights", "raw" if cfg.raw else "ema"),
            "sha256": ckpt_sha,
        },
        "loras": loras,
        "benchmark": {**bench.describe(), "max_items": cfg.get("max_items")},
        **judge_info,
        "ocr_backend": repr(scorers.ocr) if scorers.ocr is not None else None,
        "judge_failures": _judge_failures(scorers, rows, failure_limit),
        "sampler": sampler,
        "versions": package_versions(),
        "skipped_metrics": scorers.skipped,
        "judge_aggregation": JUDGE_AGGREGATION if scorers.vlm is not None else None,
        "categories": {c: display_category(c, cmap) for c in category_order(systems, cmap)},
        "systems": systems,
        "per_seed": {str(s): per_seed[s] for s in seeds},
        "new_edits": n_new,
        "failed_items": dict(
            sorted(failed.items())
        ),  # {id: reason}: unreadable items, left out of every number
    }
    if failed:
        log.warning("%d item(s) could not be read and are left out (metrics.json: failed_items)", len(failed))
    files: dict[str, str] = {}
    grid_dir = out_dir / "grids"

    result["grids"] = []
    for cat in category_order({"grid": {"categories": grid}}, cmap):
        save_image(render_grid(grid[cat]), grid_dir / f"{cat}.png")
        result["grids"].append(cat)
    files["chart"] = str(plot_chart(systems, cmap, out_dir / "chart.png"))
    atomic_write_text(out_dir / "table.md", render_markdown(result, systems, cmap))
    atomic_write_text(out_dir / "table.csv", render_csv(systems, cmap))
    samples = [r for s in seeds for r in rows["model"][s]]
    samples += [{**r, "system": "identity"} for r in rows["identity"]]
    samples += [{**r, "system": "ground_truth"} for r in rows["ground_truth"]]
    write_json(out_dir / "samples.json", samples)
    write_json(out_dir / "metrics.json", result)
    files.update(
        metrics=str(out_dir / "metrics.json"),
        table_md=str(out_dir / "table.md"),
        table_csv=str(out_dir / "table.csv"),
        samples=str(out_dir / "samples.json"),
    )
    log.info("rededit-eval: report in %s", out_dir / "table.md")
    jf = result["judge_failures"]
    if jf is not None and jf["failure_rate"] is not None and jf["failure_rate"] > jf["max_failure_rate"]:
        raise JudgeFailureRateError(
            f"judge failure rate {jf['failure_rate']:.3f} over {jf['judged']} judged edits is above "
            f"judge.max_failure_rate={jf['max_failure_rate']:g}: the judge scores in {out_dir / 'table.md'} "
            "rest on too few answers (the failed calls are listed in metrics.json judge_failures; answers "
            "are cached, so a re-run asks only for the failed ones)"
        )
    return {**json_safe(result), "files": files}
