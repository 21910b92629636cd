"""Judges of edit quality (report §4.2).

:mod:`.programmatic` holds the exact checks of the synthetic bench. Its names are re-exported lazily so
that importing a light sibling module (a VLM judge's response parsing) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PROGRAMMATIC = (
    "JUDGES",
    "JudgeResult",
    "bench_sample",
    "judge",
    "judge_many",
    "preservation_check",
    "success_rate_by_category",
)

__all__ = list(_PROGRAMMATIC)


def __getattr__(name: str) -> Any:
    if name in _PROGRAMMATIC:
        return getattr(importlib.import_module("rededit.scoring.judges.programmatic"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
