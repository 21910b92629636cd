"""Benchmark loaders: the synthetic ``bench`` split and the REDEdit-Bench / ImgEdit / GEdit folder formats.

Every loader is a sequence of :class:`BenchItem` (loaded lazily, one item per ``bench[i]``, so a 1.5k-image
benchmark never sits decoded in memory) with

* ``name``: the benchmark's short name (``synthetic``, ``redbench``, ``imgedit``, ``gedit``);
* ``has_ground_truth``: whether items carry an exact target (and edit mask): only the synthetic bench;
* ``judge_prompts``: ``{task: prompt template}`` shipped with the benchmark (REDEdit-Bench ``prompts.json``,
  ImgEdit ``prompts.json`` / ``judge_prompt.json``), else ``None``;
* ``benchmark_hash``: sha256 over every item's id, instructions and the bytes of its image files, in
  order, so a ``metrics.json`` names exactly the benchmark it scored (issue 4: judges drift, settings go
  unrecorded; ours must be reproducible).

Formats (report §4 for REDEdit-Bench; the public ImgEdit and GEdit releases):

* **synthetic** (:class:`SyntheticBench`): our Parquet manifest (:mod:`rededit.data.schema`), rows with
  ``split == "bench"``: exact target, edit mask, OCR target and object boxes.
* **REDEdit-Bench** (:class:`REDEditBench`): ``redbench.jsonl`` rows ``{id, source, a_to_b_instructions
  (CN), a_to_b_instructions_eng (EN), task}`` with ``source`` relative to the folder, and ``prompts.json``
  (one judge prompt per task, Prompt Compliance / Visual Naturalness / Physical & Detail Coherence).
* **ImgEdit** (:class:`ImgEditBench`): ``singleturn.json`` = ``{key: {id, prompt, edit_type[, image]}}``,
  where the image path (``image``, else ``id``, e.g. ``animal/000342021.jpg``) is relative to the JSON's
  folder.
* **GEdit-Bench** (:class:`GEditBench`): the Hugging Face release saved as Parquet (columns ``key,
  task_type, instruction, instruction_language, input_image`` with ``input_image`` an image struct
  ``{bytes, path}``), or a JSONL with the same keys and ``input_image`` a path relative to the folder.

Categories: a loader maps each task to a REDEdit-Bench category with a category map (an object with
``category_of(task)``, or a config path for :func:`rededit.scoring.categories.load_category_map`); without
one (``category_map=None``), or for a task the map does not know, the category is the task name itself;
the default (``"default"``) is ``conf/eval/categories/default.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rededit.data.alignment import reindex
from rededit.data.buckets import ResolutionSet, load_bucket_config
from rededit.data.images import ImageDecodeError, load_image, resize_to_bucket, transform_boxes
from rededit.data.manifest import Manifest
from rededit.data.uri import check_inside, resolve_uri
from rededit.utils.logging import get_logger

log = get_logger(__name__)

__all__ = [
    "BenchItem",
    "Benchmark",
    "GEditBench",
    "ImgEditBench",
    "REDEditBench",
    "SyntheticBench",
    "safe_id",
    "synthetic_item",
]

_SAFE = re.compile(r"[^A-Za-z0-9._/-]")


def safe_id(item_id: str) -> str:
    """An item id usable as a relative file path (``images/<seed>/<id>.png``): no ``..``, no odd characters."""
    s = _SAFE.sub("_", str(item_id)).strip("/")
    parts = [p for p in s.split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"item id {item_id!r} gives an empty file name")
    return "/".join(parts)


@dataclasses.dataclass
class BenchItem:
    """One benchmark edit.

    Attributes:
        id: unique within the benchmark (a relative path under ``images/<seed>/``, see :func:`safe_id`).
        task: the benchmark's own task name (``add``, ``subject-add``, ``background_change``, ...).
        category: REDEdit-Bench category the task maps to (the task itself when unmapped).
        instruction: English instruction ("" when the benchmark has none).
        instruction_zh: Chinese instruction or None.
        references: Picture 1, 2, ... (RGB PIL images); empty for text-to-image.
        target: exact ground truth (synthetic bench) or None.
        edit_mask: ``L`` mask at the target's size (255 = edited) or None.
        ocr_target: text the edited image must show (text edits) or None.
        object_boxes: ``[O, 4]`` x0, y0, x1, y1 in target pixels, or None.
        meta: anything else from the row (source file, language, raw fields).
    """

    id: str
    task: str
    category: str
    instruction: str
    instruction_zh: str | None
    references: list[Image.Image]
    target: Image.Image | None = None
    edit_mask: Image.Image | None = None
    ocr_target: str | None = None
    object_boxes: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def text(self, language: str = "en") -> str:
        """The instruction in ``language`` (``en`` / ``zh``), falling back to the other one when missing."""
        if language not in ("en", "zh"):
            raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
        first, second = (
            (self.instruction_zh, self.instruction)
            if language == "zh"
            else (self.instruction, self.instruction_zh)
        )
        return first or second or ""

    @property
    def output_hw(self) -> tuple[int, int]:
        """Native ``(h, w)`` of the expected output: the target's, else Picture 1's (64² for bare T2I)."""
        img = self.target if self.target is not None else (self.references[0] if self.references else None)
        return (img.height, img.width) if img is not None else (64, 64)

    def resized(self, out_hw: tuple[int, int], ref_hws: Sequence[tuple[int, int]]) -> BenchItem:
        """A copy with every image cover-resized and centre-cropped (:func:`~rededit.data.images.resize_to_bucket`).

        The target and mask go to ``out_hw`` (mask with nearest neighbours so it stays binary), the boxes
        follow the same cover-crop, references go to ``ref_hws``.
        """
        if len(ref_hws) != len(self.references):
            raise ValueError(f"{self.id}: {len(self.references)} references but {len(ref_hws)} sizes")
        oh, ow = (int(v) for v in out_hw)

        def fit(img: Image.Image, h: int, w: int, resample: str = "lanczos") -> Image.Image:
            return img if img.size == (w, h) else resize_to_bucket(img, h, w, resample)

        refs = [fit(r, int(h), int(w)) for r, (h, w) in zip(self.references, ref_hws)]
        target = mask = boxes = None
        if self.target is not None:
            target = fit(self.target, oh, ow)
        if self.edit_mask is not None:
            mask = fit(self.edit_mask, oh, ow, "nearest")
        if self.object_boxes is not None:
            src = self.output_hw
            boxes = (
                self.object_boxes
                if src == (oh, ow)
                else transform_boxes(self.object_boxes, src, (oh, ow)).astype(np.float32)
            )
        return dataclasses.replace(
            self, references=refs, target=target, edit_mask=mask, object_boxes=boxes, meta=dict(self.meta)
        )


# ------------------------------------------------------------------------------------------- base class
def _resolve_category_map(category_map: Any) -> Any:
    """None → no map; ``"default"`` → the repository's default map; a path / mapping → loaded; else as is."""
    if category_map is None or hasattr(category_map, "category_of"):
        return category_map
    try:
        from rededit.scoring.categories import load_category_map
    except ImportError as err:  # the categories module is optional for the loaders
        log.warning("category map %r not loaded (%s); categories = task names", category_map, err)
        return None
    return load_category_map(None if category_map == "default" else category_map)


class Benchmark(Sequence[BenchItem]):
    """Lazy sequence of :class:`BenchItem` over ``self.records`` (one light dict per item).

    Subclasses fill ``records`` (each with at least ``id``, ``task``, ``instruction``, ``instruction_zh``)
    in ``__init__`` and implement :meth:`_load` (record → item) and :meth:`_image_bytes` (record → raw bytes
    of its image files, for the hash).
    """

    name = "benchmark"
    has_ground_truth = False

    def __init__(self, root: str | os.PathLike, category_map: Any = None) -> None:
        self.root = Path(root)
        self.records: list[dict[str, Any]] = []
        self.judge_prompts: dict[str, str] | None = None
        self._category_map = _resolve_category_map(category_map)
        self._hash: str | None = None

    # -- sequence protocol
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> BenchItem:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("slice a benchmark's records, not the benchmark")
        return self._load(self.records[i])

    def __iter__(self) -> Iterator[BenchItem]:
        for rec in self.records:
            yield self._load(rec)

    # -- helpers
    def category_of(self, task: str) -> str:
        """REDEdit-Bench category of ``task`` (the task itself when there is no map or it is unmapped)."""
        if self._category_map is None:
            return task
        try:
            cat = self._category_map.category_of(task)
        except (KeyError, ValueError):
            return task
        return str(cat) if cat else task

    def _finish_records(self) -> None:
        """Sanitise ids and fail loudly on duplicates (they would overwrite each other's images)."""
        seen: dict[str, str] = {}
        for rec in self.records:
            sid = safe_id(rec["id"])
            if sid in seen:
                raise ValueError(
                    f"{self.name} benchmark at {self.root}: items {seen[sid]!r} and {rec['id']!r} map to the "
                    f"same id {sid!r}"
                )
            seen[sid] = rec["id"]
            rec["id"] = sid
        if not self.records:
            raise ValueError(f"{self.name} benchmark at {self.root}: no items")

    @property
    def tasks(self) -> list[str]:
        return sorted({r["task"] for r in self.records})

    @property
    def benchmark_hash(self) -> str:
        """sha256 over ids, instructions and image bytes of every item, in order (computed once)."""
        if self._hash is None:
            h = hashlib.sha256()
            for rec in self.records:
                for field in (
                    rec["id"],
                    rec["task"],
                    rec.get("instruction") or "",
                    rec.get("instruction_zh") or "",
                ):
                    data = str(field).encode("utf-8")
                    h.update(len(data).to_bytes(8, "little") + data)
                for data in self._image_bytes(rec):
                    h.update(len(data).to_bytes(8, "little"))
                    h.update(data)
            self._hash = h.hexdigest()
        return self._hash

    def _load(self, rec: dict[str, Any]) -> BenchItem:  # pragma: no cover - abstract
        raise NotImplementedError

    def _image_bytes(self, rec: dict[str, Any]) -> list[bytes]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``metrics.json`` records about the benchmark."""
        return {
            "name": self.name,
            "root": str(self.root),
            "n_items": len(self),
            "tasks": self.tasks,
            "has_ground_truth": self.has_ground_truth,
            "hash": self.benchmark_hash,
        }


def _open_rgb(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises many types by format
        raise ImageDecodeError(where, f"{type(err).__name__}: {err}") from err
    return img.convert("RGB")


def _read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: image {path} not found")
    return path.read_bytes()


def _load_prompts(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as fh:
        prompts = json.load(fh)
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"{path}: expected a JSON object {{task: prompt template}}")
    return prompts


# -------------------------------------------------------------------------------------------- synthetic
class SyntheticBench(Benchmark):
    """The held-out ``bench`` split of a synthetic corpus (exact ground truth, masks, OCR targets, boxes).

    Args:
        manifest_path: Parquet manifest written by :func:`rededit.datagen.synth.writer.synthesize`.
        split: rows to take (``bench``).
        buckets: bucket set (a name in ``conf/data/buckets``, a YAML path or a config mapping) every image is
            cover-resized to, as the editor saw them in training (eq. (1), like
            :mod:`rededit.eval.demo_report`); ``None`` keeps native sizes (the runner then sizes items itself).
        tasks: keep only these tasks.
        max_per_task: keep the first rows of each task.
        category_map: see the module docstring.
        reference_order: ``as_is``, or ``reversed``: Picture 1..K are presented in reverse order and every
            image mention of the instructions is re-indexed to match (:func:`rededit.data.alignment.reindex`),
            the test-time permutation of the Stochastic Instruction Alignment ablation (§3.2). Items with
            fewer than two references are unchanged.
    """

    name = "synthetic"
    has_ground_truth = True

    def __init__(
        self,
        manifest_path: str | os.PathLike,
        split: str = "bench",
        buckets: str | Mapping[str, Any] | None = None,
        tasks: Sequence[str] | None = None,
        max_per_task: int | None = None,
        category_map: Any = "default",
        reference_order: str = "as_is",
    ) -> None:
        if reference_order not in ("as_is", "reversed"):
            raise ValueError(f"reference_order must be 'as_is' or 'reversed', got {reference_order!r}")
        self.reference_order = reference_order

        self.manifest = Manifest.open(manifest_path)
        super().__init__(self.manifest.root, category_map)
        self.manifest_path = Path(manifest_path)
        self.split = split
        self._rs = None
        if buckets is not None:
            cfg = load_bucket_config(buckets) if isinstance(buckets, (str, os.PathLike)) else dict(buckets)
            self._rs = ResolutionSet.from_config(cfg)
        if not self.manifest.has("split"):
            raise ValueError(f"{manifest_path}: the manifest has no `split` column, cannot select {split!r}")
        splits = self.manifest.column_numpy("split")
        all_tasks = self.manifest.column_numpy("task")
        taken: dict[str, int] = {}
        for i in np.nonzero(splits == split)[0].tolist():
            task = str(all_tasks[i])
            if tasks is not None and task not in tasks:
                continue
            if max_per_task is not None and taken.get(task, 0) >= max_per_task:
                continue
            taken[task] = taken.get(task, 0) + 1
            row = self.manifest.row(i)
            rec = {
                "row": i,
                "id": row["id"],
                "task": task,
                "instruction": row.get("instruction") or "",
                "instruction_zh": row.get("instruction_zh"),
            }
            self.records.append(self._reorder_texts(rec, len(row["references"] or ())))
        if not self.records:
            raise ValueError(
                f"{manifest_path}: no rows with split == {split!r}"
                + (f" and task in {tasks}" if tasks else "")
            )
        self._finish_records()

    def _new_order(self, num_refs: int) -> list[int] | None:
        """Original index of the reference shown at each position, or None when the order is unchanged."""
        if self.reference_order == "as_is" or num_refs < 2:
            return None
        return list(range(num_refs))[::-1]

    def _reorder_texts(self, rec: dict[str, Any], num_refs: int) -> dict[str, Any]:
        order = self._new_order(num_refs)
        if order is not None:
            for key in ("instruction", "instruction_zh"):
                if rec[key]:
                    rec[key] = reindex(rec[key], order, num_refs=num_refs)
        return rec

    def _uris(self, row: Mapping[str, Any]) -> list[str]:
        uris = [row["target"], *row["references"]]
        return uris + ([row["edit_mask"]] if row.get("edit_mask") else [])

    def _image_bytes(self, rec: dict[str, Any]) -> list[bytes]:
        return [resolve_uri(u, self.manifest.root) for u in self._uris(self.manifest.row(rec["row"]))]

    def _load(self, rec: dict[str, Any]) -> BenchItem:
        item = synthetic_item(self.manifest, rec["row"], self.category_of(rec["task"]))
        order = self._new_order(len(item.references))
        item = dataclasses.replace(
            item,
            id=rec["id"],
            instruction=rec["instruction"],
            instruction_zh=rec["instruction_zh"],
            references=item.references if order is None else [item.references[j] for j in order],
            meta={**item.meta, "reference_order": order},
        )
        if self._rs is None:
            return item
        hw = [item.output_hw] + [(r.height, r.width) for r in item.references]
        dst = [
            tuple(int(v) for v in s)
            for s in self._rs.resolutions[self._rs.assign(np.asarray(hw, dtype=np.int64))]
        ]
        return item.resized(dst[0], dst[1:])


def synthetic_item(manifest: Manifest, i: int, category: str | None = None) -> BenchItem:
    """Row ``i`` of a synthetic manifest as a :class:`BenchItem` at native sizes (what :class:`SyntheticBench`
    yields before its optional reference reordering and bucket resize), for callers that pick their own rows:
    the demo report and the training sample grids score the same items as ``rededit-eval`` through it.

    Args:
        manifest: the opened manifest.
        i: row index.
        category: the item's category (default: its task).
    """
    row = manifest.row(i)
    root = manifest.root
    boxes = row.get("object_boxes")
    return BenchItem(
        id=safe_id(row["id"]),
        task=str(row["task"]),
        category=category or str(row["task"]),
        instruction=row.get("instruction") or "",
        instruction_zh=row.get("instruction_zh"),
        references=[load_image(u, root) for u in row["references"]],
        target=load_image(row["target"], root),
        edit_mask=load_image(row["edit_mask"], root, mode="L") if row.get("edit_mask") else None,
        ocr_target=row.get("ocr_target"),
        object_boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if boxes else None,
        meta={"source": row.get("source"), "manifest_row": i, "reference_order": None},
    )


# ------------------------------------------------------------------------------------------- REDEdit
class REDEditBench(Benchmark):
    """REDEdit-Bench from a local folder (report §4): ``redbench.jsonl`` + images + ``prompts.json``.

    Args:
        folder: the benchmark folder; each row's ``source`` is relative to it.
        jsonl: the rows file inside ``folder``.
        prompts: judge prompt file inside ``folder`` (optional; ``judge_prompts`` is None without it).
        tasks: keep only these tasks.
        category_map: see the module docstring.
    """

    name = "redbench"

    def __init__(
        self,
        folder: str | os.PathLike,
        jsonl: str = "redbench.jsonl",
        prompts: str = "prompts.json",
        tasks: Sequence[str] | None = None,
        category_map: Any = "default",
    ) -> None:
        super().__init__(folder, category_map)
        path = self.root / jsonl
        if not path.is_file():
            raise FileNotFoundError(
                f"REDEdit-Bench: {path} not found (expected {jsonl} in the benchmark folder)"
            )
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rec = {
                        "id": str(row["id"]),
                        "task": str(row["task"]),
                        "instruction": row.get("a_to_b_instructions_eng") or "",
                        "instruction_zh": row.get("a_to_b_instructions") or None,
                        "source": str(row["source"]),
                    }
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{path}:{n}: not a REDEdit-Bench row ({type(err).__name__}: {err})"
                    ) from err
                if tasks is None or rec["task"] in tasks:
                    self.records.append(rec)
        self.judge_prompts = _load_prompts(self.root / prompts)
        self.prompts_path = self.root / prompts if self.judge_prompts is not None else None
        self._finish_records()

    def _image_bytes(self, rec: dict[str, Any]) -> list[bytes]:
        path = check_inside(self.root / rec["source"], self.root, rec["source"])
        return [_read_file(path, f"REDEdit-Bench item {rec['id']}")]

    def _load(self, rec: dict[str, Any]) -> BenchItem:
        where = str(self.root / rec["source"])
        img = _open_rgb(self._image_bytes(rec)[0], where)
        return BenchItem(
            id=rec["id"],
            task=rec["task"],
            category=self.category_of(rec["task"]),
            instruction=rec["instruction"],
            instruction_zh=rec["instruction_zh"],
            references=[img],
            meta={"source": rec["source"]},
        )


# -------------------------------------------------------------------------------------------- ImgEdit
class ImgEditBench(Benchmark):
    """ImgEdit-Bench single-turn suite from a local folder.

    Args:
        folder: the folder holding ``singleturn.json`` (or its parent, with ``singleturn/singleturn.json``).
        json_name: the item file.
        prompts: judge prompt files looked up beside it (first found wins; optional).
        tasks: keep only these edit types.
        category_map: see the module docstring.
    """

    name = "imgedit"

    def __init__(
        self,
        folder: str | os.PathLike,
        json_name: str = "singleturn.json",
        prompts: Sequence[str] = ("prompts.json", "judge_prompt.json"),
        tasks: Sequence[str] | None = None,
        category_map: Any = "default",
    ) -> None:
        folder = Path(folder)
        candidates = [folder / json_name, folder / "singleturn" / json_name]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"ImgEdit: no {json_name} in {folder} (looked at {[str(c) for c in candidates]})"
            )
        super().__init__(path.parent, category_map)
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{key: {{id, prompt, edit_type}}}}")
        for key, row in data.items():
            if not isinstance(row, dict) or "prompt" not in row or "edit_type" not in row:
                raise ValueError(f"{path}: item {key!r} lacks `prompt` / `edit_type`: {row!r}")
            image = row.get("image") or row.get("id")
            if not image:
                raise ValueError(f"{path}: item {key!r} names no image (`image` or `id`)")
            if tasks is None or row["edit_type"] in tasks:
                self.records.append(
                    {
                        "id": str(key),
                        "task": str(row["edit_type"]),
                        "instruction": str(row["prompt"]),
                        "instruction_zh": None,
                        "image": str(image),
                    }
                )
        for name in prompts:
            self.judge_prompts = _load_prompts(self.root / name)
            if self.judge_prompts is not None:
                break
        self._finish_records()

    def _image_bytes(self, rec: dict[str, Any]) -> list[bytes]:
        path = check_inside(self.root / rec["image"], self.root, rec["image"])
        return [_read_file(path, f"ImgEdit item {rec['id']}")]

    def _load(self, rec: dict[str, Any]) -> BenchItem:
        img = _open_rgb(self._image_bytes(rec)[0], str(self.root / rec["image"]))
        return BenchItem(
            id=rec["id"],
            task=rec["task"],
            category=self.category_of(rec["task"]),
            instruction=rec["instruction"],
            instruction_zh=None,
            references=[img],
            meta={"image": rec["image"]},
        )


# ---------------------------------------------------------------------------------------------- GEdit
_GEDIT_COLUMNS = ("key", "task_type", "instruction", "instruction_language", "input_image")


class GEditBench(Benchmark):
    """GEdit-Bench from a local folder: the Hugging Face Parquet release, or a JSONL with image paths.

    Item ids are ``<task_type>/<language>/<key>`` (GEdit's own ``fullset`` layout), since keys repeat across
    the EN and CN halves. CN rows carry their instruction in ``instruction_zh`` (``instruction`` stays "").

    Args:
        folder: folder searched (recursively) for ``*.parquet``; without any, for ``*.jsonl``.
        language: ``en`` / ``cn`` to keep one half; None keeps both.
        tasks: keep only these task types.
        category_map: see the module docstring.
    """

    name = "gedit"

    def __init__(
        self,
        folder: str | os.PathLike,
        language: str | None = None,
        tasks: Sequence[str] | None = None,
        category_map: Any = "default",
    ) -> None:
        super().__init__(folder, category_map)
        if language not in (None, "en", "cn"):
            raise ValueError(f"GEdit language must be 'en', 'cn' or null, got {language!r}")
        files = sorted(self.root.rglob("*.parquet"))
        rows = self._parquet_rows(files) if files else self._jsonl_rows(sorted(self.root.rglob("*.jsonl")))
        for row in rows:
            lang = str(row.get("instruction_language") or "en")
            if (language is not None and lang != language) or (
                tasks is not None and row["task_type"] not in tasks
            ):
                continue
            text = str(row["instruction"])
            self.records.append(
                {
                    "id": f"{row['task_type']}/{lang}/{row['key']}",
                    "key": str(row["key"]),
                    "task": str(row["task_type"]),
                    "language": lang,
                    "instruction": "" if lang == "cn" else text,
                    "instruction_zh": text if lang == "cn" else None,
                    "image": row["input_image"],
                }
            )
        self._finish_records()

    def _parquet_rows(self, files: list[Path]) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        rows = []
        for f in files:
            table = pq.read_table(f)
            missing = [c for c in _GEDIT_COLUMNS if c not in table.column_names]
            if missing:
                raise ValueError(f"{f}: not a GEdit-Bench Parquet file, missing columns {missing}")
            for row in table.select(list(_GEDIT_COLUMNS)).to_pylist():
                img = row["input_image"]
                data = img.get("bytes") if isinstance(img, dict) else img
                if not data:
                    raise ValueError(f"{f}: row {row['key']!r} has no input_image bytes")
                row["input_image"] = bytes(data)
                rows.append(row)
        return rows

    def _jsonl_rows(self, files: list[Path]) -> list[dict[str, Any]]:
        if not files:
            raise FileNotFoundError(f"GEdit-Bench: no *.parquet or *.jsonl under {self.root}")
        rows = []
        for f in files:
            with f.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    missing = [c for c in _GEDIT_COLUMNS if c not in row]
                    if missing:
                        raise ValueError(f"{f}:{n}: not a GEdit-Bench row, missing {missing}")
                    row["input_image"] = str(f.parent / row["input_image"])
                    rows.append(row)
        return rows

    def _image_bytes(self, rec: dict[str, Any]) -> list[bytes]:
        img = rec["image"]
        if isinstance(img, bytes):
            return [img]
        return [_read_file(check_inside(Path(img), self.root, img), f"GEdit item {rec['id']}")]

    def _load(self, rec: dict[str, Any]) -> BenchItem:
        where = rec["image"] if isinstance(rec["image"], str) else f"{self.root}#{rec['id']}"
        img = _open_rgb(self._image_bytes(rec)[0], where)
        return BenchItem(
            id=rec["id"],
            task=rec["task"],
            category=self.category_of(rec["task"]),
            instruction=rec["instruction"],
            instruction_zh=rec["instruction_zh"],
            references=[img],
            meta={"key": rec["key"], "language": rec["language"]},
        )
