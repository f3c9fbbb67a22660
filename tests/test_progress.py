"""`pipeline.progress`: a live bar on a terminal, plain lines elsewhere, and no task the columns cannot render."""

from __future__ import annotations

import io
import re
import threading

import pytest

from pipeline.progress import INTERVAL_ENV, StageProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_task_renders_on_a_terminal_whatever_the_caller_passes():
    screen = Terminal()
    with StageProgress(stream=screen, interval=1) as bar:
        assert bar.live
        task = bar.task("embedding", total=10, unit="images")  # no status given: the helper supplies it
        bar.advance(task, 4)
        unknown = bar.task("kNN monitor", unit="images")  # no total either
        bar.advance(unknown, 3, status="memory")
        bar._bar.refresh()
        bar.finish(task)
    assert "embedding" in screen.getvalue() and "4/10" in screen.getvalue()


def test_plain_lines_report_count_rate_eta_and_status_then_a_final_line():
    log = io.StringIO()
    with StageProgress(stream=log, interval=0) as bar:
        assert not bar.live
        task = bar.task("pretraining", total=400, completed=100, unit="steps")
        bar.update(task, completed=150, status="epoch 1 loss 3.912 412 img/s")
        bar.finish(task, status="loss 3.9")
    first, last = log.getvalue().splitlines()
    assert re.fullmatch(
        r"pretraining: 150/400 \(38%\) · [\d,.]+ steps/s · ETA \S+ · epoch 1 loss 3\.912 412 img/s", first
    )
    assert last.startswith("pretraining: 150/400 (38%)") and "done in" in last and last.endswith("loss 3.9")


def test_plain_lines_wait_for_the_interval_and_disabled_progress_prints_nothing():
    log = io.StringIO()
    with StageProgress(stream=log, interval=3600) as bar:
        task = bar.task("ingest", total=5, unit="inputs")
        for _ in range(5):
            bar.advance(task)
        bar.finish(task)
    assert len(log.getvalue().splitlines()) == 1  # only the final line: the interval never passed
    quiet = io.StringIO()
    with StageProgress(False, stream=quiet, interval=0) as bar:
        bar.advance(bar.task("ingest", total=5))
    assert quiet.getvalue() == ""


def test_a_worker_thread_writes_lines_even_on_a_terminal():
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("live", StageProgress(stream=Terminal()).live))
    thread.start()
    thread.join()
    assert result["live"] is False


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert StageProgress(stream=io.StringIO()).interval == 2.5
    monkeypatch.setenv(INTERVAL_ENV, "often")
    with pytest.raises(ValueError, match="MOCOPLUS_PROGRESS_SECONDS must be a number"):
        StageProgress(stream=io.StringIO())


def test_a_slow_task_says_the_time_one_of_its_units_takes():
    from pipeline.progress import _LineTask

    steps = _LineTask("pretraining", total=400, completed=2, unit="steps", started=0.0)
    assert "50s per step" in steps.line(100.0)
    sets = _LineTask("scoring", total=9, completed=1, unit="feature sets", started=0.0)
    assert "1m40s per feature set" in sets.line(100.0) and "item" not in sets.line(100.0)
