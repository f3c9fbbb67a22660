"""Versions of a bundle: ``ROOT/v000001``, ``ROOT/v000002``, ... and ``ROOT/current``.

Index bundles (``index.json``, `artifacts.index_bundle`: ``mocoplus index
--update``) and model bundles (``model.json``, `artifacts.model_bundle`: the
``pretrain`` flow publishes a model that passed its quality gate) are
versioned alike; ``marker`` names the file that makes a folder a finished
bundle of the kind. Each version is a complete bundle folder,
built under a temp name and renamed into place; ``current`` is a relative
symlink to the version readers get, switched by one atomic rename, so a
reader (the search command, the service's reload) sees the old version or
the new one, never a mix. Older versions stay beside it, up to a ``--keep``
count, so ``mocoplus search --version N`` can still read them, and a service
still serving one is not pulled from under it (an open index stays readable
after its files are removed).

A folder with its marker at its top (a bundle built before versions, or a
version folder named directly) is read as it is.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from artifacts.atomic import temp_path_for

CURRENT = "current"
INDEX_MARKER = "index.json"
_VERSION = re.compile(r"v(\d{6})")


class VersionError(ValueError):
    """A version that does not exist, or a bundle folder that has none."""


def version_name(number: int) -> str:
    return f"v{number:06d}"


def versions(root: Path, marker: str = INDEX_MARKER) -> list[int]:
    """The finished versions in ``root``, oldest first."""
    try:
        names = [path.name for path in Path(root).iterdir() if (path / marker).is_file()]
    except OSError:
        return []
    return sorted(int(match.group(1)) for name in names if (match := _VERSION.fullmatch(name)))


def current_version(root: Path) -> int | None:
    """The version ``root/current`` names, or None when there is none."""
    link = Path(root) / CURRENT
    try:
        match = _VERSION.fullmatch(os.readlink(link))
    except OSError:
        return None
    return int(match.group(1)) if match else None


def resolve_version(root: Path, version: int | None = None, marker: str = INDEX_MARKER) -> Path:
    """The bundle folder to read: ``version`` of ``root``, else its current one, else ``root`` itself."""
    root = Path(root)
    if version is not None:
        folder = root / version_name(version)
        if not (folder / marker).is_file():
            known = ", ".join(map(str, versions(root, marker))) or "none"
            raise VersionError(f"{root} has no version {version} (versions kept: {known})")
        return folder
    if (root / marker).exists():
        return root
    number = current_version(root)
    if number is not None:
        return root / version_name(number)
    if (root / CURRENT / marker).exists():  # a copy that followed the link (cp -r, copytree)
        return root / CURRENT
    return root


def switch_current(root: Path, number: int) -> None:
    """Point ``root/current`` at version ``number`` in one atomic rename."""
    temp = temp_path_for(Path(root) / CURRENT)
    temp.unlink()
    os.symlink(version_name(number), temp)
    os.replace(temp, Path(root) / CURRENT)


def prune_versions(root: Path, keep: int, marker: str = INDEX_MARKER) -> list[int]:
    """Remove all but the newest ``keep`` versions (never the current one); the versions removed."""
    current = current_version(root)
    kept = versions(root, marker)[-keep:] if keep > 0 else []
    removed = [number for number in versions(root, marker) if number not in kept and number != current]
    for number in removed:
        doomed = temp_path_for(Path(root) / version_name(number))  # a temp name a killed run's next sweep removes
        doomed.unlink()
        os.replace(Path(root) / version_name(number), doomed)  # out of sight first: never half a version
        shutil.rmtree(doomed, ignore_errors=True)
    return removed
