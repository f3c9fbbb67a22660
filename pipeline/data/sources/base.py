"""What every image source resolves to: ordered `SourceItem`s, the inputs already rejected, a fingerprint.

Each item carries its `ItemInput`, which the ingest worker opens: a local file
(`LocalFile`: its bytes, read with the size cap before anything is decoded) or
a row of an in-memory array (`ArrayRow`: its pixels). A source of another kind
(an HTTP or object-store URL list, say) brings its own `ItemInput` whose
``open`` returns the bytes; nothing else in ingest changes.

Keys become tar member names, and WebDataset splits a member name at the first
dot of its base name, so keys keep only ``[A-Za-z0-9_/-]`` (everything else
becomes ``_``) and are made unique by a ``_2``, ``_3``... suffix in input order.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from artifacts.files import read_regular_file
from artifacts.shard_set import SkippedInput

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_/-]")


class ItemInput(Protocol):
    """Where one input's image is. Opened in an ingest worker process, so it must pickle small."""

    @property
    def name(self) -> str:
        """What names this input from one run of the source to the next (a path): how --update matches them."""
        ...

    def open(self, max_bytes: int) -> bytes | np.ndarray:
        """The encoded image (at most ``max_bytes``: larger raises `artifacts.files.FileTooLargeError`) or its
        pixels ([H, W] or [H, W, C] uint8). Encoded bytes are decoded, checked and recorded with provenance.
        An input that cannot be read raises `OSError` (a network error included): it is skipped with the
        reason, and the ingest goes on."""
        ...


@dataclass(frozen=True)
class LocalFile:
    """A file on this machine: its bytes, read as a regular file within the size cap (never a FIFO or device)."""

    path: str

    @property
    def name(self) -> str:
        return self.path

    def open(self, max_bytes: int) -> bytes:
        return read_regular_file(self.path, max_bytes)


@dataclass(frozen=True)
class ArrayRow:
    """One image of an in-memory array source (Fashion-MNIST's IDX files): its pixels, travelling with the item."""

    origin: str
    pixels: np.ndarray

    @property
    def name(self) -> str:
        return self.origin

    def open(self, max_bytes: int) -> np.ndarray:
        return self.pixels


@dataclass(frozen=True)
class SourceItem:
    """One input: its shard key, integer label (None when unlabelled), origin (a path or ``train[17]``) and input.

    ``signature`` changes when the input does (a file's size and modification
    time, with its label where a list gives one): what `mocoplus ingest
    --update` compares to find changed inputs.
    """

    key: str
    label: int | None
    origin: str
    input: ItemInput
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
    # items a worker prepares per round trip: many tiny array images (a pickle costs as much as the work), a
    # few files (a chunk of large photos must fit in memory)
    chunk_size: int = 8

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
