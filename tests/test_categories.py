"""REDEdit-Bench category map (report §4.1): the 15 categories, the synthetic task mapping, its config."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rededit.datagen.synth.tasks import TASKS
from rededit.scoring.categories import (
    DEFAULT_CONFIG,
    DEFAULT_TASK_MAP,
    OTHER,
    REDEDIT_CATEGORIES,
    CategoryMap,
    UnknownTaskError,
    load_category_map,
)

# The `task` keys of the public release (redbench.jsonl / prompts.json) and the report's display names.
BENCH_KEYS = {
    "add": "Add",
    "adjust": "Adjust",
    "background": "BG",
    "beauty": "Beauty",
    "color": "Color",
    "compose": "Compose",
    "extract": "Extract",
    "portrait": "Portrait",
    "lowlevel": "Low-level",
    "motion": "Motion",
    "remove": "Remove",
    "replace": "Replace",
    "stylize": "Stylize",
    "text": "Text",
    "viewpoint": "Viewpoint",
}


@pytest.fixture(scope="module")
def cmap() -> CategoryMap:
    return load_category_map(DEFAULT_CONFIG)


def test_fifteen_categories_with_bench_keys_and_names(cmap):
    assert len(cmap.categories) == 15
    assert {c.key: c.name for c in cmap.categories} == BENCH_KEYS
    assert [c.key for c in cmap.categories] == [c.key for c in REDEDIT_CATEGORIES]


def test_every_synthetic_task_maps(cmap):
    for task in TASKS:
        cat = cmap.category_of(task)
        assert cat is None or cat in BENCH_KEYS, task
    assert cmap.category_of("t2i") is None
    assert cmap.row_of("t2i") == "t2i"
    assert cmap.category_of("restore") == "lowlevel"
    assert cmap.category_of("background") == "background"
    assert cmap.name_of(cmap.row_of("restore")) == "Low-level"
    # every synthetic edit task has a category: only text-to-image is its own row
    assert [t for t in TASKS if cmap.category_of(t) is None] == ["t2i"]
    assert cmap.tasks_in("lowlevel") == ["restore"]


def test_yaml_matches_builtin_default():
    assert DEFAULT_CONFIG.is_file()
    data = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG))
    assert data["tasks"] == DEFAULT_TASK_MAP
    assert load_category_map(None) == load_category_map(DEFAULT_CONFIG)


def test_bench_keys_and_display_names_map_to_themselves(cmap):
    for key, name in BENCH_KEYS.items():
        assert cmap.category_of(key) == key
        assert cmap.category_of(name) == key
        assert cmap.category_of(name.upper()) == key


def test_unknown_task_error_or_other(cmap):
    with pytest.raises(UnknownTaskError, match=r"inpaint_sky.*unknown: other"):
        cmap.category_of("inpaint_sky")
    other = load_category_map(DEFAULT_CONFIG, unknown="other")
    assert other.category_of("inpaint_sky") == OTHER
    assert other.category_of("color") == "color"
    assert load_category_map({"unknown": "other"}).category_of("x") == OTHER


def test_config_from_mapping_and_dictconfig():
    data = {
        "categories": [{"key": "color", "name": "Colour"}, {"key": "misc", "name": "Misc"}],
        "tasks": {"color": "color", "restore": "misc", "t2i": None},
    }
    for cfg in (data, OmegaConf.create(data)):
        m = load_category_map(cfg)
        assert m.keys == ("color", "misc")
        assert m.category_of("restore") == "misc"
        assert m.name_of("color") == "Colour"
        with pytest.raises(UnknownTaskError):
            m.category_of("add")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="not defined"):
        load_category_map({"tasks": {"color": "colour"}})
    with pytest.raises(ValueError, match="unexpected keys"):
        load_category_map({"task": {}})
    with pytest.raises(ValueError, match="unknown="):
        load_category_map({"unknown": "ignore"})
    with pytest.raises(ValueError, match="duplicate"):
        load_category_map({"categories": [{"key": "a"}, {"key": "a"}], "tasks": {}})
    with pytest.raises(FileNotFoundError):
        load_category_map(tmp_path / "missing.yaml")
    path = tmp_path / "cats.yaml"
    path.write_text("tasks:\n  restore: stylize\n")
    assert load_category_map(str(path)).category_of("restore") == "stylize"
