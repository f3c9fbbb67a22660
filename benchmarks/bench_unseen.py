"""Unseen gray images of another kind: does the served embedding retrieve them better than their raw pixels?

A model trained on Fashion-MNIST is served on whatever small gray images a
user has. This check takes a set it never saw and that nobody tunes on:
scikit-learn's handwritten digits (1,797 images of 8×8 px in 17 gray levels,
10 classes, shipped inside scikit-learn, so nothing is downloaded), enlarged to
the run's input size. Everything goes the way a user's images would:

1. ``mocoplus export`` of the run (the served embedding: key encoder, the run's
   grid, PCA whitening fitted on the run's Fashion-MNIST training images, its
   kept dimensions) — or a bundle given with ``--bundle``;
2. the digits written as PNG files in class folders, even-numbered images the
   memory and odd-numbered ones the queries, each folder through ``mocoplus ingest``;
3. ``mocoplus embed`` of both with the bundle;
4. ``mocoplus evaluate --memory … --queries … --baselines pixels,hog``: the
   retrieval suite of the served vectors beside raw pixels and HOG (as they
   are and whitened on the memory set), one protocol for all.

Prints JSON with every score and whether the served embedding's 1-NN is at
least that of the raw pixels (the goal of issue 29).

    python benchmarks/bench_unseen.py runs/fmnist                    # export, then the check
    python benchmarks/bench_unseen.py --bundle models/fmnist         # an exported bundle
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import emit, log, report  # benchmarks/ is the script's folder, first on sys.path
from PIL import Image
from torch.nn import functional as F

from artifacts.model_bundle import InputContract, read_model_json
from pipeline.data.ingest import ingest
from pipeline.embed.embed import embed
from pipeline.evaluate.embedded import evaluate_embeddings
from pipeline.export.export import export

DIGITS_LEVELS = 16  # scikit-learn's digits count ink in 0..16 per 4×4 block of the original 32×32 bitmaps


def digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 ``[N, size, size]`` (ink bright, as Fashion-MNIST's garments are) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().unsqueeze(1) * (255 / DIGITS_LEVELS)
    enlarged = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return enlarged.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy(), digits.target


def write_class_folders(images: np.ndarray, labels: np.ndarray, root: Path) -> tuple[Path, Path]:
    """Even-numbered images under ``root/memory/<digit>/``, odd-numbered under ``root/queries/<digit>/``."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("memory" if index % 2 == 0 else "queries") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return root / "memory", root / "queries"


def bundle_input_size(bundle: Path) -> int:
    """The bundle's input side, from its contract (the digits are enlarged to it, as ingest would not)."""
    return InputContract.from_model_json(read_model_json(bundle)).height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", type=Path, help="a training run folder (exported first)")
    parser.add_argument("--bundle", type=Path, help="an exported model bundle instead of a run")
    parser.add_argument("--out", type=Path, default=None, help="keep bundle, shards and sets here (default: temp)")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.bundle is None):
        parser.error("give one of a run folder or --bundle")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unseen-") as temp:
        work = args.out or Path(temp)
        bundle = args.bundle
        if bundle is None:
            log("unseen", f"exporting {args.run}")
            bundle = export(args.run, work / "bundle", progress=False).bundle
        images, labels = digit_images(bundle_input_size(bundle))
        memory_dir, queries_dir = write_class_folders(images, labels, work / "digits")
        sets = {}
        for role, folder in (("memory", memory_dir), ("queries", queries_dir)):
            ingest(str(folder), work / "shards" / role, progress=False)
            embed(bundle, str(work / "shards" / role), work / "embeddings" / role, progress=False)
            sets[role] = work / "embeddings" / role
        scores = evaluate_embeddings(
            sets["memory"], sets["queries"], baselines=("pixels", "hog"), cache=work / "cache", progress=False
        )
    rows = dict(scores.rows())
    model = scores.model.scores.as_dict()
    pixels = scores.baselines["pixels"].as_dict()
    result = {
        "command": "python benchmarks/bench_unseen.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "set": f"scikit-learn digits, 8 px enlarged to {images.shape[-1]} px: {scores.memory_samples} memory, "
        f"{scores.query_samples} queries",
        "scores": rows,
        "served_nn1_minus_pixels_nn1": model["nn1"] - pixels["nn1"],
        "goal_served_nn1_at_least_pixels": model["nn1"] >= pixels["nn1"],
    }
    emit(report("unseen", result, started=started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
