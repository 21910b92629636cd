"""Every ablation study (conf/ablation/*.yaml) expands into its jobs, and every job composes and builds.

The expansion is Hydra's own: the BasicSweeper's parser turns ``hydra.sweeper.params`` into sweeps and
their cartesian product is the job list a ``rededit-train +ablation=<study>`` multirun launches.
"""

from __future__ import annotations

import itertools

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose

STUDIES = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))


def expand_jobs(study: str) -> tuple[list[list[str]], object]:
    """(per-job override lists, composed study config with its hydra node)."""
    cfg = compose([f"+ablation={study}"], keep_hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False)
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        (override,) = parser.parse_overrides([f"{key}={value}"])
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
        axes.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*axes)], cfg


def test_there_are_studies() -> None:
    assert {"timestep_sampling", "loss_weighting", "curriculum", "ema", "sia", "caption_mix"} <= set(STUDIES)


@pytest.mark.parametrize("study", STUDIES)
def test_study_is_a_seeded_multirun(study: str) -> None:
    jobs, cfg = expand_jobs(study)
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    assert cfg.ablation.name == study and cfg.ablation.claim and cfg.ablation.section
    seeds = {o for job in jobs for o in job if o.startswith("seed=")}
    assert len(seeds) >= 3, f"{study}: fewer than 3 seeds"
    factor_values = {o for job in jobs for o in job if o.startswith(f"{cfg.ablation.factor}=")}
    assert len(factor_values) >= 2, f"{study}: the factor {cfg.ablation.factor} takes a single value"


@pytest.mark.parametrize("study", STUDIES)
def test_every_job_composes_and_builds(study: str, tmp_path) -> None:
    jobs, _ = expand_jobs(study)
    seen = set()
    for job in jobs:
        cfg = compose([f"+ablation={study}", *job], output_dir=tmp_path)
        key = OmegaConf.select(cfg, study_factor := cfg.ablation.factor)
        # A config group (e.g. loss/consistency) has no node of its name: compare what it composes.
        if key is None and "seed=0" in job:
            key = OmegaConf.to_yaml(cfg.stage)
        if key is not None:
            seen.add(str(key))
        if "seed=0" in job:  # building is the expensive part: one seed per factor value
            stage = instantiate(cfg.stage, text_encoder=None)
            stage.configure_model()
            assert stage.configure_optimizers() is not None
        assert cfg.trainer.max_steps > 0 and study_factor
    assert len(seen) >= 2


def test_consistency_study_trains_sft_on_portraits(tmp_path) -> None:
    jobs, _ = expand_jobs("consistency")
    arms = {}
    for job in jobs:
        if "seed=0" in job:
            cfg = compose(["+ablation=consistency", *job], output_dir=tmp_path)
            assert cfg.stage._target_.endswith("SFTModule")
            assert cfg.data.manifest.endswith("outputs/ablations/portraits/manifest.parquet")
            arms[next(o for o in job if o.startswith("loss/consistency="))] = cfg.stage.auxiliary_losses
    assert set(arms) == {"loss/consistency=none", "loss/consistency=face"}
    assert not arms["loss/consistency=none"] and arms["loss/consistency=face"].loss_id.max_samples is None


def test_identity_eval_scores_portrait_edits(tmp_path) -> None:
    """The consistency study's held-out figure on an untrained editor: every bench portrait scored, the
    degraded input (blur + colour cast) scores below 1, results cached per weights."""
    import sys

    from conftest import REPO, untrained_tiny_export
    from rededit.datagen.synth.portraits import make_portrait_corpus

    sys.path.insert(0, str(REPO / "experiments" / "ablations"))
    from identity_eval import bench_items, evaluate_identity

    manifest, report = make_portrait_corpus(tmp_path / "corpus", rows=6, bench_n=3)
    assert "0 unreadable" in report
    items = bench_items(manifest)
    assert len(items) == 3 and all(it["landmarks"].shape == (1, 5, 2) for it in items)
    untrained_tiny_export(tmp_path / "job")
    result = evaluate_identity(tmp_path / "job", manifest, steps=2)
    assert result["n"] == 3 and result["weights"] == "ema"
    assert 0.3 < result["id_sim_input"] < 0.97  # blur + colour cast: the same person, degraded
    assert -1.0 <= result["id_sim"] <= 1.0
    assert result["id_gain"] == pytest.approx(result["id_sim"] - result["id_sim_input"])
    assert (tmp_path / "job" / "eval_identity_ema.json").exists()
    assert evaluate_identity(tmp_path / "job", manifest, steps=2) == result


def test_collector_finds_nested_job_folders_and_reads_the_factor(tmp_path) -> None:
    """A group override (``loss/consistency=face``) nests a job folder one level deeper; the collector finds
    every job, labels it by its command-line choice and computes the loss statistics of the second half."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "ablation_collect", REPO / "experiments/ablations/collect.py"
    )
    col = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(col)
    meta = {"name": "consistency", "section": "§3.7", "claim": "c", "factor": "loss/consistency"}
    for arm in ("none", "face"):
        for seed in (0, 1):
            job = tmp_path / "loss" / f"consistency-{arm}__seed-{seed}"
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(f"- loss/consistency={arm}\n- seed={seed}\n")
            (job / "config.yaml").write_text(OmegaConf.to_yaml({"seed": seed, "ablation": meta}))
            (job / "logs").mkdir()
            rows = "".join(f"{s},{1.0 + (s % 2) * (seed + 1)}\n" for s in range(10))
            (job / "logs" / "metrics.csv").write_text("step,train/loss_step\n" + rows)
    result = col.collect("consistency", tmp_path, 4, do_eval=False)
    assert sorted(result["summary"]) == ["face", "none"]
    assert all(s["seeds"] == [0, 1] for s in result["summary"].values())
    # second half = steps 5..9: losses alternate 1 and 1 + (seed + 1)
    job0 = next(j for j in result["jobs"] if j["factor"] == "none" and j["seed"] == 0)
    assert job0["loss_mean"] == pytest.approx((3 * 2.0 + 2 * 1.0) / 5)


def test_study_metrics_follow_the_study_file() -> None:
    """The held-out figures of a table come from ``ablation.metrics`` (FireEdit's L1/L2), default otherwise;
    an unknown name is an error, not a silently empty column."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "ablation_collect", REPO / "experiments/ablations/collect.py"
    )
    col = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(col)
    fireedit = OmegaConf.to_container(compose(["+ablation=fireedit"]).ablation, resolve=True)
    assert [k for k, _, _ in col.study_metrics(fireedit)] == [
        "l1",
        "l2",
        "psnr_outside",
        "success",
        "error_ratio",
    ]
    assert col.study_metrics({}) == col.METRICS
    with pytest.raises(SystemExit, match="clip_i"):
        col.study_metrics({"metrics": ["l1", "clip_i"]})
