"""Rank-aware logging: library code logs through here, never ``print``.

Loggers live in the standard tree (``rededit.<module>``) and *propagate*: under Hydra
(``rededit-train``, ``rededit-eval``, ``rededit-data pipeline``) the root logger's handlers write
them to the console and to the job log (``<run>/train.log``, ``evaluate.log``). Ranks above 0
are silenced by a :class:`logging.Filter` on each rededit logger (a record asks for every rank
with ``extra={"all_ranks": True}``), not by a separate handler chain. Outside Hydra (plain
scripts, argparse CLIs, tests) the root logger has no handler; then a fallback handler on the
``rededit`` logger prints INFO and above, and stays silent as soon as the root has handlers, so
nothing is printed twice.
"""

from __future__ import annotations

import logging
import os

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


def _rank() -> int:
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class RankZeroFilter(logging.Filter):
    """Drop records on ranks > 0 unless the record asks for all ranks (``extra={"all_ranks": True}``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or _rank() == 0


_RANK_ZERO = RankZeroFilter()


class _FallbackHandler(logging.StreamHandler):
    """Prints only while the root logger has no handler (no Hydra job logging, no ``basicConfig``)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def _configure_package_logger() -> logging.Logger:
    root = logging.getLogger("rededit")
    if not any(isinstance(h, _FallbackHandler) for h in root.handlers):
        handler = _FallbackHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addFilter(_RANK_ZERO)
    return root


def get_logger(name: str) -> logging.Logger:
    """Logger under the ``rededit`` hierarchy that only emits on rank 0 by default.

    A logger filter applies only to records created on that logger, so every logger handed out here
    carries the rank-zero filter itself.
    """
    _configure_package_logger()
    logger = logging.getLogger(name if name.startswith("rededit") else f"rededit.{name}")
    if _RANK_ZERO not in logger.filters:
        logger.addFilter(_RANK_ZERO)
    return logger
