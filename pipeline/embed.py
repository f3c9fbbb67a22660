"""`mocoplus embed`: a shard set through a model bundle into an embedding set (DESIGN §3).

Decoding and resizing run in data-loader worker processes, one input shard
per worker at a time, while the main process feeds ONNX Runtime: the two
overlap. Each input shard becomes one part — ``part-NNNNNN.npy`` (float32, or
float16 with ``fp16``) and ``part-NNNNNN.json`` (its keys, labels, the samples
that could not be decoded with the reason, the source shard and the model
bundle hash) — written under temp names and renamed, the JSON last, so a part
with its JSON is complete. A rerun skips parts whose JSON matches the shard
and the bundle and redoes the rest; a killed run resumes where it stopped.

``shard_index``/``num_shards`` split the input shards disjointly (shard i
belongs to process i mod n): n processes on n machines writing to one shared
folder build one embedding set, the unit the flows map over a cluster.
Whichever process finds every part complete writes ``manifest.json``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.artifacts import (
    commit_file,
    package_version,
    prepare_out_dir,
    sweep_stale_temps,
    temp_path_for,
    write_json_atomic,
)
from pipeline.data import decode_sample, sample_label
from pipeline.progress import stage_progress
from pipeline.shards import resolve_shards
from serving.bundle import ModelBundle
from serving.images import DEFAULT_MAX_PIXELS, InvalidImageError, fit_square

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 256
    workers: int = 2
    provider: str = "cpu"
    threads: int = 0  # ONNX Runtime intra-op threads; 0: its default
    fp16: bool = False
    shard_index: int = 0
    num_shards: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0 or self.threads < 0:
            raise ValueError("need batch_size >= 1, workers >= 0 and threads >= 0")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"need 0 <= shard_index < num_shards; got {self.shard_index}, {self.num_shards}")


@dataclass
class _Part:
    """One input shard's samples as they arrive from its worker."""

    vectors: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class EmbedResult:
    out_dir: Path
    parts_written: int
    parts_skipped: int
    samples: int
    skipped_samples: int
    complete: bool  # every part of the set is done (by this or another process) and the manifest written


def part_name(index: int) -> str:
    return f"part-{index:06d}"


class _ShardBatches(IterableDataset):
    """Worker w decodes shards w, w + W, ... in order; each shard's batches end with one marked ``last``."""

    def __init__(self, shards: list[tuple[int, str]], size: int, batch_size: int, max_pixels: int) -> None:
        self.shards, self.size, self.batch_size, self.max_pixels = shards, size, batch_size, max_pixels

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        for index, url in mine:
            yield from self._shard(index, url)

    def _shard(self, index: int, url: str) -> Iterator[dict[str, Any]]:
        batch: dict[str, Any] = _empty_batch(index)
        skipped: list[dict[str, str]] = []

        def unreadable(error: Exception) -> bool:
            skipped.append({"key": "", "reason": f"shard data: {type(error).__name__}: {error}"})
            return True

        for sample in wds.DataPipeline(lambda: iter([{"url": url}]), wds.tarfile_to_samples(handler=unreadable)):
            key = str(sample.get("__key__"))
            try:
                image = fit_square(decode_sample(sample, "RGB", self.max_pixels), self.size)
            except InvalidImageError as error:
                skipped.append({"key": key, "reason": str(error)})
                continue
            batch["images"].append(np.asarray(image, dtype=np.uint8))
            batch["keys"].append(key)
            batch["labels"].append(sample_label(sample))
            if len(batch["keys"]) == self.batch_size:
                yield _finish(batch, skipped, last=False)
                batch, skipped = _empty_batch(index), []
        yield _finish(batch, skipped, last=True)


def _empty_batch(index: int) -> dict[str, Any]:
    return {"shard": index, "images": [], "keys": [], "labels": []}


def _finish(batch: dict[str, Any], skipped: list[dict[str, str]], *, last: bool) -> dict[str, Any]:
    images = np.stack(batch["images"]) if batch["images"] else np.zeros((0, 0, 0, 3), np.uint8)
    return {**batch, "images": images, "skipped": list(skipped), "last": last}


def _part_record(part: _Part, url: str, bundle: ModelBundle, config: EmbedConfig) -> dict[str, Any]:
    return {
        "source": url,
        "source_bytes": _size_or_none(url),
        "bundle_hash": bundle.hash,
        "dtype": "float16" if config.fp16 else "float32",
        "dim": bundle.dim,
        "count": len(part.keys),
        "keys": part.keys,
        "labels": part.labels,
        "skipped": part.skipped,
    }


def _size_or_none(url: str) -> int | None:
    return os.path.getsize(url) if os.path.isfile(url) else None


def _is_done(out_dir: Path, index: int, url: str, bundle: ModelBundle, config: EmbedConfig) -> bool:
    """A part is done when its JSON (written last) names this shard, bundle and dtype, and its matrix fits."""
    record_path, matrix_path = out_dir / f"{part_name(index)}.json", out_dir / f"{part_name(index)}.npy"
    try:
        record = json.loads(record_path.read_text())
        matrix = np.load(matrix_path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    expected = {
        "source": url,
        "source_bytes": _size_or_none(url),
        "bundle_hash": bundle.hash,
        "dtype": "float16" if config.fp16 else "float32",
    }
    return all(record.get(name) == value for name, value in expected.items()) and matrix.shape == (
        record.get("count"),
        bundle.dim,
    )


def _write_part(out_dir: Path, index: int, part: _Part, record: dict[str, Any], fp16: bool) -> None:
    matrix = np.concatenate(part.vectors) if part.vectors else np.zeros((0, record["dim"]), np.float32)
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


def embed(
    model_dir: Path, shards: str, out_dir: Path, config: EmbedConfig = EmbedConfig(), *, progress: bool = True
) -> EmbedResult:
    """Embed every sample of ``shards`` with the bundle at ``model_dir`` into parts under ``out_dir``."""
    bundle = ModelBundle(model_dir, provider=config.provider, threads=config.threads, spin=config.workers == 0)
    shard_list = resolve_shards(shards)
    out_dir = prepare_out_dir(Path(out_dir))
    sweep_stale_temps(out_dir)  # half-written parts of a killed run (of this host; shares elsewhere are not touched)
    urls = list(shard_list.urls)
    mine = [(index, url) for index, url in enumerate(urls) if index % config.num_shards == config.shard_index]
    todo = [(index, url) for index, url in mine if not _is_done(out_dir, index, url, bundle, config)]
    written = samples = skipped_samples = 0
    if todo:
        dataset = _ShardBatches(todo, bundle.size, config.batch_size, config.max_pixels)
        loader = DataLoader(dataset, batch_size=None, num_workers=min(config.workers, len(todo)))
        parts: dict[int, _Part] = {}
        url_of = dict(todo)
        with stage_progress(progress) as bar:
            total = round(shard_list.samples * len(todo) / len(urls)) if shard_list.samples else None
            task = bar.task("embedding", total=total, unit="images")
            for batch in loader:
                part = parts.setdefault(int(batch["shard"]), _Part())
                images = np.asarray(batch["images"], dtype=np.uint8)
                if len(images):
                    vectors = bundle.embed(images)
                    part.vectors.append(vectors.astype(np.float16) if config.fp16 else vectors)
                    part.keys.extend(batch["keys"])
                    part.labels.extend(int(label) for label in batch["labels"])
                part.skipped.extend(batch["skipped"])
                bar.advance(task, len(images) + len(batch["skipped"]))
                if batch["last"]:
                    index = int(batch["shard"])
                    done = parts.pop(index)
                    _write_part(out_dir, index, done, _part_record(done, url_of[index], bundle, config), config.fp16)
                    written += 1
                    samples += len(done.keys)
                    skipped_samples += len(done.skipped)
    complete = all(_is_done(out_dir, index, url, bundle, config) for index, url in enumerate(urls))
    if complete:
        dtype = "float16" if config.fp16 else "float32"
        source = (str(Path(bundle.path).resolve()), bundle.hash, bundle.info["output"]["normalized"])
        write_json_atomic(out_dir / MANIFEST, _manifest(out_dir, urls, source, bundle.dim, dtype))
    return EmbedResult(out_dir, written, len(mine) - len(todo), samples, skipped_samples, complete)


def _manifest(out_dir: Path, urls: list[str], source: tuple[str, str, bool], dim: int, dtype: str) -> dict[str, Any]:
    """The manifest over finished parts; ``source`` is (model path, bundle hash, normalized)."""
    model, hash_, normalized = source
    parts = []
    for index, url in enumerate(urls):
        record = json.loads((out_dir / f"{part_name(index)}.json").read_text())
        parts.append(
            {"part": part_name(index), "source": url, "count": record["count"], "skipped": len(record["skipped"])}
        )
    samples = sum(part["count"] for part in parts)
    skipped = sum(part["skipped"] for part in parts)
    return {
        "format": 1,
        "kind": "mocoplus.embeddings",
        "version": package_version(),
        "model": model,
        "bundle_hash": hash_,
        "dim": dim,
        "dtype": dtype,
        "normalized": normalized,
        "samples": samples,
        "skipped": skipped,
        "inputs": samples + skipped,
        "parts": parts,
    }


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
        part = _Part([vectors[start:stop]], [f"v{row}" for row in range(start, stop)], labels[start:stop].tolist())
        record = {"source": names[index], "source_bytes": None, "bundle_hash": bundle_hash, "dtype": "float32",
                  "dim": vectors.shape[1], "count": int(stop - start), "keys": part.keys, "labels": part.labels,
                  "skipped": []}  # fmt: skip
        _write_part(out_dir, index, part, record, fp16=False)
    norms = np.linalg.norm(vectors, axis=1)
    normalized = bool(len(vectors)) and bool(np.allclose(norms, 1, atol=1e-3))
    manifest = _manifest(out_dir, names, ("", bundle_hash, normalized), vectors.shape[1], "float32")
    write_json_atomic(out_dir / MANIFEST, manifest)
    return out_dir
