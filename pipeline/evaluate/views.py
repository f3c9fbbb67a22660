"""Quality without labels: can the model find a picture again from an altered copy of it?

Most corpora have no labels, so the retrieval suite (`pipeline.evaluate.retrieval`)
has nothing to score. What any corpus does have is its own pictures: take a
sample of them, make several altered views of each — a crop of half the
picture or more, a smaller copy, brighter or duller colours, a mirror image, a
harsh JPEG re-encoding, the edits a picture meets when it is shared again — and
search each view against the whole corpus. **Recall@k** is the fraction of views
whose original is among the k nearest; the same for raw pixels (at the model's
input size, standardised with the corpus statistics) says whether the model
learned more than the pixels already hold. An embedding that only memorised
colours or lost the layout fails here as it fails a user's "find this photo".

The views are drawn from a seeded generator per sampled picture, so a second
evaluation (another model, the published one in the quality gate) sees the
very same views. Two forms: a training run's key encoder on shards
(`evaluate_run_views`, as `mocoplus evaluate RUN --data SHARDS --unlabelled`), or
the vectors a model bundle serves (`evaluate_embedding_views`, as
``mocoplus evaluate --memory EMB --unlabelled``), whose views are embedded by the
set's own bundle.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor
from torch.nn import functional as F

from artifacts.corpus_images import CorpusImagesError, scan_shard
from artifacts.images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_image, fit_square, to_mode
from artifacts.shard_set import ShardList, resolve_shards
from pipeline.evaluate.config import ViewConfig
from pipeline.progress import StageProgress, stage_progress

MAX_SAMPLE_BYTES = 64 << 20  # one stored image read back for its views


@dataclass(frozen=True)
class ViewRecall:
    """Recall@k of the originals for each k of the config (fractions), over ``queries`` views."""

    recall: dict[int, float]
    queries: int

    def as_dict(self) -> dict[str, float]:
        return {f"recall@{k}": value for k, value in self.recall.items()}


@dataclass(frozen=True)
class ViewEvaluation:
    """The model's recall of its own corpus from altered views, raw pixels' and (optionally) another model's."""

    corpus: int  # pictures searched
    sample: int  # pictures whose views were made
    views: int  # per picture
    model: ViewRecall
    pixels: ViewRecall
    against: ViewRecall | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self, model_name: str, against_name: str = "against") -> list[tuple[str, dict[str, float]]]:
        rows = [(model_name, self.model.as_dict())]
        if self.against is not None:
            rows.append((against_name, self.against.as_dict()))
        return [*rows, ("pixels", self.pixels.as_dict())]


def altered_view(image: Image.Image, rng: np.random.Generator, config: ViewConfig) -> Image.Image:
    """One altered copy of an RGB or gray picture: crop, smaller copy, colour change, maybe a mirror, JPEG."""
    width, height = image.size
    area = rng.uniform(*config.area)  # of the picture's, with its aspect changed by ``ratio`` (1: kept)
    aspect = math.exp(rng.uniform(math.log(config.ratio[0]), math.log(config.ratio[1])))
    box_w = min(width, max(1, round(width * math.sqrt(area * aspect))))
    box_h = min(height, max(1, round(height * math.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    scale = rng.uniform(*config.rescale)
    size = (max(8, round(box_w * scale)), max(8, round(box_h * scale)))
    view = image.resize(size, Image.Resampling.BILINEAR, box=(x0, y0, x0 + box_w, y0 + box_h))
    low, high = 1 - config.colour, 1 + config.colour
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        factor = rng.uniform(low, high)  # drawn for gray pictures too, so every picture's stream is alike
        if view.mode == "RGB" or enhance is not ImageEnhance.Color:
            view = enhance(view).enhance(factor)
    if rng.random() < config.flip_p:
        view = ImageOps.mirror(view)
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1)))
    buffer.seek(0)
    with Image.open(buffer) as reread:
        return reread.convert(view.mode)


CORPUS_CHUNK, VIEW_CHUNK = 4096, 1024  # similarities are computed VIEW_CHUNK × CORPUS_CHUNK at a time (16 MB)


def _as_float(rows: Tensor) -> Tensor:
    return rows.float()


def recall_of_originals(
    corpus: Tensor,
    originals: Tensor,
    views: Tensor,
    ks: Iterable[int],
    *,
    features: Callable[[Tensor], Tensor] = _as_float,
) -> ViewRecall:
    """Recall@k of each view's original (row ``originals[i]`` of ``corpus``) under cosine similarity.

    A view's rank is the number of other corpus rows more similar to it than its original; it is found for
    rank < k. ``features`` maps rows of ``corpus`` (and the views) to float vectors, applied a chunk at a time:
    the corpus is never copied whole (raw pixels stay uint8 until their chunk is compared).
    """
    if len(originals) != len(views):
        raise ValueError(f"{len(views)} views but {len(originals)} originals")
    originals = originals.long()
    views = F.normalize(features(views), dim=1)
    own = (views * F.normalize(features(corpus[originals]), dim=1)).sum(dim=1, keepdim=True)
    rank = torch.zeros(len(views), dtype=torch.long)
    for start in range(0, len(corpus), CORPUS_CHUNK):
        block = F.normalize(features(corpus[start : start + CORPUS_CHUNK]), dim=1)
        for first in range(0, len(views), VIEW_CHUNK):
            rows = slice(first, first + VIEW_CHUNK)
            similarity = views[rows] @ block.T
            column = originals[rows] - start
            inside = ((column >= 0) & (column < len(block))).nonzero().squeeze(1)
            similarity[inside, column[inside]] = -math.inf  # the original is not its own competitor
            rank[rows] += (similarity > own[rows]).sum(dim=1)
    return ViewRecall({k: float((rank < k).double().mean()) if len(rank) else math.nan for k in ks}, len(rank))


def sample_keys(keys: list[str], config: ViewConfig) -> list[int]:
    """Rows of ``keys`` to make views of: ``config.sample`` of them (all when fewer), seeded, in row order."""
    count = min(config.sample, len(keys))
    chosen = np.random.default_rng(config.seed).choice(len(keys), size=count, replace=False)
    return sorted(int(row) for row in chosen)


def stored_images(shards: ShardList, keys: Iterable[str]) -> dict[str, bytes]:
    """The stored image bytes of ``keys`` from local shard files: each shard's headers scanned
    (`artifacts.corpus_images.scan_shard`), then one bounded read per sampled picture.

    A key removed in a later generation is skipped in the shard that held it, so the live copy is the one read.
    """
    wanted, found = set(keys), {}
    for url in shards.urls:
        try:
            located = scan_shard(url)
        except CorpusImagesError as error:
            raise ValueError(f"label-free evaluation: {error}") from None
        dead = shards.dead.get(url, frozenset())
        chosen = {key: stored for key, stored in located.items() if key in wanted - found.keys() and key not in dead}
        with open(url, "rb") as handle:
            for key, stored in sorted(chosen.items(), key=lambda item: item[1].offset):
                if stored.size > MAX_SAMPLE_BYTES:
                    raise ValueError(f"sampled picture {key!r} is {stored.size:,} bytes, over {MAX_SAMPLE_BYTES:,}")
                handle.seek(stored.offset)
                found[key] = handle.read(stored.size)
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise ValueError(f"{len(missing)} sampled pictures are missing from their shards (e.g. {sorted(missing)[0]!r})")
    return found


def view_images(
    stored: dict[str, bytes], keys: list[str], config: ViewConfig, bar: StageProgress, task: int
) -> list[Image.Image]:
    """``config.views`` altered views of each key's picture (in ``keys`` order), RGB or gray as stored.

    Each picture's views come from a generator seeded by (seed, its place in the sample): the same sample
    gives the same views, whichever model looks at them.
    """
    views = []
    for place, key in enumerate(keys):
        try:
            image = decode_image(stored[key], max_pixels=DEFAULT_MAX_PIXELS).image
        except InvalidImageError as error:
            raise ValueError(f"sampled picture {key!r} does not decode ({error})") from None
        rng = np.random.default_rng([config.seed, place])
        views += [altered_view(image, rng, config) for _ in range(config.views)]
        bar.advance(task, config.views)
    return views


def as_uint8(pictures: list[Image.Image], mode: str) -> np.ndarray:
    """Pictures of one size as uint8 ``[N, S, S, C]`` in ``mode`` (C = 1 for ``L``, 3 for ``RGB``)."""
    stacked = np.stack([np.asarray(to_mode(picture, mode)) for picture in pictures])
    return stacked[..., None] if stacked.ndim == 3 else stacked


def pixel_recall(corpus_pixels: Tensor, originals: Tensor, view_pixels: Tensor, ks: Iterable[int]) -> ViewRecall:
    """Raw pixels' recall: flattened uint8 pictures at the model's size, standardised with the corpus statistics
    (accumulated in float64 over chunks; the corpus stays uint8)."""
    corpus = corpus_pixels.reshape(len(corpus_pixels), -1)
    total = torch.zeros(corpus.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(corpus), CORPUS_CHUNK):
        block = corpus[start : start + CORPUS_CHUNK].double() / 255
        total += block.sum(dim=0)
        squares += block.square().sum(dim=0)
    count = len(corpus)
    mean = total / count
    std = ((squares - count * mean.square()) / max(count - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-6)
    mean, std = mean.float(), std.float()

    def standardised(rows: Tensor) -> Tensor:
        return (rows.reshape(len(rows), -1).float() / 255 - mean) / std

    return recall_of_originals(corpus, originals, view_pixels, ks, features=standardised)


ViewEmbedder = Callable[[list[Image.Image]], Tensor]  # views already at the model's size → vectors [N, D]


def evaluate_views(
    corpus: Tensor,
    corpus_pixels: Tensor,
    keys: list[str],
    shards: ShardList,
    embed_views: ViewEmbedder,
    *,
    size: int,
    mode: str,
    config: ViewConfig,
    bar: StageProgress,
    against: tuple[Tensor, ViewEmbedder] | None = None,
) -> ViewEvaluation:
    """The model's recall (``corpus`` vectors, ``embed_views`` for the views) and raw pixels' on the same views.

    ``corpus_pixels`` are uint8 pictures ``[N, C, size, size]`` (or those rows flattened) in ``mode``, row
    for row with ``corpus`` and ``keys`` (pixels are compared in the model's own mode); ``against`` is another
    model's corpus vectors (same rows) and view embedder, scored on the same views.
    """
    if not len(keys) == len(corpus) == len(corpus_pixels):
        raise ValueError(f"{len(keys)} keys, {len(corpus)} vectors and {len(corpus_pixels)} pictures: not one corpus")
    if len(keys) == 0:
        raise ValueError("the corpus is empty: nothing to search")
    rows = sample_keys(keys, config)
    chosen = [keys[row] for row in rows]
    task = bar.task("altered views", total=len(chosen) * config.views, unit="views")
    stored = stored_images(shards, chosen)
    views = [fit_square(view, size) for view in view_images(stored, chosen, config, bar, task)]
    bar.finish(task)
    originals = torch.tensor(rows, dtype=torch.long).repeat_interleave(config.views)
    task = bar.task("searching views", total=3 if against is not None else 2, unit="feature sets")
    model = recall_of_originals(corpus, originals, embed_views(views), config.ks)
    bar.advance(task)
    other = None
    if against is not None:
        other = recall_of_originals(against[0], originals, against[1](views), config.ks)
        bar.advance(task)
    view_pixels = torch.from_numpy(as_uint8(views, mode)).permute(0, 3, 1, 2)  # [N, C, S, S], as the corpus's
    pixels = pixel_recall(corpus_pixels, originals, view_pixels, config.ks)
    bar.advance(task)
    bar.finish(task, status="done")
    return ViewEvaluation(len(keys), len(rows), config.views, model, pixels, other)


def evaluate_run_views(
    run_dir: Path,
    shards: str,
    config: ViewConfig | None = None,
    *,
    checkpoint: str = "auto",
    workers: int = 2,
    progress: bool = True,
) -> ViewEvaluation:
    """A run's key encoder (its embedding: grid, whitening fitted on the corpus) on a label-free corpus."""
    from pipeline.evaluate.run_embedder import RunEmbedder

    config = config or ViewConfig()
    shard_list = resolve_shards(shards)
    with stage_progress(progress) as bar:
        embedder = RunEmbedder.load(run_dir, checkpoint)
        corpus = embedder.corpus(shards, workers=workers, bar=bar)
        return evaluate_views(
            corpus.vectors, corpus.pictures, corpus.keys, shard_list,
            lambda views: embedder.embed_pictures(as_uint8(views, embedder.mode)),
            size=embedder.size, mode=embedder.mode, config=config, bar=bar,
        )  # fmt: skip


def evaluate_embedding_views(
    memory: Path,
    config: ViewConfig | None = None,
    *,
    against: Path | None = None,
    cache: Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> ViewEvaluation:
    """The served vectors of an embedding set: views embedded by the set's own bundle, searched among its live
    rows; raw pixels from `pipeline.evaluate.cache`; ``against`` (another bundle) embeds the same shards into
    the cache and the same views."""
    from artifacts.embedding_set import EmbeddingSet
    from artifacts.model_bundle import ModelBundle
    from pipeline.evaluate.cache import baseline_rows, default_cache, shard_set_of
    from pipeline.evaluate.embedded import embedded_against, image_format, live_vectors

    config = config or ViewConfig()
    memory_set = EmbeddingSet(memory)
    keys, vectors = live_vectors(memory_set)
    size, mode = image_format(memory_set)
    bundle = ModelBundle(Path(memory_set.manifest.get("model", "")), spin=False)
    folder = shard_set_of(memory_set)
    cache = Path(cache) if cache is not None else default_cache()
    with stage_progress(progress) as bar:
        pixels = baseline_rows(("pixels",), folder, size, mode, cache, bar, workers)["pixels"].aligned(keys)
        other = None
        if against is not None:
            other_set, other_bundle = embedded_against(Path(against), memory_set, cache, workers, bar)
            other_keys, other_vectors = live_vectors(other_set)
            if other_keys != keys:
                raise ValueError(f"{against} embedded other samples than {memory}: cannot compare them")
            other = (other_vectors, _bundle_embedder(other_bundle))
        return evaluate_views(
            vectors, pixels, keys, resolve_shards(folder), _bundle_embedder(bundle),
            size=size, mode=mode, config=config, bar=bar, against=other,
        )  # fmt: skip


def _bundle_embedder(bundle) -> ViewEmbedder:
    """Views → the bundle's vectors (uint8 RGB at its size, in batches of 256, as `mocoplus embed` feeds it)."""

    def embed(views: list[Image.Image]) -> Tensor:
        batches = [bundle.embed(as_uint8(views[start : start + 256], "RGB")) for start in range(0, len(views), 256)]
        return torch.from_numpy(np.concatenate(batches))

    return embed
