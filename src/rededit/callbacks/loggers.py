"""What rededit sends to the experiment loggers besides metrics (``logger=[csv, tensorboard, wandb]``).

* :func:`log_config`: the resolved run config as every logger's hyperparameters (CSV ``hparams.yaml``,
  TensorBoard's HPARAMS tab, the wandb run config), so runs of a sweep can be compared by their settings.
  The stages keep no ``save_hyperparameters`` of their own (their arguments are built objects, not settings),
  so Lightning's own hyperparameter call at fit start is switched off instead of logging an empty set over
  this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from rededit.utils.logging import get_logger

log = get_logger(__name__)


def config_dict(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain, resolved containers (what the loggers store)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def log_config(trainer: L.Trainer, cfg: DictConfig | Mapping[str, Any], *modules: Any) -> dict[str, Any]:
    """Log the resolved ``cfg`` as hyperparameters to every logger of ``trainer``.

    Args:
        modules: the LightningModule / LightningDataModule of the run: without hyperparameters of their own,
            Lightning's fit-start call (an empty set) is switched off for them, so it does not replace ours.
    """
    params = config_dict(cfg)
    for module in modules:
        if module is not None and not getattr(module, "hparams_initial", None):
            module._log_hyperparams = False  # Lightning's switch (save_hyperparameters(logger=False) sets it)
    for lg in getattr(trainer, "loggers", ()):  # a stand-in trainer (tests) may have none
        lg.log_hyperparams(params)
    return params
