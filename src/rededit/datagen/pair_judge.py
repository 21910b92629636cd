"""The VLM judge of ``rededit-data make-pairs --judge`` (report §3.6.1: Mix-Policy pairs with VLM-filtered
negatives), built from the same ``judge`` node ``rededit-eval`` takes (``conf/eval.yaml``)::

    judge:                         # the file may hold this node under `judge:` or be the node itself
      backend: {_target_: rededit.scoring.judges.vlm.OpenAICompatibleJudge, base_url: ..., model: ...}
      prompts: rededit_generic     # benchmark | rededit_generic | rededit_text | imgedit | gedit | prompts.json
      max_attempts: 3
      retry_parse_failures: false
      max_failure_rate: 0.05

Each edit is scored as ``rededit-eval`` scores a model edit with that node: the row's task template of the
prompt set, the images its ``image_roles`` name (``source`` = Picture 1 at the edit's size, ``reference`` =
Picture 2, ``edited``), the row's instruction; the score is the mean of the template's dimensions (GEdit:
``G_O = sqrt(G_SC · G_PQ)``). ``prompts: benchmark`` means what it means for ``rededit-eval`` on a manifest
(the synthetic benchmark): ``rededit_generic``. Answers are cached (:class:`~rededit.scoring.judges.vlm.CachedJudge`,
under ``--judge-cache`` or ``OUT/judge_cache``; a ``cache_dir`` in the file is ignored: a handed-over config must
not choose where this run writes). A failed call (backend error, refusal, unparseable answer) is a failure,
counted and reported, never a score of 0.

Why not :class:`rededit.eval.harness.VLMScorer` itself: ``datagen`` sits below ``eval`` in the layers, so the
few lines that map a row onto the template's images are repeated here over the same ``scoring.judges`` parts.

A config may come from anyone: its backend ``_target_`` must name a
:class:`~rededit.scoring.judges.vlm.VLMJudge` subclass and may not nest further ``_target_`` nodes, so the file
can choose a judge but cannot make this command construct anything else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rededit.inference.images import tensor_to_pil
from rededit.scoring.judges.prompts import BUILTIN_PROMPT_SETS, builtin_prompt_set, load_rededit_prompts
from rededit.scoring.judges.vlm import CachedJudge, VLMJudge, g_overall
from rededit.utils.logging import get_logger

log = get_logger(__name__)

#: ``judge.max_failure_rate`` when the node has none (``rededit-eval``'s default).
DEFAULT_MAX_FAILURE_RATE = 0.05
_KNOWN_KEYS = {
    "backend",
    "prompts",
    "max_attempts",
    "retry_parse_failures",
    "max_failure_rate",
    "cache_dir",
    "reference_rows",  # rededit-eval only (its identity / ground-truth rows): accepted, unused here
}


class JudgeConfigError(ValueError):
    """A bad ``--judge`` file (the message names the file and what is wrong)."""


@dataclass
class PairScore:
    """One judged edit: ``score`` (None when the judge failed) and why it failed."""

    score: float | None
    error: str | None = None
    dimensions: dict[str, float] = field(default_factory=dict)


def load_judge_node(path: str | Path) -> dict[str, Any]:
    """The ``judge`` node of a YAML file (under ``judge:`` or at the top level), as plain data."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise JudgeConfigError(f"judge config {path}: no such file")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # YAML syntax, interpolation: one sentence naming the file
        raise JudgeConfigError(f"judge config {path}: cannot be read as YAML ({err})") from err
    if isinstance(data, Mapping) and isinstance(data.get("judge"), Mapping):
        data = data["judge"]
    if not isinstance(data, Mapping) or not isinstance(data.get("backend"), Mapping):
        raise JudgeConfigError(
            f"judge config {path}: needs a `backend` node with a _target_ (the `judge` node of rededit-eval, e.g. "
            "{backend: {_target_: rededit.scoring.judges.vlm.OpenAICompatibleJudge, base_url: ..., model: ...}})"
        )
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise JudgeConfigError(f"judge config {path}: unknown keys {unknown}; known: {sorted(_KNOWN_KEYS)}")
    return dict(data)


def _nested_target(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "_target_" in value or any(_nested_target(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_nested_target(v) for v in value)
    return False


def _backend(node: Mapping[str, Any], where: str) -> VLMJudge:
    from hydra.utils import get_object

    spec = dict(node["backend"])
    target = str(spec.pop("_target_", "") or "")
    if not target:
        raise JudgeConfigError(f"{where}: judge.backend has no _target_")
    try:
        cls = get_object(target)
    except Exception as err:
        raise JudgeConfigError(
            f"{where}: judge.backend._target_={target} cannot be imported ({err})"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, VLMJudge)) or cls is CachedJudge:
        raise JudgeConfigError(
            f"{where}: judge.backend._target_={target} is not a VLM judge backend (a subclass of "
            "rededit.scoring.judges.vlm.VLMJudge such as OpenAICompatibleJudge or TransformersVLMJudge)"
        )
    kwargs = {k: v for k, v in spec.items() if not str(k).startswith("_")}
    if _nested_target(kwargs):
        raise JudgeConfigError(f"{where}: judge.backend's arguments may not contain _target_ nodes")
    cls.preflight(**kwargs)  # e.g. an OpenAI-compatible endpoint that does not answer: JudgeUnreachableError
    return cls(**kwargs)


def _prompt_set(spec: str, where: Path | None) -> Any:
    if spec == "benchmark":  # rededit-eval on a manifest benchmark (synthetic) uses the generic set
        spec = "rededit_generic"
    if spec in BUILTIN_PROMPT_SETS:
        return builtin_prompt_set(spec)
    path = Path(spec)
    if not path.is_absolute() and where is not None:
        path = where.parent / path  # a prompts file beside the config
    return load_rededit_prompts(path)


class VLMPairJudge:
    """Scores edits with a VLM judge for preference pairs (see the module docstring).

    Args:
        judge: the cached, retrying judge.
        prompts: the prompt set (:class:`~rededit.scoring.judges.prompts.PromptSet`).
        max_failure_rate: the failure rate above which the run is reported as failed.

    Attributes:
        judged / failed: edits scored through :meth:`score` in this process, and how many of them failed.
    """

    def __init__(self, judge: CachedJudge, prompts: Any, max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE):
        self.judge = judge
        self.prompts = prompts
        self.gedit = getattr(prompts, "name", None) == "gedit"
        self.max_failure_rate = float(max_failure_rate)
        self.judged = 0
        self.failed = 0

    @property
    def judge_id(self) -> str:
        return self.judge.judge_id

    @property
    def prompts_hash(self) -> str:
        return self.prompts.set_hash

    def check_reachable(self) -> None:
        self.judge.check_reachable()

    def score(self, edit: torch.Tensor, sample: Mapping[str, Any], text: str, item_id: str) -> PairScore:
        """Judge one edit ``[3, H, W]`` in [-1, 1] of a row (``sample``:
        :func:`~rededit.scoring.judges.programmatic.bench_sample` at the edit's size)."""
        self.judged += 1
        out = self._score(edit, sample, text, item_id)
        if out.score is None:
            self.failed += 1
        return out

    def _score(self, edit: torch.Tensor, sample: Mapping[str, Any], text: str, item_id: str) -> PairScore:
        refs = sample.get("references") or []
        images = {
            "source": tensor_to_pil(sample["source"]) if sample.get("source") is not None else None,
            "reference": refs[1].convert("RGB") if len(refs) > 1 else None,
            "edited": tensor_to_pil(edit),
        }
        names = ("sc", "pq") if self.gedit else (str(sample["task"]),)
        dims: dict[str, float] = {}
        for name in names:
            try:
                t = self.prompts.template(name)
            except KeyError as err:
                return PairScore(None, f"no template: {err}")
            missing = [r for r in t.image_roles if images.get(r) is None]
            if missing:
                return PairScore(None, f"row has no {missing} image for the template")
            resp = self.judge.score([images[r] for r in t.image_roles], t.render(text), t, item_id=item_id)
            if not resp.ok or not resp.scores:
                if str(resp.error).startswith("backend:"):
                    self.judge.check_reachable()  # a server that went away stops the run, not every row
                return PairScore(None, str(resp.error))
            dims.update({k: float(v) for k, v in resp.scores.items()})
        if self.gedit:
            score = g_overall(dims["G_SC"], dims["G_PQ"])
        else:
            score = sum(dims.values()) / len(dims)
        if not math.isfinite(score):
            return PairScore(None, f"non-finite score {score}")
        return PairScore(score, None, dims)


def build_pair_judge(
    node: Mapping[str, Any], cache_dir: str | Path, *, config_path: str | Path | None = None
) -> VLMPairJudge:
    """A :class:`VLMPairJudge` from a ``judge`` node (:func:`load_judge_node`), its answers cached in
    ``cache_dir``; the backend's preflight runs first and the judge must answer before anything is generated."""
    where = str(config_path) if config_path is not None else "judge config"
    if node.get("cache_dir"):
        log.warning(
            "%s: cache_dir=%s is ignored; make-pairs caches judge answers in %s (--judge-cache)",
            where,
            node["cache_dir"],
            cache_dir,
        )
    try:
        rate = float(node.get("max_failure_rate", DEFAULT_MAX_FAILURE_RATE))
    except (TypeError, ValueError):
        rate = math.nan
    if not 0.0 <= rate <= 1.0:
        raise JudgeConfigError(
            f"{where}: max_failure_rate must be a number in [0, 1], got {node['max_failure_rate']!r}"
        )
    try:
        prompts = _prompt_set(
            str(node.get("prompts", "benchmark")), Path(config_path) if config_path else None
        )
    except (OSError, KeyError, ValueError) as err:
        raise JudgeConfigError(f"{where}: prompts={node.get('prompts')!r}: {err}") from err
    backend = _backend(node, where)
    judge = CachedJudge(
        backend,
        cache_dir,
        max_attempts=int(node.get("max_attempts", 3)),
        retry_parse_failures=bool(node.get("retry_parse_failures", False)),
    )
    judge.check_reachable()
    return VLMPairJudge(judge, prompts, rate)
