"""The embedding set contract: its reader and its writer (`mocoplus embed`) — no torch here.

An embedding set is a folder of parts, one per input shard (``part-N.npy``: a
float32 or float16 matrix; ``part-N.json``: its keys, labels and skipped
samples), and ``manifest.json``, written only once every part is complete.
The index builder reads it in chunks, so memory stays bounded by one part and
never by the corpus; the search command reads single rows by id to turn a
``key:...`` query into its vector. Row ids are global: the parts in manifest
order, rows in part order — the ids the index stores.

A set embedded from an updated shard set (`mocoplus ingest --update`) carries
its removals: each part lists, under ``removed``, the keys of its rows that a
later generation removed. Those rows stay in the part (parts are never
rewritten for a removal) but are dead: `live_rows` leaves them out, and the
index builder never indexes them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.atomic import commit_file, package_version, prepare_out_dir, temp_path_for, write_json_atomic
from artifacts.files import require_regular_file
from artifacts.jsonfile import read_json

EMBEDDINGS_MANIFEST = "manifest.json"
EMBEDDINGS_KIND = "mocoplus.embeddings"


class EmbeddingSetError(ValueError):
    """An embedding set that is missing, incomplete, or inconsistent with its manifest."""


@dataclass(frozen=True)
class EmbeddingPart:
    name: str
    start: int  # global id of its first row
    count: int
    source: str = ""  # the shard it was embedded from
    keys_sha256: str | None = None  # of its keys as the manifest saw them (None in sets made before it was recorded)
    removed: frozenset[str] = frozenset()  # keys of its rows that a later generation of the shard set removed

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
            source, keys_sha256 = str(entry.get("source", "")), entry.get("keys_sha256")
            removed = frozenset(str(key) for key in entry.get("removed", []))
            self.parts.append(EmbeddingPart(entry["part"], start, int(entry["count"]), source, keys_sha256, removed))
            start += int(entry["count"])
        self._checked: set[str] = set()  # parts whose JSON was found to match the manifest
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
    def live_count(self) -> int:
        return self.count - sum(len(part.removed) for part in self.parts)

    def live_rows(self) -> np.ndarray:
        """Row ids of the samples not removed since they were embedded, in id order."""
        if not any(part.removed for part in self.parts):
            return np.arange(self.count, dtype=np.int64)
        dead = [
            part.start + position
            for part in self.parts
            if part.removed
            for position, key in enumerate(self.record(part)["keys"])
            if key in part.removed
        ]
        keep = np.ones(self.count, dtype=bool)
        keep[np.asarray(dead, dtype=np.int64)] = False
        return np.flatnonzero(keep).astype(np.int64)

    @property
    def bundle_hash(self) -> str:
        return str(self.manifest["bundle_hash"])

    @property
    def normalized(self) -> bool:
        return bool(self.manifest.get("normalized", False))

    def matrix(self, part: EmbeddingPart) -> np.ndarray:
        """The part's matrix, memory-mapped (nothing is read until rows are touched)."""
        path = self.path / f"{part.name}.npy"
        self._check_record(part)
        try:
            require_regular_file(path)
            matrix = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise EmbeddingSetError(f"{path}: unreadable ({error})") from None
        if matrix.shape != (part.count, self.dim):
            raise EmbeddingSetError(f"{path}: shape {matrix.shape}, the manifest says ({part.count}, {self.dim})")
        return matrix

    def record(self, part: EmbeddingPart) -> dict[str, Any]:
        """The part's JSON, refused unless it is the part the manifest lists: model, rows, source shard, keys.

        A part replaced after the manifest was written (another shard set embedded
        into this folder, a re-embed killed half-way) never passes for it.
        """
        path = self.path / f"{part.name}.json"
        record = read_json(path, EmbeddingSetError, f"{path}: missing (the embedding set is damaged)")
        keys = record.get("keys")
        if record.get("bundle_hash") != self.bundle_hash or not isinstance(keys, list) or len(keys) != part.count:
            raise EmbeddingSetError(f"{path} does not match {EMBEDDINGS_MANIFEST} (bundle hash or row count)")
        if part.source and not same_source(str(record.get("source", "")), part.source):
            raise EmbeddingSetError(
                f"{path} was embedded from {record.get('source')}, {EMBEDDINGS_MANIFEST} lists {part.source}: "
                "the set changed after it was completed (rerun mocoplus embed)"
            )
        if part.keys_sha256 is not None and keys_digest(keys) != part.keys_sha256:
            raise EmbeddingSetError(
                f"{path}: its keys differ from those {EMBEDDINGS_MANIFEST} lists: the set changed after it was "
                "completed (rerun mocoplus embed)"
            )
        self._checked.add(part.name)
        return record

    def _check_record(self, part: EmbeddingPart) -> None:
        """`record`'s checks, once per part, before its rows are used."""
        if part.name not in self._checked:
            self.record(part)

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
        for part_keys, part_labels in self.keys_and_labels_by_part():
            keys += part_keys
            labels += [-1 if label is None else int(label) for label in part_labels]
        return keys, np.asarray(labels, dtype=np.int64)

    def keys_and_labels_by_part(self) -> Iterator[tuple[list[str], list[int | None]]]:
        """Each part's keys and labels in row order, one part in memory at a time (an index's id map)."""
        for part in self.parts:
            record = self.record(part)
            yield record["keys"], record["labels"]


# --- the writer side: parts, then the manifest over them ------------------------------------------


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def absolute_source(url: str) -> str:
    """A local shard by its absolute path (the set's readers run elsewhere); a URL or ``pipe:`` as it is."""
    return url if "://" in url or url.startswith("pipe:") else os.path.abspath(url)


def same_source(recorded: str, listed: str) -> bool:
    """Whether a part's recorded shard is the one the manifest lists (older sets recorded relative paths)."""
    return recorded == listed or absolute_source(recorded) == absolute_source(listed)


def keys_digest(keys: list[str]) -> str:
    """sha256 of a part's keys in order: the manifest's fingerprint of what each part holds."""
    return hashlib.sha256(json.dumps(keys, ensure_ascii=False).encode()).hexdigest()


def withdraw_manifest(out_dir: Path) -> None:
    """Remove the manifest before any part changes: a set is never complete while a part differs from its list."""
    (Path(out_dir) / EMBEDDINGS_MANIFEST).unlink(missing_ok=True)


def _read_part_record(path: Path) -> dict[str, Any]:
    return read_json(path, EmbeddingSetError, f"{path}: missing")


def embedded_with(out_dir: Path) -> str | None:
    """The model bundle hash of what ``out_dir`` holds: its manifest's, else its parts' when they agree."""
    try:
        return str(read_json(Path(out_dir) / EMBEDDINGS_MANIFEST, EmbeddingSetError, "missing")["bundle_hash"])
    except (EmbeddingSetError, OSError, KeyError):
        pass
    hashes = set()
    for path in sorted(Path(out_dir).glob("part-*.json")):
        try:
            hashes.add(str(_read_part_record(path).get("bundle_hash")))
        except (EmbeddingSetError, OSError):
            continue
    return hashes.pop() if len(hashes) == 1 else None


def part_is_done(out_dir: Path, index: int, expected: dict[str, Any], dim: int) -> bool:
    """A part is done when its JSON (written last) holds ``expected``'s fields and its matrix fits [count, dim].

    A source recorded by a relative path (sets made before absolute ones) counts as the same shard.
    """
    record_path, matrix_path = out_dir / f"{part_name(index)}.json", out_dir / f"{part_name(index)}.npy"
    try:  # bounded, regular-file reads: a FIFO or a link to /dev/zero named like a part is simply not done
        record = _read_part_record(record_path)
        require_regular_file(matrix_path)
        matrix = np.load(matrix_path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    if isinstance(record.get("source"), str):
        record["source"] = absolute_source(record["source"])
    return all(record.get(name) == value for name, value in expected.items()) and matrix.shape == (
        record.get("count"),
        dim,
    )


def write_part(out_dir: Path, index: int, matrix: np.ndarray, record: dict[str, Any], fp16: bool) -> None:
    """The part's matrix, then its JSON: a part with its JSON is complete (each file renamed into place)."""
    matrix_path = out_dir / f"{part_name(index)}.npy"
    temp = temp_path_for(matrix_path)
    try:
        with open(temp, "wb") as handle:
            np.save(handle, matrix.astype(np.float16 if fp16 else np.float32))
        commit_file(temp, matrix_path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    write_json_atomic(out_dir / f"{part_name(index)}.json", record)


def write_manifest(
    out_dir: Path,
    urls: list[str],
    source: tuple[str, str, bool],
    dim: int,
    dtype: str,
    dead: dict[str, frozenset[str]] | None = None,
) -> None:
    """The manifest over finished parts, written last; ``source`` is (model path, bundle hash, normalized).

    ``dead`` (shard url → keys a later generation removed) marks each part's removed rows.
    """
    model, hash_, normalized = source
    parts = []
    for index, url in enumerate(urls):
        record = _read_part_record(out_dir / f"{part_name(index)}.json")
        entry = {"part": part_name(index), "source": url, "count": record["count"], "skipped": len(record["skipped"]),
                 "keys_sha256": keys_digest(record["keys"])}  # fmt: skip
        removed = (dead or {}).get(url)
        if removed:
            entry["removed"] = [key for key in record["keys"] if key in removed]
        parts.append(entry)
    samples = sum(part["count"] for part in parts)
    skipped = sum(part["skipped"] for part in parts)
    manifest = {
        "format": 1,
        "kind": EMBEDDINGS_KIND,
        "version": package_version(),
        "model": model,
        "bundle_hash": hash_,
        "dim": dim,
        "dtype": dtype,
        "normalized": normalized,
        "samples": samples,
        "live": samples - sum(len(part.get("removed", ())) for part in parts),
        "skipped": skipped,
        "inputs": samples + skipped,
        "parts": parts,
    }
    write_json_atomic(out_dir / EMBEDDINGS_MANIFEST, manifest)


def write_embedding_set(
    out_dir: Path, vectors: np.ndarray, *, bundle_hash: str, parts: int = 1, labels: np.ndarray | None = None
) -> Path:
    """Vectors made elsewhere (synthetic benchmarks, tests) as an embedding set: keys ``v0``, ``v1``, ..."""
    out_dir = prepare_out_dir(Path(out_dir))
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = np.full(len(vectors), -1) if labels is None else np.asarray(labels)
    bounds = np.linspace(0, len(vectors), parts + 1).round().astype(int)
    names = [f"vectors-{index}" for index in range(parts)]
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        keys = [f"v{row}" for row in range(start, stop)]
        record = {"source": names[index], "source_bytes": None, "bundle_hash": bundle_hash, "dtype": "float32",
                  "dim": vectors.shape[1], "count": int(stop - start), "keys": keys,
                  "labels": labels[start:stop].tolist(), "skipped": []}  # fmt: skip
        write_part(out_dir, index, vectors[start:stop], record, fp16=False)
    norms = np.linalg.norm(vectors, axis=1)
    normalized = bool(len(vectors)) and bool(np.allclose(norms, 1, atol=1e-3))
    write_manifest(out_dir, names, ("", bundle_hash, normalized), vectors.shape[1], "float32")
    return out_dir


def grow_embedding_set(
    out_dir: Path,
    vectors: np.ndarray,
    *,
    removed: tuple[str, ...] | list[str] = (),
    keys: list[str] | None = None,
    labels: np.ndarray | None = None,
) -> list[str]:
    """A set made by `write_embedding_set`, grown as ``embed`` grows one after ``ingest --update``: one new
    part of ``vectors`` (``keys``, by default continuing ``v<N>``; a removed key given again is a replaced
    sample), and ``removed`` keys marked dead in the parts that hold them. The new part's keys.

    For benchmarks and tests of updates on vectors made elsewhere.
    """
    out_dir = Path(out_dir)
    current = EmbeddingSet(out_dir)
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = np.full(len(vectors), -1) if labels is None else np.asarray(labels)
    keys = keys if keys is not None else [f"v{row}" for row in range(current.count, current.count + len(vectors))]
    index = len(current.parts)
    source = f"vectors-{index}"
    record = {"source": source, "source_bytes": None, "bundle_hash": current.bundle_hash, "dtype": "float32",
              "dim": current.dim, "count": len(keys), "keys": keys, "labels": labels.tolist(),
              "skipped": []}  # fmt: skip
    dead = {part.source: set(part.removed) for part in current.parts}
    wanted = set(removed)
    for part in current.parts:
        found = wanted & set(current.record(part)["keys"]) - dead[part.source]
        dead[part.source] |= found
        wanted -= found
    if wanted:
        raise KeyError(f"no live sample with key {sorted(wanted)[0]!r} in {out_dir}")
    withdraw_manifest(out_dir)
    write_part(out_dir, index, vectors, record, fp16=False)
    sources = [part.source for part in current.parts] + [source]
    model = (str(current.manifest.get("model", "")), current.bundle_hash, current.normalized)
    write_manifest(out_dir, sources, model, current.dim, "float32", {name: frozenset(k) for name, k in dead.items()})
    return keys
