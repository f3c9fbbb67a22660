"""Label-free features that a learned encoder has to beat: raw pixels and HOG.

Both take the same uint8 images the encoder is evaluated on (the evaluation
stream's resize and centre crop), so the retrieval suite compares like with
like.

- ``pixels``: every pixel standardised with the memory set's per-pixel mean and
  standard deviation (without it, bright backgrounds dominate cosine
  similarity);
- ``hog``: scikit-image's histogram of oriented gradients, 4×4-pixel cells,
  9 orientations, 2×2-cell blocks, L2-Hys — Dalal and Triggs' descriptor at a
  cell size suited to 28 px images.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PARALLEL_CHUNK = 4096  # images per worker process below which HOG runs in this process


@dataclass(frozen=True)
class HogConfig:
    orientations: int = 9
    pixels_per_cell: int = 4
    cells_per_block: int = 2
    block_norm: str = "L2-Hys"


def _as_hwc(images: Tensor) -> np.ndarray:
    """uint8 ``[N, H, W]`` or ``[N, C, H, W]`` → numpy ``[N, H, W]`` (gray) or ``[N, H, W, C]``."""
    array = images.cpu().numpy()
    if array.ndim == 4:
        array = array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
    return array


def _hog_rows(array: np.ndarray, config: HogConfig) -> np.ndarray:
    """HOG of each image of a numpy batch (runs in worker processes for large sets)."""
    from skimage.feature import hog

    channel_axis = -1 if array.ndim == 4 else None
    rows = [
        hog(
            image,
            orientations=config.orientations,
            pixels_per_cell=(config.pixels_per_cell,) * 2,
            cells_per_block=(config.cells_per_block,) * 2,
            block_norm=config.block_norm,
            channel_axis=channel_axis,
            feature_vector=True,
        )
        for image in array
    ]
    return np.stack(rows).astype(np.float32)


def hog_features(images: Tensor, config: HogConfig = HogConfig(), *, workers: int | None = None) -> Tensor:
    """HOG descriptors ``[N, D]`` (float32) of uint8 images; large sets are split over ``workers`` processes."""
    try:
        import skimage.feature  # noqa: F401  (a dependency; this guards against a broken install)
    except ImportError as error:
        raise ValueError(f"the hog baseline needs scikit-image ({error})") from None
    array = _as_hwc(images)
    workers = min(workers or os.cpu_count() or 1, max(1, len(array) // PARALLEL_CHUNK))
    if workers == 1:
        return torch.from_numpy(_hog_rows(array, config))
    chunks = np.array_split(array, workers * 4)
    # fork: the workers run scikit-image on numpy arrays only (no torch, no OpenMP), and need no re-import
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return torch.from_numpy(np.concatenate(list(pool.map(_hog_rows, chunks, [config] * len(chunks)))))


def raw_pixels(images: Tensor) -> Tensor:
    """Flattened pixels ``[N, H·W·C]`` in [0, 1] (standardise with `standardise`)."""
    return images.reshape(len(images), -1).float() / 255.0


def standardise(bank: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension standardisation with the memory set's statistics, applied to both sets."""
    mean, std = bank.mean(dim=0), bank.std(dim=0).clamp_min(1e-6)
    return (bank - mean) / std, (queries - mean) / std


@dataclass(frozen=True)
class Baseline:
    """``rows``: each image's features on its own (what `pipeline.evaluate.cache` keeps per shard set);
    ``pair``: the memory's and the queries' rows made comparable (statistics of the memory set only)."""

    rows: Callable[[Tensor], Tensor]
    pair: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


_BASELINES: dict[str, Baseline] = {
    # pixels kept as uint8 (exact, a quarter of float32's bytes), scaled and standardised when paired
    "pixels": Baseline(
        lambda images: images.reshape(len(images), -1),
        lambda bank, queries: standardise(raw_pixels(bank), raw_pixels(queries)),
    ),
    "hog": Baseline(hog_features, lambda bank, queries: (bank, queries)),
}
BASELINES = tuple(_BASELINES)


def baseline(name: str) -> Baseline:
    if name not in _BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return _BASELINES[name]


def baseline_features(name: str, bank_images: Tensor, query_images: Tensor) -> tuple[Tensor, Tensor]:
    """Features of a named baseline for the memory and the query images."""
    chosen = baseline(name)
    return chosen.pair(chosen.rows(bank_images), chosen.rows(query_images))
