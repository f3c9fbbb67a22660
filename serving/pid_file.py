"""A running server's pid file: how a refresh (a cron job, the ``refresh-corpus`` deployment) finds the service
to send SIGHUP to, so it reloads the index version an update just switched to (docs/search.md, "A corpus that changes").
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from artifacts.atomic import process_alive
from artifacts.files import read_regular_file

MAX_PID_FILE_BYTES = 64


def read_pid(path: Path, *, missing_ok: bool = False, alive_only: bool = True) -> int | None:
    """The process id in ``path`` (None when it is missing and ``missing_ok``, or names no live process and
    ``alive_only``); a file that holds no process id is a `ValueError` naming it."""
    if not os.path.lexists(path):
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path}: no pid file (start the service with --pid-file {path})")
    try:
        text = read_regular_file(Path(path), MAX_PID_FILE_BYTES).decode("ascii", "replace").strip()
    except ValueError as error:  # a FIFO, a folder, a huge file: its reason, with its name
        raise ValueError(f"{path}: {error}") from None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{path}: not a pid file (holds {text[:20]!r})")
    pid = int(text)
    if alive_only and not process_alive(pid):
        return None
    return pid


def send_reload(path: Path) -> int:
    """SIGHUP to the server whose pid ``path`` holds; its pid. A stale file (no such process) is an error."""
    pid = read_pid(path)
    if pid is None:
        raise ProcessLookupError(f"{path}: the server it names is not running (a stale pid file)")
    os.kill(pid, signal.SIGHUP)
    return pid
