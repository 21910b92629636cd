"""What rededit sends to the experiment loggers besides metrics (``logger=[csv, tensorboard, wandb]``).

* :func:`log_config`: the resolved run config as every logger's hyperparameters (CSV ``hparams.yaml``,
  TensorBoard's HPARAMS tab, the wandb run config), so runs of a sweep can be compared by their settings.
  The stages keep no ``save_hyperparameters`` of their own (their arguments are built objects, not settings),
  so Lightning's own hyperparameter call at fit start is switched off instead of logging an empty set over
  this one.
* :func:`log_image`: a picture (the sample grids of :mod:`rededit.callbacks.sample_images`) to every logger
  that can show one (TensorBoard, wandb); the CSV logger cannot and is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
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


def log_image(trainer: L.Trainer, key: str, image: Any, step: int, caption: str | None = None) -> list[str]:
    """Log a PIL image (or ``[H, W, 3]`` uint8 array) to the TensorBoard and wandb loggers of ``trainer``.

    Returns:
        the names of the loggers that received it.
    """
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    sent = []
    for lg in getattr(trainer, "loggers", ()):  # a stand-in trainer (the edit-loop test) has none
        if isinstance(lg, TensorBoardLogger):
            lg.experiment.add_image(key, array, global_step=step, dataformats="HWC")
            sent.append("tensorboard")
        elif isinstance(lg, WandbLogger):
            lg.log_image(key=key, images=[image], step=step, caption=[caption] if caption else None)
            sent.append("wandb")
    return sent
