"""`mocoplus embed`: a shard set through a model bundle into an embedding set.

See docs/architecture.md, "The contracts".

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
Whichever process finds every part complete writes ``manifest.json``; a
process with parts to write withdraws it first, so a set whose parts are
being replaced (or were, by a run killed half-way) never reads as complete,
and the reader checks each part's source shard and keys against the manifest.

An updated shard set (`mocoplus ingest --update`) needs the same command and
no more: its old shards' parts are done, its new shards become new parts, and
the manifest is rewritten with each part's removed keys. A folder that holds
another model's embeddings is refused: one set never mixes two models.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from artifacts.atomic import prepare_out_dir, sweep_stale_temps
from artifacts.embedding_set import (
    EmbeddingSetError,
    absolute_source,
    embedded_with,
    part_is_done,
    withdraw_manifest,
    write_manifest,
    write_part,
)
from artifacts.images import InvalidImageError, fit_square
from artifacts.model_bundle import ModelBundle
from artifacts.shard_set import resolve_shards
from pipeline.data.streams import decode_sample, sample_label
from pipeline.embed.config import EmbedConfig
from pipeline.progress import stage_progress


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


def _expected_record(url: str, bundle: ModelBundle, config: EmbedConfig) -> dict[str, Any]:
    """What a finished part's JSON must say to be reused: this shard (and its size), this bundle, this dtype."""
    return {
        "source": url,
        "source_bytes": _size_or_none(url),
        "bundle_hash": bundle.hash,
        "dtype": "float16" if config.fp16 else "float32",
    }


def _matrix(part: _Part, dim: int) -> np.ndarray:
    return np.concatenate(part.vectors) if part.vectors else np.zeros((0, dim), np.float32)


def embed(
    model_dir: Path, shards: str, out_dir: Path, config: EmbedConfig = EmbedConfig(), *, progress: bool = True
) -> EmbedResult:
    """Embed every sample of ``shards`` with the bundle at ``model_dir`` into parts under ``out_dir``."""
    bundle = ModelBundle(model_dir, provider=config.provider, threads=config.threads, spin=config.workers == 0)
    shard_list = resolve_shards(shards)
    out_dir = prepare_out_dir(Path(out_dir))
    held = embedded_with(out_dir)
    if held is not None and held != bundle.hash:
        raise EmbeddingSetError(
            f"{out_dir} holds embeddings of model bundle {held[:12]}, not of {model_dir} ({bundle.hash[:12]}): "
            "one set never mixes two models; choose another --out, or remove that folder first"
        )
    sweep_stale_temps(out_dir)  # half-written parts of a killed run (of this host; shares elsewhere are not touched)
    # local shards by absolute path: the set's readers (corpus images for grids and the service) run elsewhere
    urls = [absolute_source(url) for url in shard_list.urls]
    mine = [(index, url) for index, url in enumerate(urls) if index % config.num_shards == config.shard_index]

    def is_done(index: int, url: str) -> bool:
        return part_is_done(out_dir, index, _expected_record(url, bundle, config), bundle.dim)

    todo = [(index, url) for index, url in mine if not is_done(index, url)]
    written = samples = skipped_samples = 0
    if todo:
        withdraw_manifest(out_dir)  # parts are about to change: the set is incomplete until they all match again
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
                    write_part(
                        out_dir,
                        index,
                        _matrix(done, bundle.dim),
                        _part_record(done, url_of[index], bundle, config),
                        config.fp16,
                    )
                    written += 1
                    samples += len(done.keys)
                    skipped_samples += len(done.skipped)
    complete = all(is_done(index, url) for index, url in enumerate(urls))
    if complete:
        dtype = "float16" if config.fp16 else "float32"
        source = (str(Path(bundle.path).resolve()), bundle.hash, bundle.info["output"]["normalized"])
        dead = {absolute_source(url): keys for url, keys in shard_list.dead.items()}
        write_manifest(out_dir, urls, source, bundle.dim, dtype, dead)
    return EmbedResult(out_dir, written, len(mine) - len(todo), samples, skipped_samples, complete)
