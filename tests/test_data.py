"""The training and evaluation streams on real shards: epochs, seeds, coverage, bad samples."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import distributed_workers
import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds
from datasets import noise_image

from pipeline.data.augment import AugmentConfig, small_grayscale_preset
from pipeline.data.fashion_mnist import load_split
from pipeline.data.streams import EvalStream, StreamConfig, TrainStream, stream_seed


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, bytes, int]]) -> Path:
    """A shard written by plain WebDataset (no manifest), for hostile content ingest would never write."""
    with wds.TarWriter(str(path)) as writer:
        for key, image, label in samples:
            writer.write({"__key__": key, "png": image, "cls": str(label).encode()})
    return path


SMALL = StreamConfig(batch_size=32, workers=0, shuffle_buffer=50)


def test_train_epoch_has_a_fixed_batch_count_of_normalised_view_pairs(fashion_shards):
    stream = TrainStream(fashion_shards, small_grayscale_preset(), SMALL)
    assert stream.batches_per_epoch == 600 // 32
    batches = list(stream.epoch(0))
    assert len(batches) == stream.batches_per_epoch
    view1, view2 = batches[0].view1, batches[0].view2
    assert view1.shape == view2.shape == (32, 3, 32, 32) and view1.dtype == torch.float32
    assert not torch.equal(view1, view2)  # two independent augmentations
    assert abs(float(view1.mean())) < 1.0 and 0.3 < float(view1.std()) < 3.0  # normalised, not raw pixels
    assert sum(batch.decode_failures for batch in batches) == 0


def test_multi_crop_adds_small_views_crop_major_with_the_same_recipe(fashion_shards):
    augment = replace(small_grayscale_preset(), small_crops=2, small_size=16, small_scale=(0.2, 0.4))
    batch = next(iter(TrainStream(fashion_shards, augment, SMALL).epoch(0)))
    assert batch.view1.shape == batch.view2.shape == (32, 3, 32, 32)
    assert batch.small is not None and batch.small.shape == (64, 3, 16, 16) and batch.small.dtype == torch.float32
    assert abs(float(batch.small.mean())) < 1.0 and 0.3 < float(batch.small.std()) < 3.0  # normalised alike
    assert not torch.equal(batch.small[:32], batch.small[32:])  # two independent small crops per image
    assert next(iter(TrainStream(fashion_shards, small_grayscale_preset(), SMALL).epoch(0))).small is None


def test_train_batches_are_reproducible_per_seed_and_differ_per_epoch_rank_and_seed(fashion_shards):
    def first(epoch=0, rank=0, seed=0, workers=0):
        config = StreamConfig(batch_size=16, workers=workers, shuffle_buffer=50, seed=seed)
        stream = TrainStream(fashion_shards, small_grayscale_preset(), config, rank=rank, world_size=2)
        return next(iter(stream.epoch(epoch))).view1

    reference = first()
    torch.testing.assert_close(first(), reference, rtol=0, atol=0)
    for other in (first(epoch=1), first(rank=1), first(seed=1)):
        assert not torch.equal(other, reference)
    assert not torch.equal(first(workers=2), first(workers=2, rank=1))


def test_stream_seeds_differ_for_every_rank_and_worker():
    seeds = {stream_seed(0, 0, rank, worker) for rank in range(8) for worker in range(8)}
    assert len(seeds) == 64
    assert stream_seed(3, 1, 2, 0) == stream_seed(3, 1, 2, 0)


def test_every_rank_gets_the_same_batch_count_with_fewer_shards_than_slots(fashion_shards):
    config = StreamConfig(batch_size=16, workers=2, shuffle_buffer=50)
    counts = [
        sum(1 for _ in TrainStream(fashion_shards, small_grayscale_preset(), config, rank=r, world_size=2).epoch(0))
        for r in range(2)
    ]
    assert counts == [600 // (16 * 2)] * 2


def test_an_undecodable_sample_is_skipped_and_counted_not_fatal(tmp_path):
    good = [(f"good{i}", _png(noise_image((28, 28), "L", seed=i)), i % 3) for i in range(20)]
    shard = write_shard(
        tmp_path / "mixed-000000.tar", [*good[:10], ("broken", b"\x89PNG\r\n\x1a\nnot really", 1), *good[10:]]
    )
    stream = TrainStream(
        str(shard),
        small_grayscale_preset(),
        StreamConfig(batch_size=7, workers=0, shuffle_buffer=5),
        samples_per_epoch=200,
    )
    batches = list(stream.epoch(0))
    assert len(batches) == 200 // 7
    assert sum(batch.decode_failures for batch in batches) >= 1


def test_a_shard_of_nothing_but_garbage_fails_with_a_clear_error(tmp_path):
    shard = write_shard(tmp_path / "bad-000000.tar", [(f"k{i}", b"garbage", 0) for i in range(50)])
    stream = TrainStream(
        str(shard), small_grayscale_preset(), StreamConfig(batch_size=4, workers=0), samples_per_epoch=8
    )
    with pytest.raises(RuntimeError, match="failed to decode"):
        list(stream.epoch(0))


def test_bare_urls_need_an_epoch_size(fashion_shards):
    with pytest.raises(ValueError, match="samples per epoch"):
        TrainStream(str(fashion_shards / "shard-000000.tar"), small_grayscale_preset(), SMALL)


def test_colour_preset_crops_images_of_any_size(tmp_path):
    sizes = [(40, 30), (25, 60), (64, 64), (33, 17)]
    samples = [(f"img{i}", _png(noise_image(size, "RGB", seed=i)), 0) for i, size in enumerate(sizes)]
    shard = write_shard(tmp_path / "colour-000000.tar", samples)
    augment = AugmentConfig(output_size=24, blur_kernel=3)
    stream = TrainStream(
        str(shard), augment, StreamConfig(batch_size=4, workers=0, shuffle_buffer=4), samples_per_epoch=8
    )
    batch = next(iter(stream.epoch(0)))
    assert batch.view1.shape == (4, 3, 24, 24)


def test_eval_stream_is_one_stable_pass_with_keys_and_labels(fashion_shards, fashion_mnist_slice):
    config = StreamConfig(batch_size=64, workers=2)
    first = list(EvalStream(fashion_shards, size=28, mode="L", config=config))
    second = list(EvalStream(fashion_shards, size=28, mode="L", config=config))
    keys = [key for batch in first for key in batch.keys]
    assert keys == [key for batch in second for key in batch.keys]  # stable order
    assert sorted(keys) == [f"train_{i:05d}" for i in range(600)]  # every sample exactly once
    truth = load_split(fashion_mnist_slice, "train")
    for batch in first:
        indices = [int(key.split("_")[1]) for key in batch.keys]
        assert batch.labels.tolist() == truth.labels[indices].tolist()
        torch.testing.assert_close(batch.images[:, 0], torch.from_numpy(truth.images[indices]))  # lossless PNG


def test_eval_stream_splits_across_ranks_and_workers_exactly_once(fashion_shards):
    config = StreamConfig(batch_size=50, workers=2)
    per_rank = [
        [
            key
            for batch in EvalStream(fashion_shards, size=32, mode="RGB", config=config, rank=r, world_size=2)
            for key in batch.keys
        ]
        for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"train_{i:05d}" for i in range(600)]


def test_eval_stream_resizes_by_the_serving_policy(fashion_shards):
    batch = next(iter(EvalStream(fashion_shards, size=32, mode="RGB", config=StreamConfig(batch_size=8, workers=0))))
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert torch.equal(batch.images[:, 0], batch.images[:, 1])  # gray replicated to RGB


@pytest.mark.slow
def test_two_gloo_ranks_with_two_workers_each(fashion_shards, tmp_path):
    (tmp_path / "shards").symlink_to(fashion_shards, target_is_directory=True)
    mp.spawn(distributed_workers.streams_per_rank, args=(2, tmp_path / "store", tmp_path), nprocs=2, join=True)
    rank0, rank1 = (torch.load(path) for path in sorted(tmp_path.glob("streams-*.pt")))
    assert {rank0["rank"], rank1["rank"]} == {0, 1}
    assert rank0["batches"] == rank1["batches"] == rank0["batches_per_epoch"] == 600 // (32 * 2)
    assert not torch.equal(rank0["first"], rank1["first"])
    assert not set(rank0["keys"]) & set(rank1["keys"])
    assert sorted(rank0["keys"] + rank1["keys"]) == [f"train_{i:05d}" for i in range(600)]


def test_pipe_urls_stream_like_local_paths(fashion_shards):
    """``pipe:`` URLs (how object stores are read: ``pipe:aws s3 cp s3://... -``) give the same samples."""
    pattern = f"pipe:cat {fashion_shards}/shard-{{000000..000002}}.tar"
    config = StreamConfig(batch_size=100, workers=0)
    local = [key for batch in EvalStream(fashion_shards, size=28, mode="L", config=config) for key in batch.keys]
    piped = [key for batch in EvalStream(pattern, size=28, mode="L", config=config) for key in batch.keys]
    assert piped == local and len(piped) == 600
