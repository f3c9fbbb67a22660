"""Writing artifacts so that a reader never mistakes half of one for all of it.

See docs/architecture.md, "The contracts".

Every stage writes its files under a temporary name and renames them into
place when complete: a rename within one folder is atomic on POSIX, so a crash
leaves either the old file, the new one, or a temp file that readers ignore.
The manifest is always written last. Stages share these helpers, the
content hash and the progress bar, so they agree on all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from artifacts.files import read_regular_file

MAX_INFO_BYTES = 64 << 20  # an output's info file (index.json, model.json): options, inputs and measurements
TEMP_PREFIX = "."  # temp files are hidden dot-files: `ls`, globs and shard patterns skip them
TEMP_SUFFIX = ".tmp"
# Every temp name carries its writer (host and pid), so a later run can tell the leftovers of a killed
# process from the work of one still running: `.NAME.~HOST~PID~RANDOM[.tmp]`.
_OWNER = re.compile(r"~(?P<host>[^~/]+)~(?P<pid>\d+)~")


def _owner_tag() -> str:
    return f"~{socket.gethostname()}~{os.getpid()}~"


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_temps(folder: Path, name: str = "") -> list[Path]:
    """Remove the temp files and folders in ``folder`` left by dead processes of this host; return them.

    Only hidden entries whose name carries a writer tag (`temp_path_for`,
    `building_dir`) and, when given, starts with ``.name.`` are considered; an
    entry whose writer is alive, or ran on another host (a shared folder), is
    never touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, removed = socket.gethostname(), []
    prefix = f"{TEMP_PREFIX}{name}." if name else TEMP_PREFIX
    for path in folder.iterdir():
        match = _OWNER.search(path.name)
        if not path.name.startswith(prefix) or match is None or match["host"] != host:
            continue
        if process_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def reusable_output(out_dir: Path, info_name: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The info of a finished output in ``out_dir`` built from exactly ``inputs``; None if ``out_dir`` is free.

    ``inputs`` (what the output depends on: input hashes and options) is stored
    as ``"inputs"`` in the output's info file. A rerun with the same inputs is
    then "up to date"; anything else already in ``out_dir`` is an error, never
    overwritten.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return None
    try:  # a bounded regular-file read: a FIFO or a link to /dev/zero in the folder must not hang or fill memory
        info = json.loads(read_regular_file(out_dir / info_name, MAX_INFO_BYTES))
    except (OSError, ValueError, RecursionError):
        info = None
    if isinstance(info, dict) and info.get("inputs") == json.loads(json.dumps(inputs)):
        return info
    raise FileExistsError(
        f"{out_dir} exists and is not an empty folder, nor this output built from the same input: choose a new --out"
    )


def package_version() -> str:
    """mocoplus's installed version, recorded in every manifest (from metadata: no torch import)."""
    try:
        return version("mocoplus")
    except PackageNotFoundError:
        return "unknown (not installed)"


def prepare_out_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` up front, so a bad ``--out`` fails before minutes of work."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output folder {out_dir} is not writable")
    return out_dir


def require_new_dir(out_dir: Path) -> Path:
    """``out_dir`` must not exist or be an empty folder: a bundle is never written over another."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder: choose a new --out")
    return out_dir


@contextmanager
def building_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden temp folder beside ``out_dir``, renamed to it when the block succeeds, removed when it fails.

    For bundles (several files that only make sense together): a reader sees the
    whole folder or none of it.
    """
    out_dir = require_new_dir(out_dir)
    parent = prepare_out_dir(out_dir.parent)
    sweep_stale_temps(parent, out_dir.name)  # what a killed build of this bundle left behind
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}{out_dir.name}.{_owner_tag()}"))
    try:
        work.chmod(0o755)  # mkdtemp's 0700 would make the bundle private to this user
        yield work
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def temp_path_for(path: Path) -> Path:
    """A unique hidden temp name beside ``path`` (same folder, so the final rename is atomic)."""
    path = Path(path)
    prefix = f"{TEMP_PREFIX}{path.name}.{_owner_tag()}"
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=TEMP_SUFFIX)
    os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would make the result private to this user
    os.close(descriptor)
    return Path(temp)


def commit_file(temp: Path, path: Path) -> None:
    """Flush ``temp`` to disk and rename it to ``path``: the file appears complete or not at all."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file beside ``path`` and rename it: readers never see half a file."""
    path = Path(path)
    temp = temp_path_for(path)
    try:
        with open(temp, "w") as handle:
            json.dump(data, handle, indent=2, default=str)
            handle.write("\n")
        commit_file(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it: readers never see half a file."""
    path = Path(path)
    temp = temp_path_for(path)
    try:
        temp.write_text(text)
        commit_file(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
