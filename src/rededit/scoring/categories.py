"""REDEdit-Bench's 15 categories and the mapping of our task names onto them (report §4.1).

REDEdit-Bench groups its ~1,500 bilingual items into 15 categories (Add, Adjust, BG, Beauty, Color,
Compose, Extract, Portrait, Low-level, Motion, Remove, Replace, Stylize, Text, Viewpoint). The public
release (``redbench.jsonl`` / ``prompts.json``) spells them as lower-case ``task`` keys (``background``,
``lowlevel``, ...); a :class:`Category` keeps both that key and the display name of the report's tables.

The synthetic corpus has its own task names (``src/rededit/datagen/synth/tasks.py``); the mapping from them
to categories lives in config (``conf/eval/categories/default.yaml``) so a study can regroup tasks without
code changes. Tasks mapped to ``null`` (text-to-image) have no category and are reported as their own
row; a bench's own category keys (and display names, case-insensitively) map to themselves, so the same
map serves REDEdit-Bench items and synthetic rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rededit.utils.paths import CONF_DIR

OTHER = "other"
UNKNOWN_POLICIES = ("error", "other")
DEFAULT_CONFIG = Path(CONF_DIR) / "eval" / "categories" / "default.yaml"


@dataclass(frozen=True)
class Category:
    """One REDEdit-Bench category.

    Attributes:
        key: the ``task`` string of the public release (``"lowlevel"``).
        name: the display name of the report's tables (``"Low-level"``).
    """

    key: str
    name: str


# The 15 categories of report §4.1, keyed as in the public release's redbench.jsonl.
REDEDIT_CATEGORIES: tuple[Category, ...] = (
    Category("add", "Add"),
    Category("adjust", "Adjust"),
    Category("background", "BG"),
    Category("beauty", "Beauty"),
    Category("color", "Color"),
    Category("compose", "Compose"),
    Category("extract", "Extract"),
    Category("portrait", "Portrait"),
    Category("lowlevel", "Low-level"),
    Category("motion", "Motion"),
    Category("remove", "Remove"),
    Category("replace", "Replace"),
    Category("stylize", "Stylize"),
    Category("text", "Text"),
    Category("viewpoint", "Viewpoint"),
)

# Mirror of conf/eval/categories/default.yaml (a test keeps them equal): used when no config is given and
# the repository's conf/ folder is not next to the package (an installed wheel).
DEFAULT_TASK_MAP: dict[str, str | None] = {
    "t2i": None,
    "add": "add",
    "remove": "remove",
    "replace": "replace",
    "color": "color",
    "background": "background",
    "stylize": "stylize",
    "restore": "lowlevel",
    "text": "text",
    "viewpoint": "viewpoint",
    "compose": "compose",
    "invert": "color",
}


class UnknownTaskError(KeyError):
    """A task that the category map neither maps nor recognises as a category."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


@dataclass(frozen=True)
class CategoryMap:
    """Task → REDEdit-Bench category.

    Attributes:
        categories: the categories in report order (tables and charts follow it).
        tasks: task → category key, or None for a task with no category (its own row).
        unknown: what :meth:`category_of` does with a task it does not know: ``"error"`` raises
            :class:`UnknownTaskError`, ``"other"`` returns :data:`OTHER`.
    """

    categories: tuple[Category, ...] = REDEDIT_CATEGORIES
    tasks: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_TASK_MAP))
    unknown: str = "error"

    def __post_init__(self) -> None:
        if self.unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown={self.unknown!r}; expected one of {UNKNOWN_POLICIES}")
        keys = [c.key for c in self.categories]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate category keys in {keys}")
        bad = {t: c for t, c in self.tasks.items() if c is not None and c not in keys}
        if bad:
            raise ValueError(f"tasks map to categories that are not defined: {bad}; categories: {keys}")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.categories)

    def _aliases(self) -> dict[str, str]:
        out = {c.key.lower(): c.key for c in self.categories}
        out.update({c.name.lower(): c.key for c in self.categories})
        return out

    def category_of(self, task: str) -> str | None:
        """The category key of ``task``; None for a task mapped to no category (text-to-image).

        Lookup order: the task map, then the category keys and display names themselves
        (case-insensitive), then the ``unknown`` policy.

        Raises:
            UnknownTaskError: ``task`` is unknown and ``unknown == "error"``.
        """
        if task in self.tasks:
            return self.tasks[task]
        alias = self._aliases().get(str(task).lower())
        if alias is not None:
            return alias
        if self.unknown == OTHER:
            return OTHER
        raise UnknownTaskError(
            f"task {task!r} has no REDEdit-Bench category: add it under `tasks:` in the category config "
            f"(known tasks: {sorted(self.tasks)}; categories: {list(self.keys)}) or set `unknown: other`"
        )

    def row_of(self, task: str) -> str:
        """The report row of ``task``: its category key, or the task itself when it has no category."""
        cat = self.category_of(task)
        return task if cat is None else cat

    def name_of(self, row: str) -> str:
        """Display name of a row key (a category's name; other rows keep their key)."""
        for c in self.categories:
            if c.key == row:
                return c.name
        return row

    def tasks_in(self, category: str) -> list[str]:
        """Tasks of the map that land in ``category``."""
        return sorted(t for t, c in self.tasks.items() if c == category)


def category_map_from_dict(data: Mapping[str, Any], *, unknown: str | None = None) -> CategoryMap:
    """Build a :class:`CategoryMap` from the config layout of ``conf/eval/categories/default.yaml``.

    Args:
        data: ``{"categories": [{key, name}, ...], "tasks": {task: key | null}, "unknown": ...}``;
            missing ``categories`` means :data:`REDEDIT_CATEGORIES`, missing ``tasks`` the default map.
        unknown: overrides ``data["unknown"]``.
    """
    data = dict(data)
    extra = sorted(set(data) - {"categories", "tasks", "unknown"})
    if extra:
        raise ValueError(
            f"unexpected keys {extra} in the category config; expected categories, tasks, unknown"
        )
    cats = data.get("categories")
    if cats is None:
        categories = REDEDIT_CATEGORIES
    else:
        categories = []
        for c in cats:
            if not isinstance(c, Mapping) or "key" not in c:
                raise ValueError(f"each category needs a `key` (and a `name`), got {c!r}")
            categories.append(Category(str(c["key"]), str(c.get("name") or c["key"])))
        categories = tuple(categories)
    tasks = data.get("tasks")
    tasks = (
        dict(DEFAULT_TASK_MAP)
        if tasks is None
        else {str(t): (None if c is None else str(c)) for t, c in dict(tasks).items()}
    )
    return CategoryMap(categories, tasks, str(unknown or data.get("unknown") or "error"))


def load_category_map(cfg_or_path: Any = None, *, unknown: str | None = None) -> CategoryMap:
    """Load a category map from a YAML path, a mapping / DictConfig, or the default config.

    Args:
        cfg_or_path: a path to a YAML file in the layout of ``conf/eval/categories/default.yaml``, a mapping
            (or OmegaConf node) with that layout, a ready :class:`CategoryMap`, or None for the repository's
            default file (the built-in :data:`DEFAULT_TASK_MAP` when that file is not present).
        unknown: ``"error"`` or ``"other"``, overriding the config's ``unknown``.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a malformed config (unknown keys, tasks mapped to undefined categories, bad policy).
    """
    if isinstance(cfg_or_path, CategoryMap):
        if unknown is None:
            return cfg_or_path
        return CategoryMap(cfg_or_path.categories, cfg_or_path.tasks, unknown)
    if cfg_or_path is None:
        if not DEFAULT_CONFIG.is_file():
            return CategoryMap(unknown=unknown or "error")
        cfg_or_path = DEFAULT_CONFIG
    if isinstance(cfg_or_path, str | Path):
        from omegaconf import OmegaConf

        path = Path(cfg_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"category config {path} does not exist")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            data = (
                OmegaConf.to_container(cfg_or_path, resolve=True)
                if isinstance(cfg_or_path, DictConfig)
                else cfg_or_path
            )
        except ImportError:  # pragma: no cover - omegaconf is a runtime dependency
            data = cfg_or_path
    if not isinstance(data, Mapping):
        raise ValueError(f"a category config must be a mapping, got {type(data).__name__}")
    return category_map_from_dict(data, unknown=unknown)
