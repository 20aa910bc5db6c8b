"""One progress bar for every long loop (score, segment, train, evaluate), drawn with rich.

rich already draws radflash's summary tables, so it draws the bars too and tqdm is not a
dependency. The bar goes to stderr (stdout stays clean for piped output) and shows the count,
the rate (per second, over rich's moving window, so a resumed run's earlier images do not
inflate it), elapsed and remaining time and live fields (scored/skipped/failed counts, loss).

It is drawn only on a terminal (or in Jupyter): a job whose stderr goes to a log file or a pipe
gets no bar (rich's ``TTY_COMPATIBLE=1`` draws it anyway), and ``--quiet`` turns it off everywhere. Refresh
is manual and throttled (no background thread), so updating costs a dict write per item.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

REFRESH_S = 0.1  # at most 10 redraws a second: a scored image can take well under a millisecond


class _RateColumn(ProgressColumn):
    """Items per second over rich's moving window (``?`` until two updates have been seen)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.speed
        text = "?" if speed is None else (f"{speed:.1f}" if speed >= 1 else f"{speed:.2f}")
        return Text(f"{text} {self.unit}/s", style="progress.data.speed")


class Progress:
    """A started bar; use :func:`progress_bar` to make one (it returns ``None`` when disabled)."""

    def __init__(self, total: int | None, *, desc: str, unit: str = "img", initial: int = 0,
                 fields: Mapping[str, Any] | None = None, console: Console | None = None) -> None:
        self.fields: dict[str, Any] = dict(fields or {})
        self._bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(unit),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console or _stderr_console(), auto_refresh=False,
            redirect_stdout=False, redirect_stderr=False,  # never swap sys.stdout/err under the caller
        )
        self._task = self._bar.add_task(desc, total=total, completed=initial, info=self._info())
        self._last = 0.0
        self._closed = False
        self._bar.start()
        atexit.register(self.close)  # a run that dies mid-loop must not leave the terminal's cursor hidden

    def update(self, n: int = 1, *, count: str | None = None, **fields: Any) -> None:
        """Advance by ``n``; ``count`` adds 1 to that live counter (e.g. ``"scored"``); ``fields`` replace values."""
        if count is not None:
            self.fields[count] = self.fields.get(count, 0) + 1
        self.fields.update(fields)
        self._bar.update(self._task, advance=n, info=self._info())
        now = time.monotonic()
        if now - self._last >= REFRESH_S:
            self._last = now
            self._bar.refresh()

    def write(self, message: str) -> None:
        """Print a line above the bar (a validation loss, a warning) without breaking it."""
        self._bar.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        """Draw the final state (counts, rate) and leave it on screen; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        task = next(t for t in self._bar.tasks if t.id == self._task)
        if task.total is None:  # counted as it went: the final count is the total (N/N, a full bar)
            self._bar.update(self._task, total=task.completed)
        self._bar.update(self._task, info=self._info())
        self._bar.refresh()
        self._bar.stop()

    def _info(self) -> str:
        return " ".join(f"{k} {_fmt(v)}" for k, v in self.fields.items())


def progress_bar(total: int | None, *, desc: str, enabled: bool = True, unit: str = "img", initial: int = 0,
                 fields: Mapping[str, Any] | None = None, console: Console | None = None) -> Progress | None:
    """A started :class:`Progress`, or ``None`` when disabled, when there is nothing to do or off a terminal.

    ``total=None``: not known in advance (a streamed archive is counted as it is walked); the bar
    then counts up (``N/?``) with its rate and elapsed time, no remaining time, and ends at ``N/N``.
    """
    if not enabled or (total is not None and (total <= 0 or initial >= total)):
        return None
    console = console or _stderr_console()
    if not (console.is_terminal or console.is_jupyter):
        return None
    return Progress(total, desc=desc, unit=unit, initial=initial, fields=fields, console=console)


def _stderr_console() -> Console:
    return Console(stderr=True)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
