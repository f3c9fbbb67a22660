"""The ``end-to-end`` Prefect flow: pretrain → index the corpus → one search as a smoke test.

Orchestration only, composing the `pretrain` and `index-corpus` flows (as
subflows, so each keeps its own run, retries and artifacts) and finishing
with a search for one held-out image: the chain works when its nearest
neighbours come back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.index_corpus import index_corpus
from flows.pretrain import pretrain


@task
def search_smoke(model: str, index: str, query_shards: str, k: int = 5) -> dict[str, Any]:
    """The first held-out image searched through the bundle and the index: its key, label and neighbours."""
    from artifacts.index_bundle import IndexBundle
    from artifacts.model_bundle import ModelBundle
    from pipeline.data.streams import EvalStream, StreamConfig

    bundle, searcher = ModelBundle(Path(model)), IndexBundle(Path(index))
    searcher.check_model(bundle.hash, model)
    stream = EvalStream(query_shards, bundle.size, "RGB", StreamConfig(batch_size=1, workers=0), rank=0, world_size=1)
    query = next(iter(stream))
    pixels = query.images.permute(0, 2, 3, 1).contiguous().numpy()
    hits = searcher.search(bundle.embed(pixels), k)[0]
    label = int(query.labels[0])
    return {"query": query.keys[0], "label": label, "neighbours": [hit.as_dict() for hit in hits]}


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
) -> dict[str, Any]:
    """Everything under ``out``: shards/, run/, model/, corpus/ (embeddings + index)."""
    root = Path(out)
    trained = pretrain(
        source, str(root / "shards" / "train"), str(root / "run"), str(root / "model"),
        eval_source, str(root / "shards" / "test"), config, overrides, nproc, baselines, linear_probe,
    )  # fmt: skip
    indexed = index_corpus(trained["model"], trained["shards"], str(root / "corpus"), shares=shares)
    smoke = search_smoke(trained["model"], indexed["index"], trained["eval_shards"] or trained["shards"])
    return {"pretrain": trained, "index": indexed, "search": smoke}
