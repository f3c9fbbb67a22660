"""What evaluation computes once and keeps: baseline features per shard set, a model's vectors per shard set.

Under one cache folder (``--cache``, default `default_cache`):

- ``embeddings/BUNDLE/KEY/``: an embedding set of the shard set ``KEY`` by the
  model bundle ``BUNDLE`` (hash prefixes), what the ``pretrain`` flow's gate
  scores; the published model's stay there, so the next gate compares against
  them without embedding again;
- ``baselines/KEY/NAME/``: a baseline's features.

A baseline does not change while its images do not, yet HOG of 70,000 images
takes a minute on 2 cores: the demo and every scheduled ``pretrain`` run would
pay it again. Features are kept under ``CACHE/baselines/KEY/NAME/``
(``features.npy`` and ``keys.json``, written as one folder, renamed into place),
``KEY`` being the shard set's manifest hash with the image size and mode the
model reads (`ShardList`'s removed samples are not decoded, so an ``ingest
--update`` changes the manifest and with it the key). Rows are looked up by
sample key, so any embedding set of the same shards can be paired with them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from artifacts.atomic import building_dir, sha256_file
from artifacts.embedding_set import EmbeddingSet, EmbeddingSetError
from artifacts.files import read_npy
from artifacts.jsonfile import read_json
from artifacts.shard_set import MANIFEST_NAME
from pipeline.data.streams import EvalStream, StreamConfig
from pipeline.evaluate.baselines import baseline
from pipeline.progress import StageProgress

FEATURES, KEYS = "features.npy", "keys.json"
MAX_FEATURE_BYTES = 8 << 30  # HOG of 1M 28 px images is 5 GB: the suite's scale, not a hostile file's
CACHE_ENV = "MOCOPLUS_CACHE"


def default_cache() -> Path:
    """``$MOCOPLUS_CACHE``, else ``$XDG_CACHE_HOME/mocoplus``, else ``~/.cache/mocoplus``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mocoplus"


def shard_set_of(embeddings: EmbeddingSet) -> Path:
    """The shard set folder an embedding set was made from: its parts' common folder, holding a manifest."""
    folders = {Path(part.source).parent for part in embeddings.parts}
    if len(folders) != 1 or not (folder := folders.pop()).joinpath(MANIFEST_NAME).is_file():
        raise EmbeddingSetError(
            f"{embeddings.path} was not embedded from one shard set folder with a {MANIFEST_NAME} "
            "(baselines and --against read the images again from it)"
        )
    return folder


def cache_key(shards: Path, size: int, mode: str) -> str:
    """The shard set's manifest hash with the image size and mode the features are computed at."""
    return f"{sha256_file(Path(shards) / MANIFEST_NAME)[:16]}-{size}px-{mode}"


def embeddings_folder(cache: Path, bundle_hash: str, shards: Path, size: int) -> Path:
    """Where the cache keeps the vectors of ``shards`` by the bundle ``bundle_hash`` (RGB at ``size``)."""
    return Path(cache) / "embeddings" / bundle_hash[:16] / cache_key(shards, size, "RGB")


@dataclass(frozen=True)
class BaselineRows:
    keys: list[str]
    features: torch.Tensor

    def aligned(self, keys: list[str]) -> torch.Tensor:
        """The rows of ``keys``, in their order (every key must be there)."""
        position = {key: row for row, key in enumerate(self.keys)}
        missing = [key for key in keys if key not in position]
        if missing:
            raise EmbeddingSetError(f"{len(missing)} embedded samples have no baseline row (first: {missing[0]!r})")
        return self.features[torch.as_tensor([position[key] for key in keys], dtype=torch.long)]


def baseline_rows(
    names: tuple[str, ...], shards: Path, size: int, mode: str, cache: Path, bar: StageProgress, workers: int = 2
) -> dict[str, BaselineRows]:
    """Each named baseline's rows for every sample of ``shards``: from the cache, else computed (one decode of
    the images for all the missing ones) and kept."""
    root = Path(cache) / "baselines" / cache_key(shards, size, mode)
    missing = [name for name in names if not (root / name / KEYS).is_file()]
    if missing:
        _compute(missing, shards, size, mode, root, bar, workers)
    return {name: _read(root / name) for name in names}


def _compute(
    names: list[str], shards: Path, size: int, mode: str, root: Path, bar: StageProgress, workers: int
) -> None:
    stream = EvalStream(str(shards), size, mode, StreamConfig(batch_size=512, workers=workers), rank=0, world_size=1)
    task = bar.task(f"images {shards.name}"[:22], total=stream.shards.samples, unit="images")
    images, keys = [], []
    for batch in stream:
        images.append(batch.images)
        keys.extend(batch.keys)
        bar.advance(task, len(batch.keys))
    bar.finish(task, status=f"{', '.join(names)} features")
    pixels = torch.cat(images)
    for name in names:
        _keep(root / name, baseline(name).rows(pixels), keys)


def _keep(folder: Path, features: torch.Tensor, keys: list[str]) -> None:
    """Write one baseline's rows into the cache as one folder.

    Two runs may compute the same baseline at once (a scheduled flow's gate and
    a user's ``evaluate`` on the same shards): the first to rename its folder
    into place wins, and the other keeps that folder rather than failing after
    all its work, since the same images give the same rows.
    """
    try:
        with building_dir(folder) as work:
            np.save(work / FEATURES, features.numpy())
            (work / KEYS).write_text(json.dumps({"keys": keys, "sha256": _digest(keys)}))
    except OSError:
        if not (folder / KEYS).is_file():
            raise


def _read(folder: Path) -> BaselineRows:
    record = read_json(folder / KEYS, EmbeddingSetError, f"{folder}: no {KEYS}")
    keys = [str(key) for key in record.get("keys", [])]
    features = read_npy(folder / FEATURES, MAX_FEATURE_BYTES)
    if record.get("sha256") != _digest(keys) or len(features) != len(keys):
        raise EmbeddingSetError(f"{folder}: keys and features disagree (corrupt cache: remove that folder)")
    return BaselineRows(keys, torch.from_numpy(np.array(features)))  # a writable copy: torch tensors are


def _digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()
