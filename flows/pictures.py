"""The flows' pictures as Prefect artifacts, and the picture tasks the flows share.

A Prefect image artifact is a URL the UI puts in an ``<img>``; these pictures
live on the worker's disk, which the UI cannot reach, so a picture up to
``INLINE_BYTES`` travels inside its artifact as a ``data:`` URL (no server to
run, nothing to download). A larger one is published as a markdown note with
its path instead.
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact

INLINE_BYTES = 2 << 20


def publish_picture(path: Path, key: str, description: str) -> None:
    """``path`` (a PNG) as the artifact ``key``: inline when small enough, else its path."""
    path = Path(path)
    size = path.stat().st_size
    if size <= INLINE_BYTES:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        create_image_artifact(f"data:image/png;base64,{data}", key=key, description=f"{description} ({path})")
    else:
        note = f"`{path}` ({size / 2**20:.1f} MiB, too large to inline)"
        create_markdown_artifact(note, key=key, description=description)


def picture_failed(what: str, error: Exception) -> None:
    """A picture never fails a flow: the model and the index are the product, the picture shows them."""
    get_run_logger().warning("%s not drawn: %s: %s", what, type(error).__name__, error)


@task
def publish_curves(run_dir: str) -> str | None:
    """The run's ``curves.png`` (drawn by training) as the ``pretrain-curves`` artifact."""
    from artifacts.run_folder import CURVES_FILE
    from pipeline.pictures.curves import draw_curves

    path = Path(run_dir) / CURVES_FILE
    try:
        if not path.is_file():  # a run that finished before training drew its curves: draw them now
            draw_curves([Path(run_dir)], path)
        publish_picture(path, "pretrain-curves", f"pretrain: training curves of {Path(run_dir).name}")
    except Exception as error:
        picture_failed("training curves", error)
        return None
    return str(path)


@task
def draw_corpus_map(embeddings: str, out: str, sample: int, method: str = "umap") -> str | None:
    """A 2-D map of (a sample of) the embedding set, coloured by class, as the ``index-corpus-map`` artifact."""
    from artifacts.embedding_set import EmbeddingSet
    from pipeline.pictures.embedding_map import MapConfig, draw_map, map_embeddings

    try:
        config = MapConfig(method=method, sample=sample)  # type: ignore[arg-type]
        get_run_logger().info("projecting %d vectors of %s with %s", sample, embeddings, method)
        projected = map_embeddings(EmbeddingSet(embeddings), config)
        path = draw_map(projected, Path(out), f"{Path(embeddings).parent.name} ({method})")
        publish_picture(path, "index-corpus-map", f"index-corpus: {method} map of {embeddings}")
    except Exception as error:
        picture_failed("embedding map", error)
        return None
    return str(path)
