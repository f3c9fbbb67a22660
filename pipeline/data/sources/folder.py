"""An image folder as a source: every file under it, class subfolders as labels."""

from __future__ import annotations

import os
from pathlib import Path

from artifacts.shard_set import SkippedInput
from pipeline.data.sources.base import (
    IMAGE_SUFFIXES,
    LocalFile,
    Source,
    SourceItem,
    file_signature,
    fingerprint,
    is_hidden,
    make_key,
)


def claims(spec: str) -> bool:
    return Path(spec).is_dir()


def folder_source(root: Path) -> Source:
    """Every file under ``root``; class subfolders become labels (sorted names → 0, 1, ...).

    A root holding subfolders is labelled: each top-level subfolder is a class
    and files directly in the root are rejected (outside any class folder). A
    root without subfolders is flat and unlabelled. Hidden files and folders
    (``.DS_Store``, ``.ipynb_checkpoints``) are not inputs; files without an
    image suffix are inputs rejected with their reason, so nothing vanishes
    silently.
    """
    root = Path(root)
    paths, rejected = _walk_files(root)
    not_followed = {item.input.rstrip("/") for item in rejected if item.reason.startswith("link")}
    with os.scandir(root) as entries:
        subfolders = [entry.name for entry in entries if _is_folder(entry) and not is_hidden(entry.name)]
    class_names = tuple(sorted(set(subfolders) - not_followed)) or None
    class_index = {name: index for index, name in enumerate(class_names or ())}
    items: list[SourceItem] = []
    used: set[str] = set()
    signatures: list[str] = [f"{item.input}\t{item.reason}" for item in rejected]
    for path in paths:
        relative = path.relative_to(root).as_posix()
        signature = file_signature(path)
        signatures.append(f"{relative}\t{signature}")
        top = relative.split("/", 1)[0]
        if not path.exists():
            rejected.append(SkippedInput(relative, "unreadable: a broken link, or the file vanished"))
        elif not path.is_file():  # a FIFO or device would block or stream forever when read
            rejected.append(SkippedInput(relative, "not a regular file"))
        elif class_names is not None and top not in class_index:
            rejected.append(SkippedInput(relative, "outside any class folder (the source has class subfolders)"))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            rejected.append(SkippedInput(relative, f"not an image file name (suffix {path.suffix or 'none'!r})"))
        else:
            label = class_index[top] if class_names is not None else None
            key = make_key(relative[: -len(path.suffix)], used)
            items.append(SourceItem(key, label, relative, LocalFile(str(path)), signature))
    signatures.append(f"classes\t{class_names}")
    return Source("folder", str(root.resolve()), items, class_names, fingerprint(signatures), rejected)


def _walk_files(root: Path) -> tuple[list[Path], list[SkippedInput]]:
    """Files under ``root`` in a sorted, stable order, and the folders not walked, with the reason.

    Links to folders are followed, but each folder is walked once: a link that
    leads back to a folder already on the way down (a loop, ``A/up -> ..``) or
    into the source itself (its files are reached at their own place, under their
    own label) is reported, not followed, and so is a second link to the same
    outside folder. Folders that cannot be listed are reported too, so that
    ``inputs = written + skipped`` counts everything under the root.
    """
    real_root = root.resolve()
    found: list[Path] = []
    skipped: list[SkippedInput] = []
    info = root.stat()
    visited: dict[tuple[int, int], str] = {(info.st_dev, info.st_ino): "."}
    pending: list[tuple[Path, str]] = [(root, "")]  # a stack, not recursion: any depth of folders is fine
    while pending:
        folder, relative = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted((entry for entry in listing if not is_hidden(entry.name)), key=lambda e: e.name)
        except OSError as error:
            skipped.append(SkippedInput(f"{relative}/", f"unreadable folder ({error.strerror or error})"))
            continue
        subfolders: list[tuple[Path, str]] = []
        for entry in entries:
            path, name = folder / entry.name, f"{relative}/{entry.name}" if relative else entry.name
            if not _is_folder(entry):
                found.append(path)
                continue
            reason = _why_not_walk(path, real_root, visited) if entry.is_symlink() else ""
            try:
                info = path.stat()
            except OSError as error:
                reason = reason or f"unreadable folder ({error.strerror or error})"
            if reason:
                skipped.append(SkippedInput(f"{name}/", reason))
                continue
            visited.setdefault((info.st_dev, info.st_ino), name)
            subfolders.append((path, name))
        pending.extend(reversed(subfolders))  # depth-first in name order, as os.walk would go
    return sorted(found, key=lambda path: path.relative_to(root).as_posix()), skipped


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False  # a link loop that the OS itself refuses to resolve: listed as a file, rejected as unreadable


def _why_not_walk(path: Path, real_root: Path, visited: dict[tuple[int, int], str]) -> str:
    """Why the folder that the link ``path`` leads to must not be walked, or ``""`` when it may."""
    try:
        target, info = path.resolve(strict=True), path.stat()
    except (OSError, RuntimeError) as error:
        return f"unreadable link ({getattr(error, 'strerror', None) or error})"
    if target == real_root or real_root in target.parents:
        where = f"{target.relative_to(real_root).as_posix()}/" if target != real_root else "its root"
        return f"link to a folder inside the source ({where}), whose files are ingested there: not followed"
    if target in real_root.parents:
        return "link to a folder that holds the source (a loop through it): not followed"
    seen = visited.get((info.st_dev, info.st_ino))
    if seen is not None:
        return f"link to a folder already ingested as {seen}/ (a loop or a second link): not followed"
    return ""
