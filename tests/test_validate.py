"""Manifest validation: every problem found and reported with its row id and column; the CLI's output
and exit codes; ``Manifest.open(validate=True)``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rededit.cli.data import main as data_main
from rededit.data.manifest import Manifest
from rededit.data.schema import manifest_schema
from rededit.data.validate import ManifestError, Problem, validate_manifest, validate_manifest_report

OPTIONAL = ["caption", "edit_mask", "face_landmarks", "object_boxes"]


def _row(i: int, **kw) -> dict:
    row = {
        "id": f"train-{i:06d}",
        "task": "edit",
        "instruction": "make it red",
        "caption": None,
        "target": "img/t.png",
        "target_width": 32,
        "target_height": 24,
        "references": ["img/r.png"],
        "reference_widths": [16],
        "reference_heights": [16],
        "edit_mask": None,
        "face_landmarks": None,
        "object_boxes": None,
    }
    row.update(kw)
    return row


def _write(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    schema = schema or manifest_schema(OPTIONAL)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (32, 24), 128).save(img / "t.png")
    Image.new("RGB", (16, 16), 64).save(img / "r.png")
    Image.new("RGB", (48, 24), 64).save(img / "wide.png")
    Image.new("L", (32, 24), 255).save(img / "mask.png")
    Image.new("L", (10, 10), 255).save(img / "small_mask.png")
    (img / "garbage.png").write_bytes(b"\x89PNG not really" * 20)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    (img / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return tmp_path


def _valid_rows() -> list[dict]:
    return [
        _row(
            0,
            task="t2i",
            instruction=None,
            caption="a red car",
            references=[],
            reference_widths=[],
            reference_heights=[],
        ),
        _row(1),
        _row(
            2,
            references=["img/r.png", "img/wide.png"],
            reference_widths=[16, 48],
            reference_heights=[16, 24],
            edit_mask="img/mask.png",
            face_landmarks=[float(v) for v in range(10)],
            object_boxes=[1.0, 2.0, 10.0, 12.0],
        ),
    ]


def _broken_rows() -> list[dict]:
    return [
        _row(0),  # valid
        _row(1, id="dup-1"),
        _row(2, id="dup-1"),
        _row(3, references=["img/r.png", "img/r.png"], reference_widths=[16]),  # list length mismatch
        _row(4, target="img/missing.png"),
        _row(5, target="img/garbage.png"),
        _row(6, references=["img/trunc.png"]),
        _row(7, target="img/wide.png"),  # decodes as 48x24, manifest says 32x24
        _row(8, instruction="  ", caption=None),  # no text
        _row(9, face_landmarks=[1.0] * 7, object_boxes=[0.0, 0.0, 5.0, 5.0, 1.0]),
        _row(10, target_width=0),
        _row(11, edit_mask="img/small_mask.png"),
        _row(12, id=""),
        _row(13, object_boxes=[5.0, 0.0, 1.0, 4.0]),  # x1 < x0
    ]


def _by_key(problems: list[Problem]) -> dict[tuple[str | None, str | None], list[str]]:
    out: dict[tuple[str | None, str | None], list[str]] = {}
    for p in problems:
        out.setdefault((p.row_id, p.column), []).append(p.message)
    return out


EXPECTED_BROKEN = {
    ("dup-1", "id"): "duplicate id: 2 rows share it (rows 1, 2)",
    ("train-000003", "references"): "list lengths differ: references has 2, reference_widths 1",
    ("train-000004", "target"): "image not found: 'img/missing.png'",
    ("train-000005", "target"): "cannot decode image 'img/garbage.png'",
    ("train-000006", "references"): "reference 0: cannot decode image 'img/trunc.png'",
    ("train-000007", "target"): "decoded size 48x24 (WxH) does not match the manifest's 32x24",
    ("train-000008", "instruction"): "row has no text",
    ("train-000009", "face_landmarks"): "face_landmarks has 7 values; expected a multiple of 10",
    ("train-000009", "object_boxes"): "object_boxes has 5 values; expected a multiple of 4",
    ("train-000010", "target_width"): "target_width must be a positive integer, got 0",
    ("train-000011", "edit_mask"): "decoded size 10x10 (WxH) does not match the target's size 32x24",
    (None, "id"): "id is null or empty",
    ("train-000013", "object_boxes"): "x1 < x0",
}
FILE_KEYS = {
    ("train-000004", "target"),
    ("train-000005", "target"),
    ("train-000006", "references"),
    ("train-000007", "target"),
    ("train-000011", "edit_mask"),
}


def test_valid_manifest_passes(images):
    path = _write(images / "m.parquet", _valid_rows())
    m = Manifest.open(path, validate=True, check_files=True)
    report = validate_manifest_report(m, check_files=True)
    assert report.problems == [] and report.ok
    assert report.num_rows == 3 and report.images_checked == 4  # t, r, wide, mask (each decoded once)


def test_broken_manifest_reports_every_problem_with_row_and_column(images):
    path = _write(images / "m.parquet", _broken_rows())
    problems = validate_manifest(Manifest.open(path, validate=False), check_files=True)
    found = _by_key(problems)
    for key, fragment in EXPECTED_BROKEN.items():
        assert key in found, f"{key} not reported; got {sorted(found, key=str)}"
        assert any(fragment in msg for msg in found[key]), (key, found[key])
    assert ("train-000000", "target") not in found  # the valid row stays clean
    # The empty id is shown by row number, and the CLI-facing string names row and column.
    empty = next(p for p in problems if p.row_id is None and p.column == "id")
    assert empty.row_index == 12 and str(empty) == "row #12 column 'id': id is null or empty"
    missing = next(p for p in problems if p.row_id == "train-000004")
    assert str(missing).startswith("row 'train-000004' column 'target': image not found: 'img/missing.png'")
    # Row problems come in row order; each problem appears once.
    idx = [p.row_index for p in problems if p.row_index is not None]
    assert idx == sorted(idx)
    assert len({(p.row_id, p.column, p.message) for p in problems}) == len(problems)


def test_table_checks_only_without_files(images):
    path = _write(images / "m.parquet", _broken_rows())
    found = _by_key(validate_manifest(Manifest.open(path, validate=False), check_files=False))
    assert set(EXPECTED_BROKEN) - FILE_KEYS <= set(found)
    assert not FILE_KEYS & set(found)


def test_missing_and_mistyped_columns(images):
    rows = _broken_rows()
    table = pa.Table.from_pylist(rows, schema=manifest_schema(OPTIONAL)).drop_columns(["target_height"])
    table = table.set_column(
        table.column_names.index("target_width"),
        "target_width",
        pa.array([str(r["target_width"]) for r in rows]),
    )
    pq.write_table(table, images / "m.parquet")
    problems = validate_manifest(Manifest.open(images / "m.parquet", validate=False), check_files=True)
    assert str(problems[0]) == "column 'target_height': required column is missing"
    assert (
        str(problems[1]) == "column 'target_width': type string is not compatible with the schema type int32"
    )
    found = _by_key(problems)
    # Checks that need the dropped / mistyped columns are skipped; the others still run.
    assert not any(col in ("target_width", "target_height") for (rid, col) in found if rid is not None)
    assert ("dup-1", "id") in found and ("train-000004", "target") in found
    assert ("train-000007", "target") not in found  # no size to compare against


def test_compatible_types_are_accepted(images):
    # int64 sizes, large strings and integer boxes are all fine; an extra column is allowed silently.
    rows = _valid_rows()
    table = pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.large_string()),
            "task": pa.array([r["task"] for r in rows]).dictionary_encode(),
            "instruction": pa.array([r["instruction"] for r in rows]),
            "caption": pa.array([r["caption"] for r in rows]),
            "target": pa.array([r["target"] for r in rows]),
            "target_width": pa.array([r["target_width"] for r in rows], pa.int64()),
            "target_height": pa.array([r["target_height"] for r in rows], pa.int64()),
            "references": pa.array([r["references"] for r in rows]),
            "reference_widths": pa.array([r["reference_widths"] for r in rows], pa.list_(pa.int64())),
            "reference_heights": pa.array([r["reference_heights"] for r in rows], pa.list_(pa.int64())),
            "object_boxes": pa.array([[1, 2, 3, 4], None, []], pa.list_(pa.int64())),
            "aesthetic_score": pa.array([0.5, 0.7, 0.9]),
        }
    )
    pq.write_table(table, images / "m.parquet")
    assert validate_manifest(Manifest.open(images / "m.parquet", validate=False), check_files=True) == []


def test_manifest_open_raises_with_the_same_messages(images):
    path = _write(images / "m.parquet", _broken_rows())
    expected = validate_manifest(Manifest.open(path, validate=False), check_files=True)
    with pytest.raises(ManifestError) as info:
        Manifest.open(path, validate=True, check_files=True)
    err = info.value
    assert isinstance(err, ValueError) and err.problems == expected and err.path == path
    text = str(err)
    assert text.splitlines()[0] == f"invalid manifest {path}: {len(expected)} problems"
    for p in expected:
        assert f"  {p}" in text.splitlines()


def test_manifest_error_caps_printed_lines():
    problems = [Problem(f"r{i}", "target", "bad") for i in range(60)]
    lines = str(ManifestError("x.parquet", problems)).splitlines()
    assert len(lines) == 1 + 50 + 1 and lines[-1] == "  ... and 10 more"
    assert str(Problem(None, None, "just a message")) == "just a message"


def test_sample_is_deterministic_and_bounded(images):
    path = _write(images / "m.parquet", _broken_rows())
    m = Manifest.open(path, validate=False)
    a = validate_manifest_report(m, check_files=True, sample=4, seed=3)
    b = validate_manifest_report(m, check_files=True, sample=4, seed=3)
    assert a.problems == b.problems and a.images_checked == b.images_checked
    assert 1 <= a.images_checked <= 4 * 2  # at most target + one reference per sampled row here
    assert validate_manifest_report(m, check_files=True, sample=0).images_checked == 0
    full = validate_manifest_report(m, check_files=True)
    seen = {
        frozenset(set(_by_key(validate_manifest(m, check_files=True, sample=4, seed=s))) & FILE_KEYS)
        for s in range(12)
    }
    assert len(seen) > 1  # different seeds look at different rows
    assert all(s <= FILE_KEYS for s in seen) and full.images_checked >= a.images_checked


def test_vectorised_checks_cap_systematic_errors():
    n = 20_000
    table = pa.table(
        {
            "id": pa.array([f"r{i}" for i in range(n)]),
            "task": pa.array(["edit"] * n),
            "instruction": pa.array(["x"] * n),
            "target": pa.array(["t.png"] * n),
            "target_width": pa.array(np.zeros(n, dtype=np.int32)),  # every row bad
            "target_height": pa.array(np.full(n, 8, dtype=np.int32)),
            "references": pa.array([[]] * n, pa.list_(pa.string())),
            "reference_widths": pa.array([[]] * n, pa.list_(pa.int32())),
            "reference_heights": pa.array([[]] * n, pa.list_(pa.int32())),
        }
    )
    problems = validate_manifest(Manifest(table, root="."), max_per_check=10)
    assert len(problems) == 11
    assert [p.row_id for p in problems[:10]] == [f"r{i}" for i in range(10)]
    assert str(problems[-1]) == (
        f"column 'target_width': ... and {n - 10} more rows like: "
        "target_width must be a positive integer, got 0"
    )


def test_all_null_columns(images):
    # pandas writes an all-None column with Arrow type null: fine for nullable columns, and the rows
    # are still checked (here: one T2I row has no caption either, so it has no text).
    rows = _valid_rows()[:1] * 2
    table = pa.Table.from_pylist(rows, schema=manifest_schema(OPTIONAL)).drop_columns(["id", "caption"])
    table = table.append_column("id", pa.array(["a", "b"])).append_column("caption", pa.array(["x", None]))
    table = table.set_column(table.column_names.index("instruction"), "instruction", pa.nulls(2))
    found = _by_key(validate_manifest(Manifest(table, root=images)))
    assert found == {("b", "instruction"): [found[("b", "instruction")][0]]}
    table = table.set_column(table.column_names.index("target"), "target", pa.nulls(2))
    found = _by_key(validate_manifest(Manifest(table, root=images)))
    assert found[(None, "target")] == ["column is entirely null"]


def test_empty_manifest_is_valid(tmp_path):
    path = _write(tmp_path / "m.parquet", [])
    report = validate_manifest_report(Manifest.open(path, validate=False), check_files=True)
    assert report.ok and report.num_rows == 0


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_ok(images, capsys):
    path = _write(images / "m.parquet", _valid_rows())
    assert data_main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "OK: 3 rows, 4 images checked"
    assert data_main(["validate", str(path), "--no-files"]) == 0
    assert capsys.readouterr().out.strip() == "OK: 3 rows, 0 images checked"


def test_cli_reports_problems_and_exits_1(images, capsys):
    path = _write(images / "m.parquet", _broken_rows())
    expected = validate_manifest(Manifest.open(path, validate=False), check_files=True)
    assert data_main(["validate", str(path)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:-1] == [str(p) for p in expected]
    assert any(
        line.startswith("row 'train-000004' column 'target': image not found: 'img/missing.png'")
        for line in lines
    )
    assert lines[-1].startswith(f"FAILED: {len(expected)} problems in 14 rows")

    assert data_main(["validate", str(path), "--max-report", "2"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == [str(p) for p in expected[:2]]
    assert lines[2] == f"... and {len(expected) - 2} more (raise --max-report to see them)"

    assert data_main(["validate", str(path), "--no-files"]) == 1
    out = capsys.readouterr().out
    assert "image not found" not in out and "duplicate id" in out


def test_cli_unreadable_manifest_exits_2(tmp_path, capsys):
    bad = tmp_path / "m.parquet"
    bad.write_text("id,task\nnot,parquet\n")
    assert data_main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot read manifest {bad} as Parquet:") and "\n" not in err
    assert "Traceback" not in err
    assert data_main(["validate", str(tmp_path / "absent.parquet")]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_an_empty_manifest_fails_validation(tmp_path, capsys):
    # Issue 17 §4: an empty manifest passed `validate` as "OK: 0 rows".
    path = tmp_path / "manifest.parquet"
    pq.write_table(manifest_schema().empty_table(), path)
    assert data_main(["validate", str(path)]) == 1
    assert "has no rows" in capsys.readouterr().out


def _with_bad_utf8(table: pa.Table, column: str, row: int) -> pa.Table:
    """``table`` whose string ``column`` holds bytes 0xff 0xfe (not UTF-8) at ``row``: Arrow writes and reads
    such a file without complaint."""
    raw = [None if v is None else v.encode() for v in table.column(column).to_pylist()]
    raw[row] = b"make it \xff\xfe red"
    arr = pa.array(raw, type=pa.binary())
    bad = pa.Array.from_buffers(pa.string(), len(arr), arr.buffers())
    return table.set_column(table.column_names.index(column), column, bad)


def test_invalid_utf8_is_a_problem_naming_row_and_column(images, capsys):
    """The attack: a string column with invalid UTF-8 passed validate (or crashed later with no row named)."""
    rows = [_row(i) for i in range(3)]
    table = pa.Table.from_pylist(rows, schema=manifest_schema(OPTIONAL))
    path = images / "manifest.parquet"
    pq.write_table(_with_bad_utf8(table, "instruction", 1), path)
    problems = validate_manifest(Manifest.open(path, validate=False))
    assert [str(p) for p in problems] == [
        "row 'train-000001' column 'instruction': instruction holds bytes that are not valid UTF-8"
    ]
    assert data_main(["validate", str(path), "--no-files"]) == 1
    assert "not valid UTF-8" in capsys.readouterr().out
    pq.write_table(_with_bad_utf8(table, "id", 2), path)  # a broken id: the row is named by its index
    problems = validate_manifest(Manifest.open(path, validate=False))
    assert [str(p) for p in problems] == ["row #2 column 'id': id holds bytes that are not valid UTF-8"]
