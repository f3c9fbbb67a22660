"""An embedding set drawn in 2-D: do the classes separate, and which ones blur into each other?

A seeded random sample of the set (all of it when smaller) is reduced to its
top `PCA_DIMENSIONS` principal directions (the usual first step: it drops
noise and makes the neighbour search of a 2,048-d embedding cheap), projected
with UMAP (umap-learn) or t-SNE (scikit-learn) on cosine distance, then drawn
as a scatter coloured by label with the class names as the legend; an
unlabelled set is drawn in one colour.

A PCA-whitened embedding (its model.json says so) is different: every
direction has the same variance, so a PCA of the vectors picks arbitrary
ones (the demo's map was one round cloud of mixed classes while the same
vectors scored 88 % kNN). Its coordinates already come in principal order
(`mocoplus.whitening`), so the map reduces it to its leading coordinates, the
directions that held the most variance before whitening: on the demo's
vectors the classes then separate (a 10-NN classifier on the 2-D map: 78 %
against 44 % with the PCA, 10 % chance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from artifacts.corpus_images import class_names_of
from artifacts.embedding_set import EmbeddingSet
from artifacts.model_bundle import read_model_json
from pipeline.pictures.figures import new_figure, save_png

PCA_DIMENSIONS = 50
MapMethod = Literal["umap", "tsne"]
MAP_METHODS: tuple[MapMethod, ...] = ("umap", "tsne")


@dataclass(frozen=True)
class MapConfig:
    method: MapMethod = "umap"
    sample: int = 10_000  # points drawn; projection time grows with it (UMAP ~1 min for 10k on 2 cores)
    seed: int = 0
    neighbours: int = 15  # UMAP's n_neighbors; t-SNE's perplexity is twice this
    epochs: int = 200  # UMAP's layout epochs (its own default is 500 below 10,000 points: 2.5× the time)

    def __post_init__(self) -> None:
        if self.method not in MAP_METHODS:
            raise ValueError(f"map method must be one of {', '.join(MAP_METHODS)}; got {self.method!r}")
        if self.sample < 10:
            raise ValueError(f"sample must be at least 10 points; got {self.sample}")
        if self.neighbours < 2 or self.epochs < 1:
            raise ValueError(f"need neighbours >= 2 and epochs >= 1; got {self.neighbours} and {self.epochs}")


@dataclass(frozen=True)
class EmbeddingMap:
    """The projected points, their labels (−1: none) and the class names, and how many the set held."""

    points: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] | None
    total: int


def project(vectors: np.ndarray, config: MapConfig, *, whitened: bool = False) -> np.ndarray:
    """``vectors`` ``[N, D]`` → ``[N, 2]`` by ``config.method`` (deterministic for a seed); ``whitened``: the
    vectors are PCA-whitened in principal order (their leading coordinates are kept, no PCA)."""
    neighbours = min(config.neighbours, len(vectors) - 1)
    if whitened:
        vectors = np.asarray(vectors[:, :PCA_DIMENSIONS], dtype=np.float32)
    else:
        vectors = principal_components(vectors, PCA_DIMENSIONS)
    if config.method == "umap":
        import warnings

        with warnings.catch_warnings():  # "n_jobs overridden by random_state": the price of a seeded map
            warnings.simplefilter("ignore", UserWarning)
            from umap import UMAP

            reducer = UMAP(
                n_neighbors=neighbours, metric="cosine", n_epochs=config.epochs, random_state=config.seed, n_jobs=1
            )
            return np.asarray(reducer.fit_transform(vectors), dtype=np.float32)
    from sklearn.manifold import TSNE

    perplexity = float(min(2 * config.neighbours, (len(vectors) - 1) / 3))
    tsne = TSNE(perplexity=perplexity, metric="cosine", init="pca", random_state=config.seed)
    return np.asarray(tsne.fit_transform(vectors), dtype=np.float32)


def principal_components(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """``vectors`` centred and projected on their top ``dimensions`` principal directions (as they are when
    no wider)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape[1] <= dimensions:
        return vectors.astype(np.float32)
    centred = vectors - vectors.mean(axis=0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    return (centred @ directions[:dimensions].T).astype(np.float32)


def map_embeddings(embeddings: EmbeddingSet, config: MapConfig) -> EmbeddingMap:
    """Sample the live rows of ``embeddings`` and project the sample to 2-D."""
    live = embeddings.live_rows()  # samples removed by a later ingest --update are not drawn
    if len(live) < 3:
        raise ValueError(f"{embeddings.path} holds {len(live)} vectors; a map needs at least 3")
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(live, size=min(config.sample, len(live)), replace=False))
    _keys, labels = embeddings.keys_and_labels()
    points = project(embeddings.rows(rows), config, whitened=is_whitened(embeddings))
    return EmbeddingMap(points, labels[rows], class_names_of(embeddings), len(live))


def is_whitened(embeddings: EmbeddingSet) -> bool:
    """Whether the set's model PCA-whitens its output (its model.json; False when it cannot be read)."""
    try:
        return bool(read_model_json(Path(embeddings.manifest.get("model", ""))).get("whitening"))
    except ValueError:
        return False


def draw_map(embedding_map: EmbeddingMap, path: Path, title: str) -> Path:
    """Scatter the map's points coloured by class (legend: class names) to the PNG ``path``."""
    figure = new_figure(9, 7.5)
    axis = figure.subplots()
    size = max(1.0, min(12.0, 20_000 / len(embedding_map.points)))
    labelled = embedding_map.labels >= 0
    if not labelled.any():
        axis.scatter(*embedding_map.points.T, s=size, color="C0", alpha=0.6, linewidths=0)
    else:
        classes = np.unique(embedding_map.labels[labelled])
        colours = _colours(len(classes))
        for colour, label in zip(colours, classes, strict=True):
            mine = embedding_map.labels == label
            axis.scatter(*embedding_map.points[mine].T, s=size, color=colour, alpha=0.7, linewidths=0,
                         label=_class_name(embedding_map.class_names, int(label)))  # fmt: skip
        if (~labelled).any():
            axis.scatter(*embedding_map.points[~labelled].T, s=size, color="0.6", alpha=0.5, linewidths=0,
                         label="(no label)")  # fmt: skip
        axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=max(1.0, 6 / size**0.5), frameon=False)
    sample = len(embedding_map.points)
    axis.set_title(f"{title}: {sample:,} of {embedding_map.total:,} vectors", fontsize=11)
    axis.set_xticks([])
    axis.set_yticks([])
    return save_png(figure, path)


def _class_name(names: tuple[str, ...] | None, label: int) -> str:
    return names[label] if names is not None and label < len(names) else f"class {label}"


def _colours(count: int) -> list:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(count)]
