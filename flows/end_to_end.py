"""The ``end-to-end`` Prefect flow: pretrain → index the corpus → one search as a smoke test.

Orchestration only, composing the `pretrain` and `index-corpus` flows (as
subflows, so each keeps its own run, retries and artifacts) and finishing
with a search for one held-out image: the chain works when its nearest
neighbours come back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task

from flows.index_corpus import index_corpus
from flows.pictures import picture_failed, publish_picture
from flows.pretrain import pretrain

if TYPE_CHECKING:
    from artifacts.index_bundle import Hit, IndexBundle
    from pipeline.search import Query

GRID_QUERIES = 8  # the result grid's rows: one held-out image per class, the first classes found


@task
def search_smoke(model: str, index: str, query_shards: str, k: int = 5, grid: str | None = None) -> dict[str, Any]:
    """Held-out images searched through the bundle and the index: the first one's key, label and neighbours.

    With ``grid``, one query of each class among the first held-out images (up to `GRID_QUERIES`) is drawn
    with its ``k`` neighbours to that PNG and published as the ``end-to-end-search`` artifact.
    """
    from artifacts.index_bundle import IndexBundle
    from artifacts.model_bundle import ModelBundle
    from pipeline.data.streams import EvalStream, StreamConfig
    from pipeline.search import Query

    bundle, searcher = ModelBundle(Path(model)), IndexBundle(Path(index))
    searcher.check_model(bundle.hash, model)
    stream = EvalStream(query_shards, bundle.size, "RGB", StreamConfig(batch_size=64, workers=0), rank=0, world_size=1)
    batch = next(iter(stream))
    pixels = batch.images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = [int(label) for label in batch.labels]
    first_of_class = [row for row, label in enumerate(labels) if label not in labels[:row]]
    chosen = first_of_class[:GRID_QUERIES] if grid else [0]
    vectors = bundle.embed(pixels[chosen])
    results = searcher.search(vectors, k)
    smoke = {"query": batch.keys[0], "label": labels[0], "neighbours": [hit.as_dict() for hit in results[0]]}
    if grid:
        queries = [Query(batch.keys[row], vectors[position], pixels=pixels[row]) for position, row in enumerate(chosen)]
        smoke["grid"] = draw_search_grid(queries, results, searcher, Path(grid))
    return smoke


def draw_search_grid(queries: list[Query], results: list[list[Hit]], index: IndexBundle, path: Path) -> str | None:
    """The queries and their neighbours as a picture and an artifact; a picture never fails the flow."""
    from pipeline.pictures.grid import draw_search_results

    try:
        draw_search_results(queries, results, index, path, f"held-out queries and their {len(results[0])} neighbours")
        publish_picture(path, "end-to-end-search", "end-to-end: held-out queries and their neighbours")
    except Exception as error:
        picture_failed("search grid", error)
        return None
    return str(path)


@flow(name="end-to-end", log_prints=True)
def end_to_end(
    out: str,
    source: str = "fashion-mnist:train",
    eval_source: str = "fashion-mnist:test",
    config: str = "fashion-mnist-cpu",
    overrides: list[str] | None = None,
    nproc: int = 1,
    shares: int = 2,
    baselines: list[str] | None = None,
    linear_probe: bool = True,
    map_sample: int = 5000,
    monitor: bool = True,
    gate: bool = True,
) -> dict[str, Any]:
    """Everything under ``out``: shards/, run/ (with curves.png), model/ (its versions and ``current``),
    cache/ (the evaluation's vectors and baseline features), corpus/ (index, map.png), search-grid.png.

    The corpus is the training set, so the index takes the vectors the quality gate embedded."""
    root = Path(out)
    trained = pretrain(
        source, str(root / "shards" / "train"), str(root / "run"), str(root / "model"),
        eval_source, str(root / "shards" / "test"), config, overrides, nproc, baselines, linear_probe,
        monitor, cache=str(root / "cache"), shares=shares, gate=gate,
    )  # fmt: skip
    indexed = index_corpus(
        trained["model"], trained["shards"], str(root / "corpus"), shares=shares, map_sample=map_sample,
        embeddings=trained.get("embeddings", {}).get("memory"),
    )  # fmt: skip
    queries = trained["eval_shards"] or trained["shards"]
    started = time.perf_counter()
    smoke = search_smoke(trained["model"], indexed["index"], queries, k=8, grid=str(root / "search-grid.png"))
    smoke["seconds"] = round(time.perf_counter() - started, 1)
    return {"pretrain": trained, "index": indexed, "search": smoke}
