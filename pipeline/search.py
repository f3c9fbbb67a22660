"""Search queries as users write them → vectors, each failing on its own.

A query is one of:

- ``key:KEY`` — a sample of the indexed corpus, searched with its stored vector;
- ``FILE.npy`` — a float array of query vectors, ``[dim]`` or ``[N, dim]``
  (each row is one query, named ``FILE.npy[i]``);
- any other path — an image file, decoded with the shared rules
  (`artifacts.images`), resized by the model's policy and embedded.

A query that cannot become a vector (missing file, not an image, unknown key,
wrong dimension) becomes a `Query` with an ``error`` and the others go on: one
typo in a list of a hundred files costs one line, not the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts.files import read_npy, read_regular_file
from artifacts.images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_image, fit_square, to_mode
from artifacts.index_bundle import Hit, IndexBundle
from artifacts.query_vectors import query_vector_problem

KEY_PREFIX = "key:"


@dataclass(frozen=True)
class Query:
    name: str
    vector: np.ndarray | None = None
    error: str | None = None
    pixels: np.ndarray | None = None  # what the model saw, for an image query (result grids show it)

    @property
    def key(self) -> str | None:
        """The corpus key of a ``key:KEY`` query."""
        return self.name[len(KEY_PREFIX) :] if self.name.startswith(KEY_PREFIX) else None


def image_pixels(path: Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file → uint8 RGB ``[size, size, 3]``, as `mocoplus embed` prepares shard images."""
    image = to_mode(decode_image(read_regular_file(path), max_pixels=max_pixels).image, "RGB")
    return np.asarray(fit_square(image, size), dtype=np.uint8)


QUERY_BATCH = 64  # query specs resolved, embedded and searched together: memory stays flat for any number


def search_queries(
    specs: list[str],
    index: IndexBundle,
    embed: Callable[[np.ndarray], np.ndarray],
    image_size: int,
    k: int,
    batch: int = QUERY_BATCH,
) -> Iterator[tuple[Query, list[Hit] | None]]:
    """Each query with its top-``k`` hits (None for a query with an error), in order, ``batch`` specs at a time.

    Ten thousand image files are not decoded, embedded and searched as one
    batch (2 GB at the peak): memory is that of one batch, whatever the count.
    """
    for start in range(0, len(specs), batch):
        resolved = resolve_queries(specs[start : start + batch], index, embed, image_size)
        good = [query.vector for query in resolved if query.vector is not None]
        hits = iter(index.search(np.stack(good), k) if good else [])
        for query in resolved:
            yield query, (next(hits) if query.vector is not None else None)


def resolve_queries(
    specs: list[str], index: IndexBundle, embed: Callable[[np.ndarray], np.ndarray], image_size: int
) -> list[Query]:
    """Every spec as one or more `Query`s, in order; images are embedded together in one batch."""
    resolved: list[Query | tuple[str, np.ndarray]] = []
    for spec in specs:
        resolved.extend(_resolve_one(spec, index, image_size))
    pixels = [item[1] for item in resolved if isinstance(item, tuple)]
    vectors = iter(embed(np.stack(pixels)) if pixels else [])
    return [Query(item[0], next(vectors), pixels=item[1]) if isinstance(item, tuple) else item for item in resolved]


def _resolve_one(spec: str, index: IndexBundle, image_size: int) -> list[Query | tuple[str, np.ndarray]]:
    """Queries with vectors or errors, and (name, pixels) pairs still to embed."""
    if spec.startswith(KEY_PREFIX):
        try:
            return [Query(spec, index.vector_of(spec[len(KEY_PREFIX) :]))]
        except KeyError as error:
            return [Query(spec, error=str(error.args[0]))]
    path = Path(spec)
    try:
        if path.suffix.lower() == ".npy":
            return _vector_queries(spec, read_npy(path), index.dim)
        return [(spec, image_pixels(path, image_size))]
    except (InvalidImageError, ValueError) as error:  # UnreadableFileError is a ValueError
        return [Query(spec, error=str(error) or type(error).__name__)]


def _vector_queries(spec: str, array: np.ndarray, dim: int) -> list[Query | tuple[str, np.ndarray]]:
    matrix = array.reshape(1, -1) if array.ndim == 1 else array
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        return [Query(spec, error=f"vectors must be [{dim}] or [N, {dim}] for this index; got {list(array.shape)}")]
    queries: list[Query | tuple[str, np.ndarray]] = []
    for row, vector in enumerate(matrix.astype(np.float32)):
        name = spec if array.ndim == 1 else f"{spec}[{row}]"
        problem = query_vector_problem(vector)
        queries.append(Query(name, error=f"vector {problem}") if problem else Query(name, vector))
    return queries
