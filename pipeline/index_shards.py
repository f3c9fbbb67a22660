"""Sharded IVF builds: one trained index, shards filled independently, then merged.

For corpora beyond one machine, FAISS's recipe (its ``demo_ondisk_ivf``): train
the coarse quantizer (and OPQ/PQ) once, give every shard a copy of that empty
trained index, fill each shard with its own rows — on its own machine if need
be, since a shard needs only the trained index and its rows — and merge the
inverted lists. The merged index is the same index one build would make: the
same centroids, every vector in the list it would have joined, with its
global row id. Shards here are contiguous id ranges, so the merged lists even
keep one build's order.

The merge runs in memory when the index fits the memory budget, and into an
on-disk ``index.ivfdata`` (memory-mapped at search time) when it does not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from serving.embedding_set import EmbeddingSet

TRAINED_FILE, IVFDATA_FILE = "trained.faiss", "index.ivfdata"


def shard_bounds(count: int, num_shards: int) -> list[tuple[int, int]]:
    """``num_shards`` contiguous [start, stop) id ranges covering ``count`` rows, sizes within one."""
    edges = np.linspace(0, count, num_shards + 1).round().astype(int)
    return [(int(low), int(high)) for low, high in itertools.pairwise(edges)]


def fill_shard(
    trained_path: Path,
    embeddings: EmbeddingSet,
    bounds: tuple[int, int],
    chunk_rows: int,
    advance: Callable[[int], None] = lambda rows: None,
) -> faiss.Index:
    """A copy of the trained index holding rows [start, stop) under their global ids."""
    shard = faiss.read_index(str(trained_path))
    for first, block in embeddings.chunks(chunk_rows, *bounds):
        shard.add_with_ids(block, np.arange(first, first + len(block), dtype=np.int64))
        advance(len(block))
    return shard


def merge_in_memory(trained_path: Path, shard_paths: list[Path]) -> faiss.Index:
    merged = faiss.read_index(str(trained_path))
    target = faiss.extract_index_ivf(merged)
    for path in shard_paths:
        shard = faiss.read_index(str(path))  # held: the extracted IVF part does not own its memory
        target.merge_from(faiss.extract_index_ivf(shard), 0)
    merged.ntotal = target.ntotal  # an OPQ wrapper keeps its own count
    return merged


def merge_on_disk(trained_path: Path, shard_paths: list[Path], ivfdata: Path) -> faiss.Index:
    from faiss.contrib.ondisk import merge_ondisk

    merged = faiss.read_index(str(trained_path))
    merge_ondisk(merged, [str(path) for path in shard_paths], str(ivfdata))
    merged.ntotal = faiss.extract_index_ivf(merged).ntotal
    return merged


def build_sharded(
    trained: faiss.Index,
    embeddings: EmbeddingSet,
    num_shards: int,
    work: Path,
    chunk_rows: int,
    memory_budget: int,
    advance: Callable[[int], None] = lambda rows: None,
) -> tuple[faiss.Index, str]:
    """Fill ``num_shards`` shards of ``trained`` in ``work``, merge them; the index and ``"memory"|"disk"``."""
    trained = faiss.index_gpu_to_cpu(trained) if hasattr(faiss, "index_gpu_to_cpu") else trained
    trained_path = work / TRAINED_FILE
    faiss.write_index(trained, str(trained_path))
    shard_paths = []
    for number, bounds in enumerate(shard_bounds(embeddings.count, num_shards)):
        path = work / f"shard-{number:04d}.faiss"
        faiss.write_index(fill_shard(trained_path, embeddings, bounds, chunk_rows, advance), str(path))
        shard_paths.append(path)
    estimated = sum(path.stat().st_size for path in shard_paths)
    if estimated <= memory_budget:
        merged, mode = merge_in_memory(trained_path, shard_paths), "memory"
    else:
        merged, mode = merge_on_disk(trained_path, shard_paths, work / IVFDATA_FILE), "disk"
    for path in [trained_path, *shard_paths]:
        path.unlink()
    return merged, mode
