"""A ``.txt`` or ``.csv`` list of image paths (with optional labels) as a source."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from artifacts.files import UnreadableFileError, read_regular_file
from artifacts.shard_set import SkippedInput
from pipeline.data.sources.base import LocalFile, Source, SourceItem, file_signature, fingerprint, make_key


def claims(spec: str) -> bool:
    return Path(spec).is_file()


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
        signature = f"{label}\t{file_signature(path)}"
        signatures.append(f"{name}\t{signature}")
        if not path.is_file():
            rejected.append(SkippedInput(origin, "file not found" if not path.exists() else "not a regular file"))
            continue
        label_id = None if label is None else (int(label) if numeric else class_index[label])
        relative = os.path.relpath(path, base) if not Path(name).is_absolute() else name
        key = make_key(relative[: -len(path.suffix)] if path.suffix else relative, used)
        items.append(SourceItem(key, label_id, origin, LocalFile(str(path)), signature))
    return Source("list", str(list_path.resolve()), items, class_names, fingerprint(signatures), rejected)
