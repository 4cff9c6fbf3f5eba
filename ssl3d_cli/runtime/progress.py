"""Progress reporting: rich bars on a terminal, periodic plain log lines in cluster logs.

The engine calls :func:`task`; the CLI calls :func:`configure` once. Only rank 0 reports.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("ssl3d")

_state: dict[str, Any] = {"enabled": True, "rich": None}


def configure(*, enabled: bool) -> None:
    """Turn progress display on or off; rich is used only when stderr is a terminal."""
    _state["enabled"] = enabled
    _state["rich"] = None


def _is_rank0() -> bool:
    from ssl3d_cli.runtime.distributed import is_main_process  # torch: imported only once work starts

    return is_main_process()


def _use_rich() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Task:
    """One progress bar. ``advance(n, **fields)`` updates the count and the shown figures."""

    def __init__(self, description: str, total: int, *, visible: bool, log_every_s: float = 30.0) -> None:
        self.description = description
        self.total = total
        self.completed = 0
        self.fields: dict[str, Any] = {}
        self._visible = visible
        self._bar = None
        self._task_id = None
        self._log_every_s = log_every_s
        self._last_log = time.monotonic()
        self._start = time.monotonic()

    def _fmt_fields(self) -> str:
        parts = []
        for key, value in self.fields.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return "  ".join(parts)

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.completed += n
        self.fields.update(fields)
        if not self._visible:
            return
        if self._bar is not None:
            self._bar.update(self._task_id, advance=n, info=self._fmt_fields())
            return
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s or self.completed >= self.total:
            self._last_log = now
            elapsed = now - self._start
            eta = elapsed / max(self.completed, 1) * (self.total - self.completed)
            log.info(
                "%s %d/%d  %s  elapsed %.0fs  eta %.0fs",
                self.description, self.completed, self.total, self._fmt_fields(), elapsed, eta,
            )


@contextmanager
def task(description: str, total: int) -> Iterator[Task]:
    """Context manager yielding a :class:`Task`; rich on a terminal, log lines otherwise."""
    visible = bool(_state["enabled"]) and _is_rank0()
    t = Task(description, total, visible=visible)
    if visible and _use_rich():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=False,
        )
        t._bar = bar
        with bar:
            t._task_id = bar.add_task(description, total=total, info="")
            yield t
    else:
        yield t
