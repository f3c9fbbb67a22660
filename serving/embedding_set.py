"""Read an embedding set (DESIGN §3) written by `mocoplus embed` — no torch here.

An embedding set is a folder of parts, one per input shard (``part-N.npy``: a
float32 or float16 matrix; ``part-N.json``: its keys, labels and skipped
samples), and ``manifest.json``, written only once every part is complete.
The index builder reads it in chunks, so memory stays bounded by one part and
never by the corpus; the search command reads single rows by id to turn a
``key:...`` query into its vector. Row ids are global: the parts in manifest
order, rows in part order — the ids the index stores.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.jsonfile import read_json

EMBEDDINGS_MANIFEST = "manifest.json"
EMBEDDINGS_KIND = "mocoplus.embeddings"


class EmbeddingSetError(ValueError):
    """An embedding set that is missing, incomplete, or inconsistent with its manifest."""


@dataclass(frozen=True)
class EmbeddingPart:
    name: str
    start: int  # global id of its first row
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


class EmbeddingSet:
    """A complete embedding set: its manifest, its parts' row ranges, lazily memory-mapped matrices."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        manifest_path = self.path / EMBEDDINGS_MANIFEST
        self.manifest: dict[str, Any] = read_json(
            manifest_path,
            EmbeddingSetError,
            f"{self.path} is not a complete embedding set: no {EMBEDDINGS_MANIFEST} "
            "(run mocoplus embed; with --num-shards, every share must finish)",
        )
        if self.manifest.get("kind") != EMBEDDINGS_KIND:
            raise EmbeddingSetError(f"{manifest_path} is not an embedding-set manifest")
        self.parts: list[EmbeddingPart] = []
        start = 0
        for entry in self.manifest["parts"]:
            self.parts.append(EmbeddingPart(entry["part"], start, int(entry["count"])))
            start += int(entry["count"])
        if start != self.manifest["samples"]:
            raise EmbeddingSetError(
                f"{manifest_path}: parts hold {start} rows, the manifest says {self.manifest['samples']}"
            )

    @property
    def count(self) -> int:
        return int(self.manifest["samples"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def bundle_hash(self) -> str:
        return str(self.manifest["bundle_hash"])

    @property
    def normalized(self) -> bool:
        return bool(self.manifest.get("normalized", False))

    def matrix(self, part: EmbeddingPart) -> np.ndarray:
        """The part's matrix, memory-mapped (nothing is read until rows are touched)."""
        path = self.path / f"{part.name}.npy"
        try:
            matrix = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise EmbeddingSetError(f"{path}: unreadable ({error})") from None
        if matrix.shape != (part.count, self.dim):
            raise EmbeddingSetError(f"{path}: shape {matrix.shape}, the manifest says ({part.count}, {self.dim})")
        return matrix

    def record(self, part: EmbeddingPart) -> dict[str, Any]:
        path = self.path / f"{part.name}.json"
        record = read_json(path, EmbeddingSetError, f"{path}: missing (the embedding set is damaged)")
        if record.get("bundle_hash") != self.bundle_hash or len(record.get("keys", ())) != part.count:
            raise EmbeddingSetError(f"{path} does not match {EMBEDDINGS_MANIFEST} (bundle hash or row count)")
        return record

    def chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(first global id, float32 rows) in id order, at most ``rows`` at a time."""
        for part in self.parts:
            matrix = self.matrix(part)
            for offset in range(0, part.count, rows):
                yield part.start + offset, np.ascontiguousarray(matrix[offset : offset + rows], dtype=np.float32)

    def ordered(self, order: np.ndarray, rows: int = 65536, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(position, float32 rows) for the row ids ``order`` in that order, at most ``rows`` at a time.

        Positions count from ``start``: the ids an index gives the rows it adds.
        """
        for offset in range(0, len(order), rows):
            yield start + offset, self.rows(order[offset : offset + rows])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows for global ``ids`` (any order), reading only the parts they fall in."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"row ids must lie in [0, {self.count})")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        starts = np.array([part.start for part in self.parts], dtype=np.int64)
        owner = np.searchsorted(starts, ids, side="right") - 1
        for index in np.unique(owner):
            part = self.parts[int(index)]
            mine = np.flatnonzero(owner == index)
            out[mine] = self.matrix(part)[ids[mine] - part.start]
        return out

    def keys_and_labels(self) -> tuple[list[str], np.ndarray]:
        """Every row's key and label (−1 where a sample had none), in id order."""
        keys: list[str] = []
        labels: list[int] = []
        for part in self.parts:
            record = self.record(part)
            keys += record["keys"]
            labels += [-1 if label is None else int(label) for label in record["labels"]]
        return keys, np.asarray(labels, dtype=np.int64)
