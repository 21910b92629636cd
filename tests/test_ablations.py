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
        seen.add(str(key))
        if "seed=0" in job:  # building is the expensive part: one seed per factor value
            stage = instantiate(cfg.stage, text_encoder=None)
            stage.configure_model()
            assert stage.configure_optimizers() is not None
        assert cfg.trainer.max_steps > 0 and study_factor
    assert len(seen) >= 2
