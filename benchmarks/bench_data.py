"""Benchmark: does the data side keep up? Ingest speed, stream speed, and what training consumes.

On Fashion-MNIST, in one run, it measures:

1. ingest of ``fashion-mnist:train`` (60,000 images) and of a generated folder
   of photo-sized JPEGs (``--photos``, 640×480, stored as JPEG at most 256 px)
   with 1 and with all worker processes (images/s; the ratio shows the cores
   are used);
2. the training stream alone (decode + two augmented views, ``--workers``
   loader workers, batches of 256, the ``fashion-mnist-cpu`` preset's augmentation): images/s;
3. a CPU training step alone on ready-made views (the preset's model, optimiser
   and precision): images/s;
4. training fed live by the stream, both on the same cores.

and prints JSON with the ratio stream / training (target: ≥ 3, the model never
waits on data) and live / alone (how much the loader costs the trainer on a
small machine, where loader workers and training share the cores).

    python benchmarks/bench_data.py            # about 2 minutes on 2 cores
    python benchmarks/bench_data.py --batches 20 --train-steps 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from harness import emit, environment  # benchmarks/ is the script's folder, first on sys.path
from PIL import Image

from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest

PRESET = "fashion-mnist-cpu"

if TYPE_CHECKING:
    pass

# torch and the model load inside the functions that need them: ingest's worker processes are
# spawned, and a spawned worker re-imports this script (as any `__main__`) before it starts working.


def write_photos(folder: Path, count: int) -> Path:
    """``count`` 640×480 JPEGs in 4 class folders: smooth gradients plus noise, a photo's cost to decode."""
    generator = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None] * np.ones((480, 1, 3), np.float32)
    for index in range(count):
        pixels = np.clip(ramp * generator.uniform(0.3, 1.0, 3) + generator.normal(0, 12, (480, 640, 3)), 0, 255)
        path = folder / f"class{index % 4}" / f"photo{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return folder


def measure_ingest(source: str, out: Path, workers: int, **options: object) -> dict[str, float]:
    result = ingest(source, out, IngestConfig(workers=workers, **options), progress=False)  # type: ignore[arg-type]
    return {
        "workers": workers,
        "images": result.manifest.written,
        "seconds": result.elapsed_s,
        "images_per_s": result.images_per_s,
    }


def measure_stream(shards: Path, workers: int, batches: int, batch_size: int) -> float:
    """Images/s of two-view batches, after the first two batches (worker start-up) are out."""
    from pipeline.data.streams import StreamConfig, TrainStream

    stream = TrainStream(shards, _preset().augmentation, StreamConfig(batch_size=batch_size, workers=workers))
    iterator = iter(stream.epoch(0))
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def _preset():
    """The `fashion-mnist-cpu` preset: the demo's model and augmentation."""
    from pipeline.train.run_config import load_config

    return load_config(PRESET, [])


def preset_step():
    """The preset's model, optimiser and precision as the shared training step (views placed in its layout)."""
    from mocoplus import MoCoPlus
    from pipeline.precision import resolve_precision
    from pipeline.train.optim import build_optimizer
    from pipeline.train.step import TrainingStep

    config = _preset()
    precision = resolve_precision(config.train.precision)
    model = MoCoPlus(config.model).to(memory_format=precision.memory_format()).train()
    return TrainingStep(model, build_optimizer(model.query_encoder, config), precision)


def measure_training(shards: Path, steps: int, batch_size: int, workers: int) -> tuple[float, float, str]:
    """Training images/s on one fixed batch, and fed live by the stream; both after a warm-up step."""
    from pipeline.data.streams import StreamConfig, TrainStream

    step = preset_step()
    stream = TrainStream(shards, _preset().augmentation, StreamConfig(batch_size=batch_size, workers=workers))
    batches = iter(stream.epoch(0))
    first = next(batches)
    step(first.view1, first.view2)  # warm-up: oneDNN picks kernels on the first call
    start = time.perf_counter()
    for _ in range(steps):
        step(first.view1, first.view2)
    alone = steps * batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        step(batch.view1, batch.view2)
    live = steps * batch_size / (time.perf_counter() - start)
    return alone, live, step.precision.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the stream")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40, help="stream batches timed")
    parser.add_argument("--train-steps", type=int, default=8, help="training steps timed (alone and live)")
    parser.add_argument("--photos", type=int, default=800, help="generated 640×480 JPEGs for the folder ingest")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-data-") as temp:
        worker_counts = sorted({1, cores})
        fashion = [measure_ingest("fashion-mnist:train", Path(temp) / f"shards-{w}", w) for w in worker_counts]
        photos_dir = str(write_photos(Path(temp) / "photos", args.photos))
        photo_options = {"image_format": "jpg", "max_side": 256}
        photos = [measure_ingest(photos_dir, Path(temp) / f"p-{w}", w, **photo_options) for w in worker_counts]
        shards = Path(temp) / f"shards-{cores}"
        stream = measure_stream(shards, args.workers, args.batches, args.batch_size)
        alone, live, precision = measure_training(shards, args.train_steps, args.batch_size, args.workers)
    report = {
        "benchmark": "data",
        "environment": environment(),
        "ingest_fashion_mnist_train": fashion,
        "ingest_fashion_mnist_speedup_all_cores": fashion[-1]["images_per_s"] / fashion[0]["images_per_s"],
        "ingest_photo_folder": photos,
        "ingest_photo_speedup_all_cores": photos[-1]["images_per_s"] / photos[0]["images_per_s"],
        "stream": {"workers": args.workers, "batch_size": args.batch_size, "images_per_s": stream},
        "training": {"precision": precision, "alone_images_per_s": alone, "fed_by_stream_images_per_s": live},
        "stream_over_training": stream / alone,
        "live_over_alone": live / alone,
        "target_stream_over_training": 3.0,
    }
    emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
