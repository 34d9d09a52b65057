"""Progress of long command-line actions: a rich bar on a terminal, plain lines otherwise.

The work reports through :class:`ProgressSink` (``start(total)``, ``advance(n)``) and knows
nothing about terminals, so library code (the vulnerability database import, the audit log
check, the scanner) takes a sink and the command decides how it is shown. On a terminal the bar
is drawn on stderr and erased at the end (the command prints its summary); in a pipe or a log
file a line every ``interval`` seconds says how far it got, so a long run in CI or under
systemd shows it is alive without flooding the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .status_view import format_bytes

__all__ = ["NO_PROGRESS", "PLAIN_INTERVAL", "ProgressSink", "show_progress"]

PLAIN_INTERVAL = 10.0  # seconds between two plain progress lines

Unit = Literal["bytes", "items"]


class ProgressSink(Protocol):
    """Where work reports how far it got."""

    def start(self, total: float | None) -> None:
        """The amount of work, once known (``None``: unknown); counting starts (again) from 0."""

    def advance(self, amount: float = 1) -> None:
        """``amount`` more is done."""


class _NoProgress:
    def start(self, total: float | None) -> None:
        pass

    def advance(self, amount: float = 1) -> None:
        pass


NO_PROGRESS: ProgressSink = _NoProgress()


class _Bar:
    def __init__(self, progress: Progress, description: str) -> None:
        self._progress = progress
        self._task = progress.add_task(description, total=None)

    def start(self, total: float | None) -> None:
        self._progress.update(self._task, total=total, completed=0)

    def advance(self, amount: float = 1) -> None:
        self._progress.advance(self._task, amount)


class _PlainLines:
    """``description: 1200/5000 records (24%)`` at most once per interval."""

    def __init__(self, console: Console, description: str, unit: Unit, label: str,
                 clock: Callable[[], float], interval: float) -> None:
        self._console, self._description, self._unit, self._label = console, description, unit, label
        self._clock, self._interval = clock, interval
        self._total: float | None = None
        self._done = 0.0
        self._last = clock()

    def _amount(self, value: float) -> str:
        return format_bytes(value) if self._unit == "bytes" else f"{int(value)}"

    def start(self, total: float | None) -> None:
        self._total, self._done = total, 0.0

    def advance(self, amount: float = 1) -> None:
        self._done += amount
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._last = now
        line = f"{self._description}: {self._amount(self._done)}"
        if self._total:
            line += f"/{self._amount(self._total)}"
        if self._label:
            line += f" {self._label}"
        if self._total:
            line += f" ({100 * self._done / self._total:.0f}%)"
        self._console.print(line, highlight=False, soft_wrap=True)


@contextmanager
def show_progress(description: str, *, unit: Unit = "items", label: str = "", console: Console | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  interval: float = PLAIN_INTERVAL) -> Iterator[ProgressSink]:
    """A sink that shows ``description``'s progress on ``console`` (default: stderr).

    Args:
        unit: ``bytes`` shows sizes and speed, ``items`` counts (``label`` names them: "records").
        clock, interval: when plain lines are printed (not on a terminal).
    """
    console = console if console is not None else Console(stderr=True)
    if not console.is_terminal:
        yield _PlainLines(console, description, unit, label, clock, interval)
        return
    columns: list[str | ProgressColumn] = ["[progress.description]{task.description}", BarColumn()]
    if unit == "bytes":
        columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
    else:
        columns += [MofNCompleteColumn(), TaskProgressColumn()]
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield _Bar(progress, description)
