"""Rank-aware logging: library code logs through here, never ``print``."""

from __future__ import annotations

import logging
import os

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


def _rank() -> int:
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class _RankZeroFilter(logging.Filter):
    """Drop records on ranks > 0 unless the record asks for all ranks (``extra={"all_ranks": True}``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or _rank() == 0


def get_logger(name: str) -> logging.Logger:
    """Logger under the ``rededit`` hierarchy that only emits on rank 0 by default."""
    logger = logging.getLogger(name if name.startswith("rededit") else f"rededit.{name}")
    root = logging.getLogger("rededit")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logger
