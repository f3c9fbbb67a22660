"""Streaming shards into training and evaluation.

See docs/architecture.md, "The contracts", "How data flows through a run" and "Bad input".

**Training** (`TrainStream`) is an endless WebDataset pipeline per data-loader
worker: resampled shards (drawn with replacement) → tar samples → shuffle
buffer → decode + one random crop per view per image → batches → flip,
colour jitter, grayscale and blur on the whole batch. Each (epoch, rank,
worker) has its own seed, so workers never repeat each other and a rerun with
the same seed sees the same batches. An epoch is a fixed number of batches,
``samples // (batch_size × world_size)``, computed from the manifest alike on
every rank: under DDP every rank takes the same number of steps, whatever the
shard count, so no rank waits forever in an all-reduce; that holds with fewer
shards than ranks × workers too, because resampling needs no partition. A
sample that does not decode is skipped, logged and counted in the batch
(`TrainBatch.decode_failures`); a worker that finds nothing decodable in a
long run of samples stops with an error instead of spinning.

**Evaluation** (`EvalStream`) is one deterministic pass: shard i goes to the
one (rank, worker) slot ``i mod (world_size × workers)``, each slot reads its
shards in order, and the data loader interleaves workers in a fixed order. So
every sample is seen exactly once across all ranks and workers, in the same
order on every run, with its key and label (−1 when unlabelled), resized by
the serving policy (`artifacts.images.fit_square`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from artifacts.images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_image, fit_square, to_mode
from artifacts.shard_set import IMAGE_EXTENSIONS, ShardList, resolve_shards
from mocoplus import distributed
from pipeline.data.augment import AugmentConfig, RandomAugment, small_crop_config

LOG = logging.getLogger(__name__)
NO_LABEL = -1


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (base seed, epoch, rank, worker): distinct tuples, unrelated streams."""
    return int(np.random.SeedSequence([int(part) & 0xFFFFFFFF for part in parts]).generate_state(2, np.uint64)[0]) >> 1


@dataclass(frozen=True)
class WorkerSlot:
    """Where this iterator runs: rank of world_size, worker of workers (data-loader processes)."""

    rank: int
    world_size: int
    worker: int
    workers: int

    @property
    def index(self) -> int:
        return self.rank * self.workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.workers


def _placement(rank: int, world_size: int) -> tuple[int, int]:
    """(rank, world_size) as given, or the initialised process group's when not given (negative)."""
    if rank < 0 or world_size < 1:
        rank, world_size = distributed.rank(), distributed.world_size()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world size {world_size}")
    return rank, world_size


def _as_shard_list(shards: ShardList | str | Path) -> ShardList:
    return shards if isinstance(shards, ShardList) else resolve_shards(shards)


def _worker_slot(rank: int, world_size: int) -> WorkerSlot:
    info = get_worker_info()
    return WorkerSlot(rank, world_size, info.id if info else 0, info.num_workers if info else 1)


class DecodeFailures:
    """Counts and logs samples (and shards) that could not be read, per worker; `take` drains the count."""

    def __init__(self) -> None:
        self.pending = 0
        self.total = 0

    def record(self, what: str, reason: str) -> None:
        self.pending += 1
        self.total += 1
        LOG.warning("skipped %s: %s", what, reason)

    def handler(self, error: Exception) -> bool:
        """A WebDataset handler: log, count and go on (an unreadable shard or tar member)."""
        self.record("shard data", f"{type(error).__name__}: {error}")
        return True

    def take(self) -> int:
        pending, self.pending = self.pending, 0
        return pending


def decode_sample(sample: dict[str, object], mode: str, max_pixels: int) -> Image.Image:
    """The sample's image as a PIL image in ``mode``; `InvalidImageError` if it has none or it is bad."""
    for extension in IMAGE_EXTENSIONS:
        data = sample.get(extension)
        if isinstance(data, bytes | bytearray):
            return to_mode(decode_image(bytes(data), max_pixels=max_pixels).image, mode)
    raise InvalidImageError(f"no image field (has {sorted(k for k in sample if not k.startswith('__'))})")


def sample_label(sample: dict[str, object]) -> int:
    data = sample.get("cls")
    if isinstance(data, bytes | bytearray):
        text = bytes(data).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
    return NO_LABEL


def _to_tensor(image: Image.Image) -> Tensor:
    """PIL ``L``/``RGB`` → uint8 ``[C, H, W]``."""
    array = np.asarray(image)
    return (
        torch.from_numpy(array.copy()).unsqueeze(0)
        if array.ndim == 2
        else torch.from_numpy(array.copy()).permute(2, 0, 1)
    )


@dataclass(frozen=True)
class StreamConfig:
    """Data-loading knobs shared by both streams. ``batch_size`` is per rank."""

    batch_size: int = 256
    workers: int = 2
    shuffle_buffer: int = 2000
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch_batches: int = 2
    # page-locked batches, so that ``.to(cuda, non_blocking=True)`` really overlaps the copy (GPU only)
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0 or self.shuffle_buffer < 1 or self.prefetch_batches < 1:
            raise ValueError(f"need batch_size, shuffle_buffer, prefetch_batches >= 1 and workers >= 0; got {self}")


@dataclass
class TrainBatch:
    """Two augmented views ``[B, C, S, S]`` (float, normalised) and the decode failures skipped to make them.

    ``small`` holds multi-crop's small views ``[n·B, C, s, s]``, crop-major (the
    first small crop of every image, then the second, ...), or None without them.
    """

    view1: Tensor
    view2: Tensor
    decode_failures: int = 0
    small: Tensor | None = None

    def pin_memory(self) -> TrainBatch:
        """The batch in page-locked memory (the data loader calls this when ``pin_memory`` is on)."""
        small = None if self.small is None else self.small.pin_memory()
        return TrainBatch(self.view1.pin_memory(), self.view2.pin_memory(), self.decode_failures, small)


@dataclass
class EvalBatch:
    """uint8 images ``[B, C, S, S]``, their keys and labels (``-1``: none), and failures skipped."""

    images: Tensor
    keys: list[str]
    labels: Tensor
    decode_failures: int = 0


def _one_thread_per_worker() -> None:
    """Loader workers run one torch thread each: W workers already use W cores, beside the trainer's."""
    if get_worker_info() is not None:
        torch.set_num_threads(1)


def _loader(dataset: IterableDataset, workers: int, prefetch: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # the pipelines batch themselves
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
        pin_memory=pin_memory and torch.cuda.is_available(),
        # its own generator: creating a loader iterator would otherwise draw from torch's global RNG, which the
        # trainer checkpoints and restores, so a resumed run would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(0),
    )


class _TrainEpoch(IterableDataset):
    """One epoch's endless batch stream; built per worker inside `__iter__` so seeds see the worker id."""

    def __init__(self, stream: TrainStream, epoch: int) -> None:
        self.stream, self.epoch = stream, epoch

    def __iter__(self) -> Iterator[TrainBatch]:
        stream, config = self.stream, self.stream.config
        slot = _worker_slot(stream.rank, stream.world_size)
        seed = stream_seed(config.seed, self.epoch, slot.rank, slot.worker)
        failures = DecodeFailures()
        augment = RandomAugment(stream.augment)
        small = RandomAugment(small_crop_config(stream.augment)) if stream.augment.small_crops else None
        generator = torch.Generator().manual_seed(seed)
        pipeline = wds.DataPipeline(
            _resampled_urls(stream.urls, random.Random(seed)),
            wds.tarfile_to_samples(handler=failures.handler),
            wds.select(_as_shard_list(stream.shards).keeps),  # samples removed by a later generation are skipped
            wds.shuffle(config.shuffle_buffer, initial=min(config.shuffle_buffer, 100), rng=random.Random(seed + 1)),
            partial_stage(
                _crop_views, augment=augment, small=small, generator=generator, failures=failures, config=config
            ),
            wds.batched(config.batch_size, collation_fn=_stack_views, partial=False),
        )
        _one_thread_per_worker()
        for crops1, crops2, *small_crops in pipeline:
            view1, view2 = augment.after_crop(crops1, generator), augment.after_crop(crops2, generator)
            small_views = (
                small.after_crop(torch.cat(small_crops), generator) if small is not None and small_crops else None
            )
            yield TrainBatch(view1, view2, failures.take(), small_views)


def partial_stage(function: Callable[..., Iterator], **kwargs: object) -> Callable[[Iterator], Iterator]:
    """A WebDataset pipeline stage from a generator function taking the upstream iterator first."""
    return lambda source: function(source, **kwargs)


def _resampled_urls(urls: tuple[str, ...], rng: random.Random) -> Callable[[], Iterator[dict[str, str]]]:
    """Shards drawn with replacement, forever (WebDataset's ResampledShards, with our seed)."""

    def draw() -> Iterator[dict[str, str]]:
        while True:
            yield {"url": urls[rng.randrange(len(urls))]}

    return draw


def _crop_views(
    samples: Iterator[dict[str, object]],
    *,
    augment: RandomAugment,
    small: RandomAugment | None,
    generator: torch.Generator,
    failures: DecodeFailures,
    config: StreamConfig,
) -> Iterator[tuple[Tensor, ...]]:
    """Decode each sample and cut two RandomResizedCrops to the output size (uint8 ``[C, S, S]`` each),
    then ``small_crops`` smaller ones to the small size."""
    mode = augment.config.input_mode
    cutters = [augment, augment] + [small] * (augment.config.small_crops if small is not None else 0)
    run_limit = max(1000, 10 * config.batch_size)
    failed_in_a_row = 0
    for sample in samples:
        try:
            image = decode_sample(sample, mode, config.max_pixels)
        except InvalidImageError as error:
            failures.record(f"sample {sample.get('__key__')!r} of {sample.get('__url__')}", str(error))
            failed_in_a_row += 1
            if failed_in_a_row >= run_limit:
                message = f"{failed_in_a_row} samples in a row failed to decode: are these image shards?"
                raise RuntimeError(message) from None
            continue
        failed_in_a_row = 0
        crops = []
        for cutter in cutters:
            x0, y0, w, h = cutter.crop_box(image.height, image.width, generator)
            size = cutter.config.output_size
            crop = image.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
            crops.append(_to_tensor(crop))
        yield tuple(crops)


def _stack_views(samples: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Per view position, the batch's crops stacked: ``([B, C, S, S], [B, C, S, S], [B, C, s, s], ...)``."""
    return tuple(torch.stack(views) for views in zip(*samples, strict=True))


@dataclass
class TrainStream:
    """Fixed-length epochs of two-view batches from resampled shards (see the module docstring).

    ``shards`` is anything `resolve_shards` takes; ``samples_per_epoch``
    defaults to the manifest's count and is required for bare URLs.
    ``rank``/``world_size`` default to the initialised process group's.
    """

    shards: ShardList | str | Path
    augment: AugmentConfig
    config: StreamConfig = field(default_factory=StreamConfig)
    samples_per_epoch: int | None = None
    rank: int = -1
    world_size: int = -1

    def __post_init__(self) -> None:
        self.shards = _as_shard_list(self.shards)
        self.rank, self.world_size = _placement(self.rank, self.world_size)
        self.samples_per_epoch = self.samples_per_epoch or self.shards.samples
        if not self.samples_per_epoch:
            raise ValueError("samples per epoch unknown: give a shard set folder (with manifest.json) or an epoch size")

    @property
    def urls(self) -> tuple[str, ...]:
        return _as_shard_list(self.shards).urls

    @property
    def batches_per_epoch(self) -> int:
        """The same on every rank: whole global batches in an epoch's samples (at least one)."""
        assert self.samples_per_epoch is not None
        return max(1, self.samples_per_epoch // (self.config.batch_size * self.world_size))

    def epoch(self, epoch: int) -> Iterator[TrainBatch]:
        """Exactly `batches_per_epoch` batches for ``epoch`` (which also seeds them)."""
        config = self.config
        loader = _loader(_TrainEpoch(self, epoch), config.workers, config.prefetch_batches, config.pin_memory)
        yield from islice(loader, self.batches_per_epoch)


class _EvalPass(IterableDataset):
    def __init__(self, stream: EvalStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[EvalBatch]:
        stream, config = self.stream, self.stream.config
        slot = _worker_slot(stream.rank, stream.world_size)
        urls = stream.urls[slot.index :: slot.count]
        if not urls:
            return
        failures = DecodeFailures()
        pipeline = wds.DataPipeline(
            lambda: iter([{"url": url} for url in urls]),  # a list would be read as a list of stages
            wds.tarfile_to_samples(handler=failures.handler),
            wds.select(_as_shard_list(stream.shards).keeps),
            partial_stage(_decode_eval, stream=stream, failures=failures),
            wds.batched(config.batch_size, collation_fn=_collate_eval, partial=True),
        )
        _one_thread_per_worker()
        for images, keys, labels in pipeline:
            yield EvalBatch(images, keys, labels, failures.take())


def _decode_eval(
    samples: Iterator[dict[str, object]], *, stream: EvalStream, failures: DecodeFailures
) -> Iterator[tuple[Tensor, str, int]]:
    for sample in samples:
        key = str(sample.get("__key__"))
        try:
            image = decode_sample(sample, stream.mode, stream.config.max_pixels)
        except InvalidImageError as error:
            failures.record(f"sample {key!r} of {sample.get('__url__')}", str(error))
            continue
        yield _to_tensor(fit_square(image, stream.size)), key, sample_label(sample)


def _collate_eval(items: list[tuple[Tensor, str, int]]) -> tuple[Tensor, list[str], Tensor]:
    return (
        torch.stack([item[0] for item in items]),
        [item[1] for item in items],
        torch.tensor([item[2] for item in items], dtype=torch.long),
    )


@dataclass
class EvalStream:
    """One deterministic pass over ``shards``: each sample once across ranks and workers, in a stable order.

    Images come as uint8 ``[B, C, size, size]`` (``mode`` ``L`` → C = 1,
    ``RGB`` → 3), resized by the serving policy: shorter side to ``size``,
    centre crop.
    """

    shards: ShardList | str | Path
    size: int
    mode: str = "RGB"
    config: StreamConfig = field(default_factory=StreamConfig)
    rank: int = -1
    world_size: int = -1

    def __post_init__(self) -> None:
        self.shards = _as_shard_list(self.shards)
        self.rank, self.world_size = _placement(self.rank, self.world_size)
        if self.mode not in ("L", "RGB") or self.size < 1:
            raise ValueError(f"mode must be 'L' or 'RGB' and size >= 1; got {self.mode!r}, {self.size}")

    @property
    def urls(self) -> tuple[str, ...]:
        return _as_shard_list(self.shards).urls

    def __iter__(self) -> Iterator[EvalBatch]:
        return iter(_loader(_EvalPass(self), self.config.workers, self.config.prefetch_batches))
