"""Search results as a picture: one row per query, the query image first, then its neighbours.

Each neighbour shows its key, label name and score underneath, so a reader can
tell at a glance whether the neighbours look alike and where they go wrong. A
query given as vectors has no picture: its first cell says so. A grid holds at
most `MAX_ROWS` queries and `MAX_NEIGHBOURS` neighbours each (a figure of a
thousand cells helps no one and can exhaust memory); images are shrunk to
`TILE_SIDE` pixels before they are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts.corpus_images import CorpusImages
from artifacts.images import decode_image, limit_side
from artifacts.index_bundle import Hit, IndexBundle
from pipeline.pictures.figures import new_figure, save_png
from pipeline.search import Query

CELL_INCHES = 1.35  # a 28 px Fashion-MNIST image stays crisp, a caption of three short lines fits under it
MAX_KEY_CHARACTERS = 16
MAX_ROWS, MAX_NEIGHBOURS = 32, 20
TILE_SIDE = 256


@dataclass(frozen=True)
class Tile:
    """One cell: an image (uint8 ``[H, W]`` or ``[H, W, 3]``; None for a query given as a vector) and its caption."""

    image: np.ndarray | None
    caption: str


@dataclass(frozen=True)
class GridRow:
    query: Tile
    neighbours: list[Tile]


def draw_search_results(
    queries: list[Query], results: list[list[Hit]], index: IndexBundle, path: Path, title: str
) -> Path:
    """The answered ``queries`` and their ``results`` (same order) from ``index`` as the PNG ``path``."""
    rows = result_rows(queries[:MAX_ROWS], [hits[:MAX_NEIGHBOURS] for hits in results[:MAX_ROWS]],
                       CorpusImages.of_index(index))  # fmt: skip
    return draw_result_grid(rows, path, title)


def result_rows(queries: list[Query], results: list[list[Hit]], images: CorpusImages) -> list[GridRow]:
    """One row per answered query (``results`` in the same order): its picture, then its neighbours'."""
    rows = []
    for query, hits in zip(queries, results, strict=True):
        picture = _corpus_pixels(images, query.key) if query.key is not None else query.pixels
        name = query.name if query.key is not None else Path(query.name).name  # a file by its name, a key whole
        rows.append(GridRow(Tile(picture, f"query\n{_short(name)}"), [corpus_tile(images, hit) for hit in hits]))
    return rows


def corpus_tile(images: CorpusImages, hit: Hit) -> Tile:
    """A neighbour's cell: its stored image, key, label name and score."""
    pixels = _corpus_pixels(images, hit.key)
    label = images.label_name(hit.label)
    caption = "\n".join(part for part in (_short(hit.key), label, f"{hit.score:.3f}") if part)
    return Tile(pixels, caption)


def draw_result_grid(rows: list[GridRow], path: Path, title: str = "") -> Path:
    """Draw ``rows`` (each: the query, then its neighbours) to the PNG ``path``."""
    if not rows:
        raise ValueError("no search results to draw")
    columns = 1 + max(len(row.neighbours) for row in rows)
    figure = new_figure(CELL_INCHES * columns, CELL_INCHES * 1.25 * len(rows) + (0.4 if title else 0))
    if title:
        figure.suptitle(title)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row_axes, row in zip(axes, rows, strict=True):
        _draw_tile(row_axes[0], row.query, query=True)
        for column, cell in enumerate(row_axes[1:]):
            if column < len(row.neighbours):
                _draw_tile(cell, row.neighbours[column], query=False)
            else:
                cell.set_axis_off()
    return save_png(figure, path)


def _draw_tile(axis, tile: Tile, *, query: bool) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    if tile.image is None:
        axis.text(0.5, 0.5, "(vector)", ha="center", va="center", fontsize=8, transform=axis.transAxes)
    elif tile.image.ndim == 2:
        axis.imshow(tile.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        axis.imshow(tile.image, interpolation="nearest")
    axis.set_xlabel(tile.caption, fontsize=7, fontweight="bold" if query else "normal")
    for spine in axis.spines.values():
        spine.set_edgecolor("tab:blue" if query else "0.7")
        spine.set_linewidth(2 if query else 0.5)


def _corpus_pixels(images: CorpusImages, key: str) -> np.ndarray:
    return np.asarray(limit_side(decode_image(images.read(key)).image, TILE_SIDE))


def _short(text: str) -> str:
    return text if len(text) <= MAX_KEY_CHARACTERS else text[: MAX_KEY_CHARACTERS - 1] + "…"
