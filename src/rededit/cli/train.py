"""``rededit-train`` / ``python -m rededit.cli.train``: one Hydra entry point for every stage.

    rededit-train experiment=demo_pretrain
    rededit-train experiment=sft stage.init_from=outputs/runs/pretrain/<date>   # weights-only chaining
    REDEDIT_RUN_ID=r1 rededit-train experiment=sft ckpt_path=auto   # resume outputs/runs/sft/r1 if it has last.ckpt

What a run does and writes: :mod:`rededit.train`. A config value that cannot work is one sentence naming the
key (exit code 2), and the run folder Hydra made for it is taken back.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rededit.cli import help as entry_help
from rededit.train import PROCESS_START, run
from rededit.utils.config_checks import ConfigError, remove_unstarted_run, report
from rededit.utils.logging import get_logger
from rededit.utils.paths import CONF_DIR

log = get_logger(__name__)
entry_help.register()


def objective(metrics: dict[str, float], name: str | None) -> float | None:
    """The value of the configured ``optimized_metric`` (what a Hydra sweeper such as Optuna minimises or
    maximises; lightning-hydra-template's convention). A name that was never logged is an error that lists
    what was, not a ``None`` the sweeper fails on later."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric={name} was not logged by this run; logged: {', '.join(sorted(metrics))}"
        )
    return float(metrics[name])


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        result = run(cfg)
    except ConfigError as err:
        # Hydra made the run folder (its log) before this function: take it back with the message.
        remove_unstarted_run(cfg.paths.output_dir, PROCESS_START)
        raise SystemExit(report(err, "rededit-train")) from None
    log.info("done: %s", result["metrics"])
    return objective(result["metrics"], cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
