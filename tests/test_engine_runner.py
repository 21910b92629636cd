"""The data-engine runner: partitions, content hashes, resumption after a crash, reports, configs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine_data import normal_corpus, photo, reasons_by_id, write_manifest
from rededit.data.schema import manifest_schema
from rededit.datagen.engine.runner import PipelineRunner, read_hash
from rededit.datagen.engine.stage import (
    BaseEngineStage,
    EngineStage,
    GlobalEngineStage,
    StageContext,
    apply_drops,
    kept_mask,
    set_column,
)


def text_manifest(path: Path, n: int) -> Path:
    """A manifest of ``n`` rows whose images are never read (the toy stages look at ids only)."""
    rows = [
        {
            "id": f"s{i:03d}",
            "task": "t2i",
            "instruction": f"row {i}",
            "target": f"img/{i}.png",
            "target_width": 64,
            "target_height": 64,
            "references": [],
            "reference_widths": [],
            "reference_heights": [],
        }
        for i in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema([])), path)
    return path


class DropMultiples(BaseEngineStage):
    """Drops rows whose number is a multiple of ``k``; logs every partition it computes into ``log_dir``;
    raises after ``_crash_after`` partitions (private: not part of the config hash, like a real crash)."""

    name = "multiples"

    def __init__(self, k: int, log_dir: str, name: str = "multiples"):
        self.k = k
        self.name = name
        self._log_dir = Path(log_dir)
        self._crash_after: int | None = None
        self._done = 0

    def process(self, table: pa.Table, ctx: StageContext) -> pa.Table:
        if self._crash_after is not None and self._done >= self._crash_after:
            raise RuntimeError("injected crash")
        self._done += 1
        self._log_dir.mkdir(parents=True, exist_ok=True)
        (self._log_dir / f"{self.name}.{ctx.partition}.{self._done}").touch()
        nums = [int(s[1:]) for s in table.column("id").to_pylist()]
        table = set_column(table, f"{self.name}_num", pa.array(nums, pa.int64()))
        return apply_drops(
            table, [self.drop(f"multiple_of_{self.k}") if n % self.k == 0 else None for n in nums]
        )


def computed(log_dir: Path, name: str) -> list[str]:
    return sorted(p.name.split(".")[1] for p in log_dir.glob(f"{name}.*"))


def test_stage_contract_types() -> None:
    assert isinstance(DropMultiples(2, "/tmp/x"), EngineStage)


def test_runner_partitions_reports_and_never_loses_rows(tmp_path) -> None:
    manifest = text_manifest(tmp_path / "m" / "manifest.parquet", 25)
    logs = tmp_path / "logs"
    stages = [DropMultiples(3, logs, "by3"), DropMultiples(2, logs, "by2")]
    res = PipelineRunner(stages, tmp_path / "out", partition_rows=10).run(manifest)
    assert res.partitions == ["part-00000", "part-00001", "part-00002"]
    table = pq.read_table(res.result_path)
    assert table["id"].to_pylist() == [f"s{i:03d}" for i in range(25)]  # every row, in order
    why = reasons_by_id(table)
    assert why["s003"] == "by3:multiple_of_3" and why["s006"] == "by3:multiple_of_3"  # first stage wins
    assert why["s004"] == "by2:multiple_of_2" and why["s005"] is None
    kept = pq.read_table(res.kept_path)
    assert kept["id"].to_pylist() == [s for s, r in why.items() if r is None]
    assert "drop_reason" not in kept.column_names and "by2_num" in kept.column_names
    rep = json.loads((res.out_dir / "report.json").read_text())
    by3, by2 = rep["stages"]
    assert by3 == {
        "index": 0,
        "stage": "by3",
        "rows": 25,
        "kept_in": 25,
        "kept_out": 16,
        "dropped": {"by3:multiple_of_3": 9},
    }
    assert by2["kept_in"] == 16 and by2["dropped"] == {"by2:multiple_of_2": 8} and by2["kept_out"] == 8
    md = (res.out_dir / "report.md").read_text()
    assert "| by3:multiple_of_3 | 9 |" in md
    assert (res.out_dir / "stages" / "01_by2" / "report.md").is_file()


def test_runner_resumes_after_a_crash_without_redoing_finished_partitions(tmp_path) -> None:
    manifest = text_manifest(tmp_path / "m" / "manifest.parquet", 50)
    logs = tmp_path / "logs"
    out = tmp_path / "out"
    crashing = DropMultiples(3, logs, "by3")
    crashing._crash_after = 2  # dies while computing its 3rd of 5 partitions
    with pytest.raises(RuntimeError, match="injected crash"):
        PipelineRunner([crashing, DropMultiples(2, logs, "by2")], out, partition_rows=10).run(manifest)
    assert computed(logs, "by3") == ["part-00000", "part-00001"]
    assert not list(out.glob("stages/00_by3/.*tmp"))  # no half-written partition left behind
    # rerun: only the rest of stage 0 is computed, then stage 1 in full
    res = PipelineRunner(
        [DropMultiples(3, logs, "by3"), DropMultiples(2, logs, "by2")], out, partition_rows=10
    ).run(manifest)
    assert computed(logs, "by3") == [f"part-{i:05d}" for i in range(5)]  # each partition exactly once
    assert res.computed("by3") == ["part-00002", "part-00003", "part-00004"]
    assert len(pq.read_table(res.result_path)) == 50
    # a finished run recomputes nothing
    res = PipelineRunner(
        [DropMultiples(3, logs, "by3"), DropMultiples(2, logs, "by2")], out, partition_rows=10
    ).run(manifest)
    assert res.computed("by3") == [] and res.computed("by2") == []
    # a changed config recomputes that stage and everything downstream; a changed row only its partition
    res = PipelineRunner(
        [DropMultiples(3, logs, "by3"), DropMultiples(5, logs, "by2")], out, partition_rows=10
    ).run(manifest)
    assert res.computed("by3") == [] and len(res.computed("by2")) == 5
    t = pq.read_table(manifest)
    t = t.set_column(
        2,
        "instruction",
        pa.array(["changed" if i == 42 else v for i, v in enumerate(t["instruction"].to_pylist())]),
    )
    pq.write_table(t, manifest)
    res = PipelineRunner(
        [DropMultiples(3, logs, "by3"), DropMultiples(5, logs, "by2")], out, partition_rows=10
    ).run(manifest)
    assert res.computed("by3") == ["part-00004"] and res.computed("by2") == ["part-00004"]


class CountingGlobal(GlobalEngineStage):
    """Keeps rows whose number is at most the corpus median (a fitted threshold), counting fits."""

    name = "median"

    def __init__(self, fits_file: str):
        self._fits_file = Path(fits_file)
        self._median: float | None = None

    def fit(self, partitions, ctx) -> None:
        nums = [int(s[1:]) for t in partitions for s, k in zip(t["id"].to_pylist(), kept_mask(t)) if k]
        self._median = sorted(nums)[len(nums) // 2]
        with self._fits_file.open("a") as f:
            f.write("fit\n")

    def state_dict(self):
        return {"median": self._median}

    def load_state_dict(self, state) -> None:
        self._median = state["median"]

    def process(self, table, ctx):
        nums = [int(s[1:]) for s in table["id"].to_pylist()]
        return apply_drops(table, [self.drop("above_median") if n > self._median else None for n in nums])


def test_global_stage_fits_once_and_restores_its_state(tmp_path) -> None:
    manifest = text_manifest(tmp_path / "m" / "manifest.parquet", 21)
    fits = tmp_path / "fits.txt"
    out = tmp_path / "out"
    res = PipelineRunner([CountingGlobal(str(fits))], out, partition_rows=5).run(manifest)
    assert reasons_by_id(pq.read_table(res.result_path))["s011"] == "median:above_median"
    state = json.loads((out / "stages" / "00_median" / "state.json").read_text())
    assert state["state"] == {"median": 10}
    # remove one output partition: the state is restored from state.json, not refitted
    (out / "stages" / "00_median" / "part-00002.parquet").unlink()
    res = PipelineRunner([CountingGlobal(str(fits))], out, partition_rows=5).run(manifest)
    assert fits.read_text().count("fit") == 1 and res.computed("median") == ["part-00002"]
    assert read_hash(out / "stages" / "00_median" / "part-00002.parquet") is not None


class BadStage(BaseEngineStage):
    name = "bad"

    def process(self, table, ctx):
        return table.slice(0, table.num_rows - 1)


def test_a_stage_that_loses_rows_fails_loudly(tmp_path) -> None:
    manifest = text_manifest(tmp_path / "m" / "manifest.parquet", 4)
    with pytest.raises(ValueError, match=r"stage 'bad'.*rows are never removed"):
        PipelineRunner([BadStage()], tmp_path / "out").run(manifest)


def test_engine_configs_compose_and_instantiate(tmp_path) -> None:
    from rededit.cli.data_pipeline import CONF_DIR, build_runner, compose_engine

    options = sorted(p.stem for p in (CONF_DIR / "engine" / "pipeline").glob("*.yaml"))
    assert {"dedup", "filter", "full"} <= set(options)
    for option in options:
        cfg = compose_engine([f"engine/pipeline@pipeline={option}", "manifest=m", f"out_dir={tmp_path}"])
        runner = build_runner(cfg)
        assert runner.stages and all(isinstance(s, EngineStage) for s in runner.stages), option


def test_cli_pipeline_runs_the_filter_config(tmp_path, capsys) -> None:
    from rededit.cli.data import main

    targets = {f"n{i}": a for i, a in enumerate(normal_corpus(6, 96))}
    targets["dup"] = targets["n0"].copy()
    manifest = write_manifest(tmp_path / "d", targets)
    out = tmp_path / "out"
    assert main(["pipeline", f"manifest={manifest}", f"out_dir={out}", "partition_rows=3"]) == 0
    why = reasons_by_id(pq.read_table(out / "result.parquet"))
    assert why["dup"] == "exact_dedup:duplicate"
    assert "exact_dedup:duplicate" in capsys.readouterr().out
    assert main(["pipeline", "out_dir=x"]) == 2  # manifest missing: a clear error, no traceback


@pytest.mark.slow
@pytest.mark.multiprocess
def test_process_pool_matches_in_process(tmp_path) -> None:
    from rededit.datagen.engine.filters import ExactDedup, PhotometricFilter

    targets = {f"n{i}": a for i, a in enumerate(normal_corpus(8, 96))}
    targets["dup"] = targets["n1"].copy()
    manifest = write_manifest(tmp_path / "d", targets)
    one = PipelineRunner([ExactDedup(), PhotometricFilter()], tmp_path / "a", partition_rows=3).run(manifest)
    two = PipelineRunner(
        [ExactDedup(), PhotometricFilter()], tmp_path / "b", partition_rows=3, workers=2
    ).run(manifest)
    assert pq.read_table(one.result_path).equals(pq.read_table(two.result_path))


def test_ray_backend_if_installed(tmp_path) -> None:
    pytest.importorskip("ray.data")
    manifest = text_manifest(tmp_path / "m" / "manifest.parquet", 20)
    stage = DropMultiples(3, tmp_path / "logs", "by3")
    res = PipelineRunner([stage], tmp_path / "out", partition_rows=5, backend="ray", workers=2).run(manifest)
    assert len(pq.read_table(res.result_path)) == 20 and len(pq.read_table(res.kept_path)) == 13


def test_photo_helper_is_real() -> None:
    assert photo("astronaut").std() > 20


@pytest.mark.slow  # ~15 s on the shared 2-core box
def test_benchmark_smoke(tmp_path, capsys) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "data_engine" / "run.py"
    spec = importlib.util.spec_from_file_location("data_engine_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--rows", "12", "--size", "48", "--partition-rows", "4", "--repeats", "1"]
    assert bench.main([*argv, "--stages", "exact_dedup", "photometric"]) == 0
    out = capsys.readouterr().out
    assert "| exact_dedup | 12 |" in out and "| photometric | 12 |" in out


def test_split_streams_exact_partitions_and_hashes_ignore_chunking(tmp_path) -> None:
    from rededit.datagen.engine.runner import table_hash

    manifest = text_manifest(tmp_path / "m" / "manifest.parquet", 23)
    pq.write_table(
        pq.read_table(manifest), manifest, row_group_size=4
    )  # batches do not align with partitions
    runner = PipelineRunner([], tmp_path / "out", partition_rows=10)
    parts = runner.split(manifest)
    tables = [pq.read_table(tmp_path / "out" / "input" / f"{n}.parquet") for n, _ in parts]
    assert [t.num_rows for t in tables] == [10, 10, 3]
    assert pa.concat_tables(tables)["id"].to_pylist() == pq.read_table(manifest)["id"].to_pylist()
    t = pq.read_table(manifest)
    assert table_hash(t.slice(0, 10)) == table_hash(pa.concat_tables([t.slice(0, 4), t.slice(4, 6)]))
    assert table_hash(t.slice(0, 10)) != table_hash(t.slice(1, 10))
