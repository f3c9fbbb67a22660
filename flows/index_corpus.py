"""The ``index-corpus`` Prefect flow: embed a shard set in parallel shares, index it, check recall.

Orchestration only: the stages are `pipeline.embed.embed` and
`pipeline.index.build.build_index`. Embedding is mapped over ``shares`` Prefect
tasks, share i taking input shards i, i + n, ... (the same split as
``mocoplus embed --shard-index i --num-shards n``), so with a distributed task
runner each share runs on its own worker; the default is a thread pool.
`with_dask` runs the same flow on a Dask cluster (prefect-dask): an existing
one by address, or a local one of n worker processes — the scale-out path.
With ``index_shards`` > 1 the index is built as tasks too
(`pipeline.index.shards`): one task trains the quantizer and stages the build,
``index_shards`` + 1 tasks fill its parts on the same task runner (thread
pool, or Dask workers), and the last merges, tunes and writes the bundle.
Tasks pass paths, not arrays, retry with back-off, and skip what is done:
embedding resumes part by part, a staged index keeps its trained quantizer and
finished parts, and an index whose ``index.json`` names the current embedding
manifest is kept. With ``update``, the index gets its next
version (`pipeline.index.update`) instead of being built anew. A markdown
artifact reports the result, an image artifact shows a 2-D map of the
embeddings (``map_sample`` of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact

from flows.pictures import draw_corpus_map
from flows.timing import StageClock

EMBEDDINGS, INDEX, MAP = "embeddings", "index", "map.png"


@task(retries=2, retry_delay_seconds=[2, 10], task_run_name="embed share {share} of {shares}")
def embed_share(model: str, data: str, out: str, share: int, shares: int, batch_size: int = 256) -> dict[str, Any]:
    """One share of the input shards through the model; finished parts are skipped (resume)."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.embed import embed

    # workers=0: no forked loader processes from a task thread; the shares themselves run in parallel
    config = EmbedConfig(batch_size=batch_size, workers=0, shard_index=share, num_shards=shares)
    result = embed(Path(model), data, Path(out), config)
    get_run_logger().info(
        "share %d/%d: %d parts written (%d samples), %d already done",
        share, shares, result.parts_written, result.samples, result.parts_skipped,
    )  # fmt: skip
    return {"parts_written": result.parts_written, "parts_skipped": result.parts_skipped, "samples": result.samples}


@task(retries=1, retry_delay_seconds=5)
def stage_index(embeddings: str, out: str, kind: str, target_recall: float, shards: int) -> dict[str, Any] | None:
    """Plan the sharded index, train its quantizer once and stage the build; None when ``out`` is up to date."""
    from pipeline.index.build import stage_index_build
    from pipeline.index.config import IndexConfig

    config = IndexConfig(kind=kind, target_recall=target_recall, num_shards=shards)
    staged = stage_index_build(Path(embeddings), Path(out), config)
    # absolute: a Dask worker on another machine runs from another folder
    return None if staged is None else {"staging": str(staged.folder.resolve()), "parts": staged.parts}


@task(retries=2, retry_delay_seconds=[2, 10], task_run_name="index part {part}")
def fill_index_part(staging: str, part: int) -> dict[str, Any]:
    """Fill one part of a staged index on whichever worker runs it (skipped when a rerun finds it done)."""
    from pipeline.index.shards import fill_part

    record = fill_part(staging, part)
    get_run_logger().info("index part %d: %s by %s", part, "kept" if record["reused"] else "filled", record["writer"])
    return record


@task(retries=1, retry_delay_seconds=5)
def index_embeddings(
    embeddings: str, out: str, kind: str, target_recall: float, update: bool = False, keep: int = 3, shards: int = 1
) -> dict[str, Any]:
    """Build the index, or with ``update`` its next version (up to date when ``out`` already indexes exactly
    this embedding set with these options). A staged sharded build is finished: merged, tuned, written."""
    from pipeline.index.build import build_index
    from pipeline.index.config import IndexConfig
    from pipeline.index.update import update_index

    config = IndexConfig(kind=kind, target_recall=target_recall, num_shards=shards)
    if update:
        changes = {"kind": kind, "target_recall": target_recall, "num_shards": shards}
        result = update_index(Path(embeddings), Path(out), changes, keep=keep)
    else:
        result = build_index(Path(embeddings), Path(out), config)
    if result.up_to_date:
        get_run_logger().info("%s already indexes these embeddings: up to date", out)
    return {**result.info, "reused": result.up_to_date}


@task
def check_recall(info: dict[str, Any]) -> dict[str, Any]:
    """Fail the flow when the index cannot reach its target; publish the numbers either way."""
    report = info["recall_at_k"]
    params = ", ".join(f"{name}={value}" for name, value in info["search"]["params"].items()) or "exact"
    rows = [
        ("index", f"`{info['factory']}` ({params})"),
        ("vectors", f"{info['count']:,}"),
        (f"recall@{report['k']}", _recall_text(report)),
        ("queries/s", f"{report.get('qps', 0):,.0f} (exact {report.get('exact_qps') or 0:,.0f})"),
        ("build", f"{info['build']['total_seconds']:.1f} s" + (" (reused)" if info.get("reused") else "")),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
    create_markdown_artifact(table, key="index-corpus", description="index-corpus: recall and speed")
    if report.get("target_met") is False:
        raise ValueError(f"recall@{report['k']} {report['recall']:.3f} is below the target {report['target']}")
    return {
        "recall": report["recall"],
        "qps": report.get("qps"),
        "factory": info["factory"],
        "count": info["count"],
        "version": info.get("index_version"),
        "update": None if info.get("reused") else info.get("update"),
        "retrained": info.get("trained", {}).get("reason"),
        "build_seconds": info["build"]["total_seconds"],  # the last full build's (an update keeps its record)
        "reused": bool(info.get("reused")),
    }


def _recall_text(report: dict[str, Any]) -> str:
    if report.get("recall") is None:
        return "not measured (too few vectors to hold any out)"
    return f"{report['recall']:.3f} (target {report.get('target')})"


@flow(name="index-corpus", log_prints=True)
def index_corpus(
    model: str,
    data: str,
    out: str,
    shares: int = 2,
    kind: str = "auto",
    target_recall: float = 0.95,
    map_sample: int = 5000,
    map_method: str = "umap",
    update: bool = False,
    keep: int = 3,
    embeddings: str | None = None,
    index_shards: int = 1,
) -> dict[str, Any]:
    """Embed ``data`` with ``model`` in ``shares`` parallel tasks into ``out/embeddings``, index into ``out/index``.

    ``map_sample`` vectors are drawn as ``out/map.png`` (0: no map). ``update``: the index's next version
    (``keep`` versions kept) instead of a new build. ``embeddings``: another folder for the vectors (the
    ``end-to-end`` flow gives the one its quality gate embedded: nothing is embedded twice).
    ``index_shards`` > 1: an IVF index built in that many parts, filled as parallel tasks.
    """
    embeddings, index = embeddings or str(Path(out) / EMBEDDINGS), str(Path(out) / INDEX)
    clock = StageClock()
    with clock.stage("embed"):
        shares_done = embed_share.map(
            unmapped(model), unmapped(data), unmapped(embeddings), range(shares), unmapped(shares)
        )
        samples = sum(result["samples"] for result in shares_done.result())
    with clock.stage("index"):
        if index_shards > 1 and not update:
            staged = stage_index(embeddings, index, kind, target_recall, index_shards)
            if staged is not None:
                fill_index_part.map(unmapped(staged["staging"]), range(staged["parts"])).result()
        info = index_embeddings(embeddings, index, kind, target_recall, update, keep, index_shards)
        summary = check_recall(info)
    with clock.stage("map"):
        picture = draw_corpus_map(embeddings, str(Path(out) / MAP), map_sample, map_method) if map_sample else None
    return {"embeddings": embeddings, "index": index, "samples_embedded_now": samples, "map": picture, **summary,
            "seconds": clock.seconds}  # fmt: skip


def with_dask(address: str | None = None, workers: int = 0) -> Any:
    """`index_corpus` with its tasks on Dask: the cluster at ``address``, or a local one of ``workers`` processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    elif workers > 0:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    else:
        raise ValueError("give a Dask scheduler address or a number of local workers")
    return index_corpus.with_options(task_runner=runner)
