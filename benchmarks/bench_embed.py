"""Benchmark: does `mocoplus embed` run at the model's speed? End-to-end vs model-only throughput, on CPU.

`pipeline.embed.embed` decodes and resizes in data-loader workers while the
main process feeds ONNX Runtime, so on a machine with spare cores the stage
should cost little more than the model itself. This measures both, side by
side in one process, round-robin per repeat so machine load hits both alike:

1. ``end_to_end``: shard bytes on disk → vectors on disk, the real stage
   (`pipeline.embed.embed`, a fresh output folder per repeat), over the whole
   shard set; it includes loading the bundle and starting the workers, as a
   real run does. After the warm-up the shards sit in the page cache, so this
   is decode-bound, not disk-bound.
2. ``model_only``: `artifacts.model_bundle.ModelBundle.embed` on images decoded once up
   front the way `embed` decodes them (`decode_sample` + `fit_square`), in
   batches of the same size and with the same ONNX Runtime threads: the ceiling.

Both are images/s (per image embedded), the median of ``--repeats`` timed
runs after one warm-up of each (best and every time are in the JSON too). It
prints JSON with the ratio end-to-end / model-only; the target is ≥ 0.85
(the loader hides decoding behind inference). ``--limit`` caps the images
decoded for model-only (for shard sets too big to hold decoded in memory).

    python benchmarks/bench_embed.py --model bundles/fmnist --data shards/fmnist-test
    python benchmarks/bench_embed.py --model bundles/fmnist --data shards/fmnist-test --workers 1 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import emit, environment, time_once  # benchmarks/ is the script's folder, first on sys.path

if TYPE_CHECKING:
    import numpy as np

    from artifacts.model_bundle import ModelBundle

# torch, ONNX Runtime and the pipeline load inside the functions that need them: embed's
# data-loader workers may be spawned, and a spawned worker re-imports this script (as any `__main__`).

TARGET_RATIO = 0.85


def decode_images(shards: str, size: int, limit: int | None) -> np.ndarray:
    """Up to ``limit`` (default: all) images of ``shards``, uint8 RGB ``[N, size, size, 3]``, decoded as embed does."""
    import numpy as np
    import webdataset as wds

    from artifacts.images import DEFAULT_MAX_PIXELS, InvalidImageError, fit_square
    from artifacts.shard_set import resolve_shards
    from pipeline.data.streams import decode_sample

    images: list[np.ndarray] = []
    for url in resolve_shards(shards).urls:
        for sample in wds.DataPipeline(lambda url=url: iter([{"url": url}]), wds.tarfile_to_samples()):
            if limit is not None and len(images) >= limit:
                return np.stack(images)
            try:
                image = fit_square(decode_sample(sample, "RGB", DEFAULT_MAX_PIXELS), size)
            except InvalidImageError:
                continue  # embed skips these too
            images.append(np.asarray(image, dtype=np.uint8))
    if not images:
        raise ValueError(f"{shards}: no decodable images")
    return np.stack(images)


def end_to_end(model: Path, shards: str, config: Any) -> tuple[float, int]:
    """Seconds for one full `embed` run into a fresh temp folder, and the samples it embedded."""
    from pipeline.embed.embed import embed

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as out:
        start = time.perf_counter()
        result = embed(model, shards, Path(out) / "vectors", config, progress=False)
        return time.perf_counter() - start, result.samples


def model_only(bundle: ModelBundle, images: np.ndarray, batch_size: int) -> float:
    """Seconds to embed ``images`` in batches of ``batch_size``, nothing else."""
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        bundle.embed(images[first : first + batch_size])
    return time.perf_counter() - start


def summary(times: list[float], images: int) -> dict[str, Any]:
    return {
        "images": images,
        "images_per_s": images / statistics.median(times),
        "best_images_per_s": images / min(times),
        "seconds": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a bundle from `mocoplus export`")
    parser.add_argument("--data", required=True, help="a shard set from `mocoplus ingest` (embedded whole)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="embed's data-loader workers")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads; 0: its default")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, after one warm-up")
    parser.add_argument("--limit", type=int, default=None, help="cap on the images decoded for model-only")
    args = parser.parse_args(argv)

    from artifacts.model_bundle import ModelBundle
    from artifacts.shard_set import resolve_shards
    from pipeline.embed.config import EmbedConfig

    config = EmbedConfig(batch_size=args.batch_size, workers=args.workers, threads=args.threads)
    shard_count = len(resolve_shards(args.data).urls)
    bundle_load_s = time_once(lambda: ModelBundle(args.model, threads=args.threads))
    bundle = ModelBundle(args.model, threads=args.threads)
    images = decode_images(args.data, bundle.size, args.limit)

    _, samples = end_to_end(args.model, args.data, config)  # warm-up: page cache, ORT kernel selection
    model_only(bundle, images, args.batch_size)
    e2e_times, model_times = [], []
    for _ in range(args.repeats):
        seconds, samples = end_to_end(args.model, args.data, config)
        e2e_times.append(seconds)
        model_times.append(model_only(bundle, images, args.batch_size))

    e2e, model = summary(e2e_times, samples), summary(model_times, len(images))
    ratio = e2e["images_per_s"] / model["images_per_s"]
    source = bundle.info.get("source", {})
    report = {
        "benchmark": "embed",
        "command": "python benchmarks/bench_embed.py " + " ".join(argv or sys.argv[1:]),
        "statistic": f"median of {args.repeats} timed runs after 1 warm-up (best_images_per_s: the fastest)",
        "config": {
            "batch_size": args.batch_size,
            "workers": args.workers,
            "loader_workers_used": min(args.workers, shard_count),  # embed starts at most one per shard
            "threads": args.threads,
            "shards": shard_count,
            "images_end_to_end": samples,
            "images_model_only": len(images),
        },
        "model": {
            "path": str(args.model),
            "dim": bundle.dim,
            "image_size": bundle.size,
            "precision": bundle.info.get("precision"),
            "arch": source.get("arch"),
            "width": source.get("width"),
            "bundle_load_s": bundle_load_s,
        },
        "environment": environment(),
        "end_to_end": e2e,
        "model_only": model,
        "end_to_end_over_model_only": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }
    emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
