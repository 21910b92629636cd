"""Configs read back from a folder may come from anyone: only known ``_target_``s get instantiated.

A run's ``config.yaml`` or an export's ``rededit.yaml`` is handed around with the weights, and
``hydra.utils.instantiate`` calls whatever its ``_target_`` names (``pathlib.Path.write_text``,
``torch.load`` with ``weights_only=False``, ``os.system``, ...). The user's own command line is trusted;
a config *read from a folder* (``rededit-edit``/``rededit-eval`` ``--checkpoint``, ``rededit-consolidate``,
the demo report, DPO pair making) goes through :func:`load_trusted_config` first, which refuses the file
unless every ``_target_`` in it is

* a class under ``rededit.`` (our own components; functions are not callable from a file, except those in
  :data:`TRUSTED_REDEDIT_FUNCTIONS`), or
* one of :data:`TRUSTED_TARGETS` (the third-party classes our presets name: the optimiser, Lightning's
  trainer, strategies, loggers and callbacks).

Nothing outside ``rededit.`` is imported to check a name: importing a module can run code (a
``my_module.py`` in the working directory would do), so unknown prefixes are refused by name alone.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Third-party `_target_`s that rededit's own presets use (conf/): classes with no file or code side effects
# at construction beyond what the config says.
TRUSTED_TARGETS = frozenset(
    {
        "torch.optim.AdamW",
        "torch.optim.Adam",
        "torch.optim.SGD",
        "lightning.Trainer",
        "lightning.pytorch.Trainer",
        "lightning.pytorch.strategies.DDPStrategy",
        "lightning.pytorch.strategies.FSDPStrategy",
        "lightning.pytorch.strategies.DeepSpeedStrategy",
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.loggers.WandbLogger",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning.pytorch.callbacks.RichProgressBar",
    }
)
# rededit functions a preset names as a `_target_` (everything else under rededit. must be a class).
TRUSTED_REDEDIT_FUNCTIONS = frozenset(
    {"rededit.parallel.parallelize.block_classes", "rededit.callbacks.progress.progress_bar"}
)


class UntrustedConfigError(ValueError):
    """A config read from a folder names a ``_target_`` that rededit does not instantiate from files."""


def _targets(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(key path, target value)`` of every ``_target_`` in a config tree (interpolations resolved)."""
    if isinstance(node, DictConfig):
        for key in node:
            child_path = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield child_path, node[key]  # reading the key resolves an interpolation
            else:
                yield from _targets(node._get_node(key), child_path)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _targets(node._get_node(i), f"{path}[{i}]")


def _is_trusted(target: Any, extra_prefixes: tuple[str, ...] = ()) -> bool:
    if not isinstance(target, str):
        return False
    if target in TRUSTED_TARGETS or target in TRUSTED_REDEDIT_FUNCTIONS:
        return True
    if any(target.startswith(prefix) for prefix in extra_prefixes):
        return True
    if not target.startswith("rededit."):
        return False
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return False
    return inspect.isclass(obj)


def check_trusted_targets(
    cfg: DictConfig | ListConfig, source: str | os.PathLike, extra_prefixes: tuple[str, ...] = ()
) -> None:
    """Raise :class:`UntrustedConfigError` naming the first ``_target_`` of ``cfg`` that is not trusted.

    Args:
        cfg: the config as loaded from ``source``.
        source: the file it came from (for the message).
        extra_prefixes: ``_target_`` prefixes the user trusts on their own command line (e.g. their lab's
            ``my_lab.rewards.``); never read from a file.
    """
    for key, target in _targets_safely(cfg, source):
        if not _is_trusted(target, tuple(extra_prefixes)):
            raise UntrustedConfigError(
                f"{source}: refused `{key}: {target!r}` — a config read from a folder may only instantiate "
                "classes under rededit. and the trainer/optimiser/logger classes of rededit's presets "
                "(rededit.utils.trusted_config.TRUSTED_TARGETS). If you wrote this config yourself, pass its "
                "values on your own command line instead."
            )


def _targets_safely(cfg: Any, source: str | os.PathLike) -> list[tuple[str, Any]]:
    try:
        return list(_targets(cfg, ""))
    except Exception as err:  # an interpolation that does not resolve outside the run that wrote it
        raise UntrustedConfigError(f"{source}: a `_target_` could not be read: {err}") from err


def load_trusted_config(path: str | os.PathLike, extra_prefixes: tuple[str, ...] = ()) -> DictConfig:
    """``OmegaConf.load(path)`` after checking every ``_target_`` (see the module docstring and
    :func:`check_trusted_targets` for ``extra_prefixes``)."""
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise UntrustedConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    check_trusted_targets(cfg, path, extra_prefixes)
    return cfg
