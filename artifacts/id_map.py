"""An index bundle's id map: index id → sample key, label and embedding-set row, read without loading it whole.

A bundle of tens of millions of vectors cannot hold its keys as one JSON list:
parsing it takes minutes and Python strings cost ~70 bytes each. The id map is
fixed-width arrays instead, each memory-mapped, so opening one reads headers
only and a search pages in just the ids it returns:

- ``keys.bin``: the keys' UTF-8 bytes back to back, in id order;
- ``key_offsets.npy``: int64 ``[n + 1]``, key ``i`` is ``keys.bin[offsets[i]:offsets[i + 1]]``;
- ``key_hashes.npy``: uint64 ``[n]``, a 64-bit hash of every key, sorted, and
  ``key_hash_ids.npy``: int64 ``[n]``, the id each sorted hash belongs to —
  a key → id lookup is a binary search (about log₂ n page reads) and a byte
  comparison of the few candidates;
- ``labels.npy`` (int64, −1 for none) and ``rows.npy`` (int64: the embedding-set row).

The writer streams: keys are read part by part from the embedding set, spooled
in row order, then copied out in id order, so its memory is a few arrays of
``n`` integers, never ``n`` Python strings.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from artifacts.files import UnreadableFileError, map_npy, require_regular_file

KEYS_FILE, OFFSETS_FILE = "keys.bin", "key_offsets.npy"
HASHES_FILE, HASH_IDS_FILE = "key_hashes.npy", "key_hash_ids.npy"
LABELS_FILE, ROWS_FILE = "labels.npy", "rows.npy"
ID_MAP_FILES = (KEYS_FILE, OFFSETS_FILE, HASHES_FILE, HASH_IDS_FILE, LABELS_FILE, ROWS_FILE)
SPOOL_FILE = ".keys-by-row.spool"  # the writer's scratch: keys in embedding-row order


class IdMapError(ValueError):
    """An id map that is missing or damaged; ``str(error)`` is one line."""


def key_hash(key: bytes) -> int:
    """The 64-bit hash the lookup table is sorted by (blake2b: the same on every machine and Python)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class IdMap:
    """The id map in ``folder``, memory-mapped; every array is checked against the others' lengths on open."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        arrays = {}
        for name in ID_MAP_FILES[1:]:
            try:
                arrays[name] = map_npy(self.folder / name)
            except UnreadableFileError as error:
                raise IdMapError(f"{self.folder / name}: {error}") from None
        self.offsets, self.hashes, self.hash_ids = arrays[OFFSETS_FILE], arrays[HASHES_FILE], arrays[HASH_IDS_FILE]
        self.labels, self.rows = arrays[LABELS_FILE], arrays[ROWS_FILE]
        count = len(self.rows)
        shapes = {name: array.shape for name, array in arrays.items()}
        expected = {OFFSETS_FILE: (count + 1,), HASHES_FILE: (count,), HASH_IDS_FILE: (count,),
                    LABELS_FILE: (count,), ROWS_FILE: (count,)}  # fmt: skip
        if shapes != expected:
            raise IdMapError(f"{self.folder}: id map arrays of shapes {shapes} do not agree: the bundle is damaged")
        self._blob = _map_bytes(self.folder / KEYS_FILE)
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != len(self._blob):
            raise IdMapError(
                f"{self.folder}: {OFFSETS_FILE} spans [{int(self.offsets[0])}, {int(self.offsets[-1])}), "
                f"{KEYS_FILE} holds {len(self._blob):,} bytes: the bundle is damaged"
            )
        self.keys = Keys(self)

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, position: int) -> str:
        """The key of id ``position``."""
        start, stop = int(self.offsets[position]), int(self.offsets[position + 1])
        if not 0 <= start <= stop <= len(self._blob):
            raise IdMapError(f"{self.folder}: {OFFSETS_FILE} is damaged at id {position}")
        try:
            return bytes(self._blob[start:stop]).decode("utf-8")
        except UnicodeDecodeError:
            raise IdMapError(f"{self.folder}: {KEYS_FILE} is damaged at id {position} (not UTF-8)") from None

    def ids_of(self, key: str) -> list[int]:
        """Every id holding ``key``, ascending (an updated bundle keeps a replaced sample's old id, deleted)."""
        wanted = np.uint64(key_hash(key.encode("utf-8")))
        low, high = np.searchsorted(self.hashes, wanted, "left"), np.searchsorted(self.hashes, wanted, "right")
        found = (int(position) for position in self.hash_ids[low:high])
        return sorted(position for position in found if 0 <= position < len(self) and self.key(position) == key)


class Keys(Sequence[str]):
    """The keys of an id map as a read-only sequence: ``keys[i]``, ``keys[:20]``, ``len(keys)``."""

    def __init__(self, ids: IdMap) -> None:
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, position: int) -> str: ...

    @overload
    def __getitem__(self, position: slice) -> list[str]: ...

    def __getitem__(self, position: int | slice) -> str | list[str]:
        if isinstance(position, slice):
            return [self._ids.key(index) for index in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"id {position} is not in [0, {len(self)})")
        return self._ids.key(position)


def _map_bytes(path: Path) -> mmap.mmap | bytes:
    """The file's bytes, memory-mapped (an empty file, which mmap refuses, as ``b""``)."""
    try:
        require_regular_file(path)
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return b""
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (UnreadableFileError, OSError) as error:
        raise IdMapError(f"{path}: {error}") from None


# --- the writer side --------------------------------------------------------------------------------


def write_id_map(
    folder: Path, parts: Iterable[tuple[list[str], list[int | None]]], rows: np.ndarray, row_count: int
) -> None:
    """The id map of an index whose id ``i`` is embedding-set row ``rows[i]`` into ``folder``.

    ``parts``: each embedding-set part's keys and labels, in row order (``row_count`` rows in all).
    Keys are spooled to disk in row order first, then copied in id order: memory holds integer arrays only.
    """
    folder = Path(folder)
    rows = np.asarray(rows, dtype=np.int64)
    spool = folder / SPOOL_FILE
    row_offsets = np.zeros(row_count + 1, dtype=np.int64)
    row_labels = np.full(row_count, -1, dtype=np.int64)
    filled = 0
    try:
        with open(spool, "wb") as out:
            for keys, labels in parts:
                encoded = [key.encode("utf-8") for key in keys]
                lengths = np.fromiter((len(key) for key in encoded), dtype=np.int64, count=len(encoded))
                stop = filled + len(encoded)
                if stop > row_count:
                    raise ValueError(f"the embedding set's parts hold more than {row_count} keys, its manifest's rows")
                row_offsets[filled + 1 : stop + 1] = row_offsets[filled] + np.cumsum(lengths)
                row_labels[filled:stop] = [-1 if label is None else int(label) for label in labels]
                out.write(b"".join(encoded))
                filled = stop
        if filled != row_count:
            raise ValueError(f"the embedding set's parts hold {filled} keys, its manifest {row_count} rows")
        if len(rows) and (rows.min() < 0 or rows.max() >= row_count):
            raise ValueError(f"index rows must lie in [0, {row_count})")
        by_row = _map_bytes(spool)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(row_offsets[rows + 1] - row_offsets[rows])
        hashes = np.empty(len(rows), dtype=np.uint64)
        with open(folder / KEYS_FILE, "wb") as out:
            for first, chunk in _chunks(rows, 1 << 16):
                keys = [bytes(by_row[row_offsets[row] : row_offsets[row + 1]]) for row in chunk.tolist()]
                hashes[first : first + len(keys)] = [key_hash(key) for key in keys]
                out.write(b"".join(keys))
        if isinstance(by_row, mmap.mmap):
            by_row.close()
    finally:
        spool.unlink(missing_ok=True)
    order = np.argsort(hashes, kind="stable")
    np.save(folder / OFFSETS_FILE, offsets)
    np.save(folder / HASHES_FILE, hashes[order])
    np.save(folder / HASH_IDS_FILE, order.astype(np.int64))
    np.save(folder / LABELS_FILE, row_labels[rows])
    np.save(folder / ROWS_FILE, rows)


def _chunks(values: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
    for first in range(0, len(values), size):
        yield first, values[first : first + size]
