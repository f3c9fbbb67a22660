"""What every image source resolves to: ordered `SourceItem`s, the inputs already rejected, a fingerprint.

Keys become tar member names, and WebDataset splits a member name at the first
dot of its base name, so keys keep only ``[A-Za-z0-9_/-]`` (everything else
becomes ``_``) and are made unique by a ``_2``, ``_3``... suffix in input order.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from artifacts.shard_set import SkippedInput

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_/-]")


@dataclass(frozen=True)
class SourceItem:
    """One input: its shard key, integer label (None when unlabelled) and origin (a path or ``train[17]``).

    ``path`` is set for files (read by the ingest worker), ``index`` for rows
    of an in-memory array source. ``signature`` changes when the input does
    (a file's size and modification time, with its label where a list gives
    one): what `mocoplus ingest --update` compares to find changed inputs.
    """

    key: str
    label: int | None
    origin: str
    path: str | None = None
    index: int | None = None
    signature: str = ""


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


def make_key(text: str, used: set[str]) -> str:
    """A tar-safe key from a relative path without its suffix, unique among ``used`` (which it joins)."""
    base = _UNSAFE_KEY_CHARS.sub("_", text).strip("/") or "item"
    base = re.sub(r"/+", "/", base)
    key, suffix = base, 2
    while key in used:
        key, suffix = f"{base}_{suffix}", suffix + 1
    used.add(key)
    return key


def fingerprint(lines: list[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()


def file_signature(path: Path) -> str:
    """Size and modification time, the cheap change detector of make and rsync."""
    try:
        stat = path.stat()
    except OSError as error:
        return f"unreadable:{error.errno}"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def is_hidden(name: str) -> bool:
    return name.startswith(".")
