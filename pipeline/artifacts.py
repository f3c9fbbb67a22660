"""Writing artifacts so that a reader never mistakes half of one for all of it (DESIGN §3).

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
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

TEMP_PREFIX = "."  # temp files are hidden dot-files: `ls`, globs and shard patterns skip them
TEMP_SUFFIX = ".tmp"


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
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}{out_dir.name}."))
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
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
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


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def progress_bar(enabled: bool = True) -> Progress:
    """The stages' progress bar, on stderr so that stdout stays clean for ``--json`` output."""
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
