"""``rededit-data pipeline [OVERRIDES...]``: run data-engine stages over a manifest (conf/engine.yaml).

Overrides are Hydra overrides of ``conf/engine.yaml``, e.g. ``manifest=m.parquet out_dir=out
engine/pipeline@pipeline=dedup workers=2``. Exit codes: 0 done, 2 bad configuration or input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rededit.datagen.engine.runner import PipelineRunner
from rededit.utils.paths import CONF_DIR


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pipeline",
        help="run the data engine (dedup, photometric, artifact filters, ...) over a manifest",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/engine.yaml (key=value)")
    p.add_argument("--config-dir", default=str(CONF_DIR), help="folder holding engine.yaml (default: conf/)")
    p.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    p.set_defaults(func=run)
    return p


def compose_engine(overrides: list[str], config_dir: str | Path = CONF_DIR):
    """Compose ``engine.yaml`` with ``overrides`` (no Hydra run directory, no logging setup)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose("engine", overrides=list(overrides))


def build_runner(cfg):
    """A :class:`~rededit.datagen.engine.runner.PipelineRunner` with the config's stages instantiated."""
    from hydra.utils import instantiate

    stages = [instantiate(s) for s in cfg.pipeline.stages]
    return PipelineRunner(
        stages,
        cfg.out_dir,
        partition_rows=cfg.partition_rows,
        workers=cfg.workers,
        backend=cfg.backend,
        seed=cfg.seed,
        mp_context=cfg.mp_context,
        ray_num_gpus=cfg.ray_num_gpus,
    )


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_engine(args.overrides, args.config_dir)
    if args.cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    try:
        runner = build_runner(cfg)
        result = runner.run(cfg.manifest)
    except (MissingMandatoryValue, FileNotFoundError, ValueError) as e:
        print(f"rededit-data pipeline: {e}", file=sys.stderr)
        return 2
    print((result.out_dir / "report.md").read_text(), end="")
    print(f"kept rows: {result.kept_path}\nall rows with drop_reason: {result.result_path}")
    return 0
