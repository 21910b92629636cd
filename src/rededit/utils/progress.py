"""Progress of long commands that a user can read in a terminal *and* in a log file.

In a terminal a tqdm bar redraws in place. Outside one (a SLURM ``.out`` file, ``make``, CI) a redrawn bar
is useless: tqdm writes carriage-return frames onto one ever-growing line and Rich writes only the last
frame. There :class:`Progress` logs one line every ``every_s`` seconds (and at the end) through the
``rededit.progress`` logger, so the line also lands in Hydra's job log::

    synth: 1200/6000 (20%) | 35.2 samples/s | elapsed 0:00:34 | ETA 0:02:16

``every_s`` defaults to ``$REDEDIT_PROGRESS_SECONDS`` (30 s). The training loop's bar is
:mod:`rededit.callbacks.progress` (the same line format).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from rededit.utils.logging import get_logger

log = get_logger("rededit.progress")
T = TypeVar("T")
DEFAULT_SECONDS = 30.0


def default_interval() -> float:
    """Seconds between two progress lines outside a terminal (``$REDEDIT_PROGRESS_SECONDS``, default 30)."""
    raw = os.environ.get("REDEDIT_PROGRESS_SECONDS")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced by an object without isatty
        return False


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(
    desc: str,
    done: int,
    total: int | None,
    elapsed: float,
    *,
    rate: float | None = None,
    unit: str = "items",
    eta: float | None = None,
    extra: str = "",
) -> str:
    """One progress line: ``desc: done/total (pct) | extra | rate unit/s | elapsed | ETA``.

    Args:
        rate: the shown rate (``unit`` per second); None: ``done / elapsed``.
        eta: seconds left; None: ``(total - done)`` at ``done / elapsed`` (shown only with a total).
    """
    head = f"{desc}: {done}/{total} ({100.0 * done / total:.0f}%)" if total else f"{desc}: {done}"
    parts = [head]
    if extra:
        parts.append(extra)
    pace = done / elapsed if elapsed > 0 else float("nan")
    rate = pace if rate is None else rate
    if math.isfinite(rate):
        parts.append(f"{rate:.3g} {unit}/s")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if total:
        if eta is None:
            eta = (total - done) / pace if pace > 0 else float("nan")
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


class Progress:
    """Progress of one loop: a tqdm bar in a terminal, periodic log lines elsewhere.

    Args:
        total: number of items (None when unknown: no percentage or ETA).
        desc: what is counted (the line's prefix).
        unit: the rate's unit.
        every_s: seconds between lines outside a terminal (None: :func:`default_interval`).
        terminal: force the terminal (True) or line (False) form; None: whether stdout is a terminal.
        initial: items already done (a resumed command).

    Use as a context manager (``update(n)``) or through :func:`track`.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "items",
        every_s: float | None = None,
        terminal: bool | None = None,
        initial: int = 0,
    ):
        self.total = None if total is None else int(total)
        self.desc, self.unit = desc, unit
        self.every_s = default_interval() if every_s is None else float(every_s)
        self.done = self.initial = int(initial)
        self.start = self._last = time.monotonic()
        self._bar: Any = None
        if is_terminal() if terminal is None else terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit.rstrip("s") or unit, initial=self.initial)

    def update(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s and (self.total is None or self.done < self.total):
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - self.done) / rate if self.total and rate > 0 else None
        log.info(progress_line(self.desc, self.done, self.total, elapsed, rate=rate, unit=self.unit, eta=eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done > self.initial or self.total == 0:
            self._emit(time.monotonic())
            self.initial = self.done  # closed twice: one final line

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    *,
    unit: str = "items",
    every_s: float | None = None,
    terminal: bool | None = None,
) -> Iterator[T]:
    """Iterate ``iterable`` showing :class:`Progress` (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit=unit, every_s=every_s, terminal=terminal) as bar:
        for item in iterable:
            yield item
            bar.update(1)
