"""What `mocoplus ingest` reads: an image folder, a list of paths, or Fashion-MNIST.

A source is resolved up front into an ordered list of `SourceItem` (key,
label, where the bytes are) plus the inputs already known to be unusable (a
listed file that does not exist, a file outside any class folder). The order
is sorted and the keys derive from paths, so the same input always gives the
same items, keys and shards. The fingerprint (paths, sizes, modification
times; the IDX files for Fashion-MNIST) is what a rerun compares to decide
whether earlier output is still the output of this input.

Keys become tar member names, and WebDataset splits a member name at the first
dot of its base name, so keys keep only ``[A-Za-z0-9_/-]`` (everything else
becomes ``_``) and are made unique by a ``_2``, ``_3``... suffix in input order.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from artifacts.files import UnreadableFileError, read_regular_file
from artifacts.shard_set import SkippedInput
from pipeline.data.fashion_mnist import CLASS_NAMES, find_fashion_mnist, load_split, split_paths

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
FASHION_MNIST = "fashion-mnist"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_/-]")


@dataclass(frozen=True)
class SourceItem:
    """One input: its shard key, integer label (None when unlabelled) and origin (a path or ``train[17]``).

    ``path`` is set for files (read by the ingest worker), ``index`` for rows
    of an in-memory array source.
    """

    key: str
    label: int | None
    origin: str
    path: str | None = None
    index: int | None = None


@dataclass
class Source:
    """A resolved source: items to ingest in order, inputs already rejected, class names, fingerprint."""

    kind: str
    spec: str
    items: list[SourceItem]
    class_names: tuple[str, ...] | None
    fingerprint: str
    rejected: list[SkippedInput] = field(default_factory=list)
    pixels: np.ndarray | None = None  # in-memory images [N, H, W] uint8, for array sources

    @property
    def inputs(self) -> int:
        return len(self.items) + len(self.rejected)

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "spec": self.spec, "fingerprint": self.fingerprint, "inputs": self.inputs}


def resolve_source(spec: str) -> Source:
    """``fashion-mnist[:train|:test]``, a folder of images, or a ``.txt``/``.csv`` list of paths."""
    if spec == FASHION_MNIST or spec.startswith(f"{FASHION_MNIST}:"):
        return fashion_mnist_source(spec)
    path = Path(spec)
    if path.is_dir():
        return folder_source(path)
    if path.is_file():
        return list_source(path)
    raise FileNotFoundError(
        f"source {spec!r} is neither a folder, a list file nor fashion-mnist[:train|:test] (no such file or folder)"
    )


def _make_key(text: str, used: set[str]) -> str:
    """A tar-safe key from a relative path without its suffix, unique among ``used`` (which it joins)."""
    base = _UNSAFE_KEY_CHARS.sub("_", text).strip("/") or "item"
    base = re.sub(r"/+", "/", base)
    key, suffix = base, 2
    while key in used:
        key, suffix = f"{base}_{suffix}", suffix + 1
    used.add(key)
    return key


def _fingerprint(lines: list[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()


def _file_signature(path: Path) -> str:
    """Size and modification time, the cheap change detector of make and rsync."""
    try:
        stat = path.stat()
    except OSError as error:
        return f"unreadable:{error.errno}"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


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
        subfolders = [entry.name for entry in entries if _is_folder(entry) and not _is_hidden(entry.name)]
    class_names = tuple(sorted(set(subfolders) - not_followed)) or None
    class_index = {name: index for index, name in enumerate(class_names or ())}
    items: list[SourceItem] = []
    used: set[str] = set()
    signatures: list[str] = [f"{item.input}\t{item.reason}" for item in rejected]
    for path in paths:
        relative = path.relative_to(root).as_posix()
        signatures.append(f"{relative}\t{_file_signature(path)}")
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
            key = _make_key(relative[: -len(path.suffix)], used)
            items.append(SourceItem(key=key, label=label, origin=relative, path=str(path)))
    signatures.append(f"classes\t{class_names}")
    return Source("folder", str(root.resolve()), items, class_names, _fingerprint(signatures), rejected)


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
                entries = sorted((entry for entry in listing if not _is_hidden(entry.name)), key=lambda e: e.name)
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


def _read_list_rows(path: Path) -> list[tuple[str, str | None, str]]:
    """(path, label or None, where) rows of a ``.csv`` (header with ``path``, optional ``label``) or text list."""
    text = read_regular_file(path).decode("utf-8-sig")
    rows: list[tuple[str, str | None, str]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: a CSV list needs a header row with a 'path' column (and optionally 'label')")
        for line_number, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip() or None
            if (row.get("path") or "").strip():
                rows.append((row["path"].strip(), label, f"{path.name}:{line_number}"))
        return rows
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, _, label = stripped.partition("\t")
        rows.append((name.strip(), label.strip() or None, f"{path.name}:{line_number}"))
    return rows


def list_source(list_path: Path) -> Source:
    """Paths listed one per line (``PATH`` or ``PATH<TAB>LABEL``; ``#`` comments) or in a CSV.

    Relative paths are relative to the list's folder. Labels that are all
    integers are used as they are; otherwise the sorted distinct names become
    classes 0, 1, .... Missing files are rejected inputs, not errors.
    """
    list_path = Path(list_path)
    try:
        rows = _read_list_rows(list_path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{list_path}: not a UTF-8 text or CSV list of image paths ({error.reason})") from None
    except UnreadableFileError as error:
        raise ValueError(f"{list_path}: {error}") from None
    if not rows:
        raise ValueError(f"{list_path}: the list names no images")
    labels = [label for _, label, _ in rows if label is not None]
    numeric = bool(labels) and all(label.isdigit() for label in labels)
    class_names = None if numeric or not labels else tuple(sorted(set(labels)))
    class_index = {name: index for index, name in enumerate(class_names or ())}
    base = list_path.parent
    items: list[SourceItem] = []
    rejected: list[SkippedInput] = []
    signatures: list[str] = [f"classes\t{class_names}"]
    used: set[str] = set()
    for name, label, where in rows:
        path = Path(name) if Path(name).is_absolute() else base / name
        origin = f"{name} ({where})"
        signatures.append(f"{name}\t{label}\t{_file_signature(path)}")
        if not path.is_file():
            rejected.append(SkippedInput(origin, "file not found" if not path.exists() else "not a regular file"))
            continue
        label_id = None if label is None else (int(label) if numeric else class_index[label])
        relative = os.path.relpath(path, base) if not Path(name).is_absolute() else name
        key = _make_key(relative[: -len(path.suffix)] if path.suffix else relative, used)
        items.append(SourceItem(key=key, label=label_id, origin=origin, path=str(path)))
    return Source("list", str(list_path.resolve()), items, class_names, _fingerprint(signatures), rejected)


def fashion_mnist_source(spec: str, directory: Path | None = None) -> Source:
    """``fashion-mnist`` (both splits, train first), ``fashion-mnist:train`` or ``fashion-mnist:test``.

    Keys are ``train_00017`` / ``test_00017``, labels Fashion-MNIST's ten
    classes. Read from Debian's IDX files (or ``$MOCOPLUS_FASHION_MNIST_DIR``),
    else from torchvision's download cache, fetching it there if the network
    allows.
    """
    _, _, split = spec.partition(":")
    splits = ("train", "test") if not split else (split,)
    if any(name not in ("train", "test") for name in splits):
        raise ValueError(f"unknown Fashion-MNIST split in {spec!r}: use fashion-mnist, fashion-mnist:train or :test")
    folder = _locate_fashion_mnist(directory)
    arrays, items, signatures = [], [], []
    offset = 0
    for name in splits:
        data = load_split(folder, name)  # type: ignore[arg-type]
        arrays.append(data.images)
        for index, label in enumerate(data.labels.tolist()):
            key = f"{name}_{index:05d}"
            items.append(SourceItem(key=key, label=int(label), origin=f"{name}[{index}]", index=offset + index))
        offset += len(data)
        signatures.extend(f"{path.name}\t{_file_signature(path)}" for path in split_paths(folder, name))  # type: ignore[arg-type]
    pixels = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    return Source(FASHION_MNIST, spec, items, CLASS_NAMES, _fingerprint(signatures), pixels=pixels)


def _download_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mocoplus" / "fashion-mnist"


def _locate_fashion_mnist(directory: Path | None) -> Path:
    """The IDX folder: the given or default one, else torchvision's download (cached), else a clear error."""
    try:
        return find_fashion_mnist(directory)
    except FileNotFoundError as missing:
        if directory is not None:
            raise
        raw = _download_dir() / "FashionMNIST" / "raw"
        try:
            return find_fashion_mnist(raw)
        except FileNotFoundError:
            pass
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(_download_dir()), train=True, download=True)
            FashionMNIST(str(_download_dir()), train=False, download=True)
            return find_fashion_mnist(raw)
        except Exception as error:  # no network, a proxy, a mirror down: all say the same to the user
            raise FileNotFoundError(
                f"{missing}; torchvision's download into {_download_dir()} failed too ({error})"
            ) from None
