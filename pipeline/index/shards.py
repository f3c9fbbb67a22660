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

from artifacts.embedding_set import EmbeddingSet
from artifacts.index_bundle import write_faiss_index

TRAINED_FILE, IVFDATA_FILE = "trained.faiss", "index.ivfdata"


def shard_bounds(count: int, num_shards: int) -> list[tuple[int, int]]:
    """``num_shards`` contiguous [start, stop) id ranges covering ``count`` rows, sizes within one."""
    edges = np.linspace(0, count, num_shards + 1).round().astype(int)
    return [(int(low), int(high)) for low, high in itertools.pairwise(edges)]


def fill_shard(
    trained_path: Path,
    embeddings: EmbeddingSet,
    order: np.ndarray,
    bounds: tuple[int, int],
    chunk_rows: int,
    advance: Callable[[int], None] = lambda rows: None,
) -> faiss.Index:
    """A copy of the trained index holding index ids [start, stop) (embedding rows ``order[start:stop]``)."""
    shard = faiss.read_index(str(trained_path))
    start, stop = bounds
    for first, block in embeddings.ordered(order[start:stop], chunk_rows, start):
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


class ShardedBuild:
    """Shard files filled from one trained index in ``work``; merged on request, removed by `close`.

    The builder merges twice: the corpus shards alone, to tune on queries the
    index does not hold, then every shard, held-out rows included, for the
    bundle. Merging reads the shard files, so both are cheap next to filling.
    """

    def __init__(self, trained: faiss.Index, work: Path, memory_budget: int) -> None:
        self.work, self.memory_budget = work, memory_budget
        self.trained_path = work / TRAINED_FILE
        write_faiss_index(trained, self.trained_path)
        self.shards: list[Path] = []

    def fill(
        self,
        embeddings: EmbeddingSet,
        order: np.ndarray,
        bounds: tuple[int, int],
        chunk_rows: int,
        advance: Callable[[int], None] = lambda rows: None,
    ) -> None:
        path = self.work / f"shard-{len(self.shards):04d}.faiss"
        write_faiss_index(fill_shard(self.trained_path, embeddings, order, bounds, chunk_rows, advance), path)
        self.shards.append(path)

    @property
    def mode(self) -> str:
        """``memory`` when the shards fit the budget, else ``disk``."""
        return "memory" if sum(path.stat().st_size for path in self.shards) <= self.memory_budget else "disk"

    def merge(self, count: int | None = None, ivfdata: str = IVFDATA_FILE) -> faiss.Index:
        """The first ``count`` shards (all by default) merged into one index."""
        shards = self.shards[:count]
        if self.mode == "memory":
            return merge_in_memory(self.trained_path, shards)
        return merge_on_disk(self.trained_path, shards, self.work / ivfdata)

    def close(self) -> None:
        for path in [self.trained_path, *self.shards]:
            path.unlink(missing_ok=True)
