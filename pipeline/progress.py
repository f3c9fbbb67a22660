"""Progress for long work: a live bar on a terminal, plain lines every few seconds anywhere else.

Every stage reports through `stage_progress`, so all of them behave alike:

- on a terminal, rich's bar (description, bar, done/total, status, elapsed,
  remaining);
- when stderr is a pipe or a file (a log, a Prefect flow relaying a
  subprocess, CI), or the work runs in a worker thread, a line such as ``pretraining: 1,200/4,685 (26%) · 6.1
  steps/s · ETA 9m31s · epoch 1 loss 3.912 412 img/s`` at most every
  ``interval`` seconds (``$MOCOPLUS_PROGRESS_SECONDS``, default 10) and one
  when the task finishes — a live bar written to a pipe shows nothing until
  the end, which nobody can tell from a hang.

Tasks are created only through `StageProgress.task`, which supplies every
field the columns read; a caller cannot create a task the bar would fail to
render.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

INTERVAL_ENV = "MOCOPLUS_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0


def _interval_from_env() -> float:
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        raise ValueError(f"${INTERVAL_ENV} must be a number of seconds; got {text!r}") from None
    if not value > 0:
        raise ValueError(f"${INTERVAL_ENV} must be > 0; got {text!r}")
    return value


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@dataclass
class _LineTask:
    """One task's state for the plain-line reporter."""

    description: str
    total: float | None
    completed: float
    unit: str
    status: str = ""
    started: float = field(default_factory=time.monotonic)
    start_completed: float = 0.0
    last_line: float = field(default_factory=time.monotonic)
    finished: bool = False

    @property
    def one(self) -> str:
        """The unit of one: "steps" → "step", "feature sets" → "feature set"."""
        return self.unit.removesuffix("s") if self.unit.endswith("s") and not self.unit.endswith("ss") else self.unit

    def line(self, now: float) -> str:
        done = f"{self.completed:,.0f}"
        parts = [f"{self.description}: {done}/{self.total:,.0f}" if self.total else f"{self.description}: {done}"]
        if self.total:
            parts[0] += f" ({self.completed / self.total:.0%})"
        elapsed = now - self.started
        rate = (self.completed - self.start_completed) / elapsed if elapsed > 0 else 0.0
        if rate > 0:  # slow tasks (minutes per step) read better as the time one takes: "12s per step"
            parts.append(f"{rate:,.1f} {self.unit}/s" if rate >= 0.1 else f"{_duration(1 / rate)} per {self.one}")
            if self.total and not self.finished:
                parts.append(f"ETA {_duration((self.total - self.completed) / rate)}")
        if self.finished:
            parts.append(f"done in {_duration(elapsed)}")
        if self.status:
            parts.append(self.status)
        return " · ".join(parts)


class StageProgress:
    """A stage's progress display; use as a context manager and create tasks with `task`."""

    def __init__(self, enabled: bool = True, *, interval: float | None = None, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.interval = _interval_from_env() if interval is None else interval
        self._stream = stream
        console = Console(stderr=stream is None, file=stream)
        # a live bar only from the main thread: in a worker thread (a Prefect task, a share of a mapped
        # embedding) it would fight whatever the main thread prints, so workers write plain lines
        self.live = enabled and console.is_terminal and threading.current_thread() is threading.main_thread()
        self._bar = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self._lines: dict[int, _LineTask] = {}

    def __enter__(self) -> StageProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def task(self, description: str, total: float | None = None, *, completed: float = 0, unit: str = "items") -> int:
        """A new task; ``unit`` names what ``completed`` counts (lines show its rate)."""
        task_id = self._bar.add_task(description, total=total, completed=completed, status="")
        if self.enabled and not self.live:
            self._lines[task_id] = _LineTask(description, total, completed, unit, start_completed=completed)
        return task_id

    def advance(self, task_id: int, amount: float = 1, *, status: str | None = None) -> None:
        line = self._lines.get(task_id)
        current = line.completed if line else next(task.completed for task in self._bar.tasks if task.id == task_id)
        self.update(task_id, completed=current + amount, status=status)

    def update(
        self, task_id: int, *, completed: float | None = None, total: float | None = None, status: str | None = None
    ) -> None:
        fields = {"status": status} if status is not None else {}
        self._bar.update(task_id, completed=completed, total=total, **fields)
        line = self._lines.get(task_id)
        if line is None:
            return
        line.completed = line.completed if completed is None else completed
        line.total = line.total if total is None else total
        line.status = line.status if status is None else status
        now = time.monotonic()
        if now - line.last_line >= self.interval:
            self._emit(line, now)

    def finish(self, task_id: int, *, status: str | None = None, hide: bool = False) -> None:
        """The task ended (done or stopped where it stands): its last line, or the bar left (or hidden)."""
        fields = {"status": status} if status is not None else {}
        self._bar.update(task_id, visible=not hide, **fields)
        line = self._lines.pop(task_id, None)
        if line is not None:
            line.status = line.status if status is None else status
            line.finished = True
            self._emit(line, time.monotonic())

    def _emit(self, line: _LineTask, now: float) -> None:
        line.last_line = now
        stream = self._stream or sys.stderr
        print(line.line(now), file=stream, flush=True)


def stage_progress(enabled: bool = True) -> StageProgress:
    """The progress display every stage uses (on stderr, so stdout stays clean for ``--json``)."""
    return StageProgress(enabled)
