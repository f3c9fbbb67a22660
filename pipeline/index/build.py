"""`mocoplus index`: an embedding set → a tuned, searchable FAISS index bundle.

See docs/architecture.md, "The contracts".

The steps, each timed into ``index.json``:

1. **plan**: the index kind and factory string (`pipeline.index.plan`: the
   ``auto`` rule by corpus size and memory budget);
2. **train** on a random sample of the corpus (IVF centroids, OPQ rotation,
   PQ codebooks), read row by row from the memory-mapped parts;
3. **add** the corpus in chunks of ``chunk_rows``: memory holds the index and
   one chunk, never the corpus; with ``num_shards > 1`` the parts are split
   into contiguous shards, each added to its own copy of the one trained
   index (what n machines would build independently), then the shards are
   merged — in memory when the index fits the budget, into an on-disk
   ``index.ivfdata`` beside ``index.faiss`` otherwise;
4. **tune** the search parameter to the smallest value whose recall@k against
   exact search on held-out queries reaches the target (`pipeline.index.tune`),
   and measure queries/s there and for exact search.

Only live rows are indexed: rows of samples removed by a later generation of
the shard set (`EmbeddingSet.live_rows`) are left out. The bundle is version 1
of ``out_dir`` (`artifacts.versions`), built in a hidden temp folder and
renamed into place before ``current`` points at it: a failed or killed build
leaves nothing that looks finished. `pipeline.index.update` makes the later
versions.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from artifacts.atomic import building_dir, package_version, reusable_output, sha256_file
from artifacts.embedding_set import EMBEDDINGS_MANIFEST, EmbeddingSet
from artifacts.index_bundle import (
    INDEX_FORMAT,
    INDEX_JSON,
    INDEX_KIND,
    gpu_index,
    is_gpu_index,
    write_index_files,
    write_index_json,
)
from artifacts.versions import current_version, resolve_version, switch_current, version_name
from pipeline.index.config import IndexConfig
from pipeline.index.plan import HNSW_BUILD_EFFORT, IndexPlan, plan_index
from pipeline.index.shards import (
    IVFDATA_FILE,
    StagedBuild,
    fill_parts,
    merge_mode,
    merge_parts,
    shard_bounds,
    stage,
    staging_dir,
)
from pipeline.index.tune import (
    Tuning,
    exact_neighbours,
    metric_type,
    queries_per_second,
    recall_at_k,
    set_search_parameter,
    tune,
)
from pipeline.progress import stage_progress

# Upper ends of the tuning search; GPU IVF caps nprobe at 2048.
EF_SEARCH_LIMIT = 4096
GPU_NPROBE_LIMIT = 2048
TUNING_IVFDATA = "tuning.ivfdata"  # a sharded on-disk build's index without the held-out rows


@dataclass(frozen=True)
class IndexResult:
    out_dir: Path
    info: dict[str, Any]
    up_to_date: bool = False  # ``out_dir`` already held this index, built from the same embeddings and options


def build_index(
    embeddings_dir: Path,
    out_dir: Path,
    config: IndexConfig = IndexConfig(),
    *,
    progress: bool = True,
    workers: int = 1,
) -> IndexResult:
    """Build, tune and write the index bundle for the embedding set at ``embeddings_dir``.

    A rerun into a finished ``out_dir`` with the same embeddings and options is
    up to date and builds nothing; other contents of ``out_dir`` are an error
    (``mocoplus index --update`` brings a bundle up to date with its set).
    A sharded build fills its parts in ``workers`` local processes, and a
    rerun after a killed one keeps its trained index and finished parts.
    """
    embeddings = EmbeddingSet(embeddings_dir)
    inputs = index_inputs(embeddings, config)
    existing = _finished(embeddings_dir, out_dir, inputs)
    if existing is not None:
        return IndexResult(Path(out_dir), existing, up_to_date=True)
    staging = staging_dir(Path(out_dir))
    with building_dir(Path(out_dir)) as work:  # the whole folder appears at once, or nothing does
        (work / version_name(1)).mkdir()
        info = write_version(
            work / version_name(1), embeddings, config, inputs, version=1, progress=progress, staging=staging,
            workers=workers,
        )  # fmt: skip
        switch_current(work, 1)
    shutil.rmtree(staging, ignore_errors=True)
    return IndexResult(Path(out_dir), info)


def stage_index_build(embeddings_dir: Path, out_dir: Path, config: IndexConfig) -> StagedBuild | None:
    """The first task of a sharded build run elsewhere (the ``index-corpus`` flow): plan, train, stage.

    Its parts are then filled by `pipeline.index.shards.fill_part` on any worker that sees the folders, and
    `build_index` finishes (merges, tunes, writes). None when ``out_dir`` already holds this index.
    """
    if config.num_shards < 2:
        raise ValueError("only a sharded build (num_shards >= 2) is staged")
    embeddings = EmbeddingSet(embeddings_dir)
    inputs = index_inputs(embeddings, config)
    if _finished(embeddings_dir, out_dir, inputs) is not None:
        return None
    layout = Layout.of(embeddings, config)
    sharded = Sharded(embeddings, layout.plan, config, inputs, layout.order, layout.corpus, staging_dir(Path(out_dir)))
    return sharded.stage(layout.rng, {})


def _finished(embeddings_dir: Path, out_dir: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """``out_dir``'s index.json when it already holds this index; None when empty; an error when another."""
    try:
        existing = reusable_output(resolve_version(out_dir), INDEX_JSON, inputs)
    except FileExistsError:
        if current_version(out_dir) is None:
            raise
        raise FileExistsError(
            f"{out_dir} holds an index of other embeddings or options: pass --update to bring it up to date "
            f"with {embeddings_dir}, or choose a new --out"
        ) from None
    return existing


def index_inputs(embeddings: EmbeddingSet, config: IndexConfig) -> dict[str, Any]:
    """What a version is built from, as ``index.json`` records it: a rerun with the same is up to date."""
    return {"embeddings_manifest_sha256": sha256_file(embeddings.path / EMBEDDINGS_MANIFEST), "options": asdict(config)}


def write_version(
    work: Path,
    embeddings: EmbeddingSet,
    config: IndexConfig,
    inputs: dict[str, Any],
    *,
    version: int,
    progress: bool,
    reason: str | None = None,
    staging: Path | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Build, tune and write a complete bundle of the set's live rows into the folder ``work``; its info.

    ``reason``: why an update rebuilt instead of adding (recorded in ``index.json``). A sharded build
    (``config.num_shards > 1``) keeps its trained index and finished parts in ``staging`` for a rerun to resume
    from (without one: a folder inside ``work``, removed once merged) and fills them in ``workers`` processes.
    """
    layout = Layout.of(embeddings, config)
    plan, order, corpus, total, rng = layout.plan, layout.order, layout.corpus, len(layout.order), layout.rng
    timings: dict[str, float] = {}

    started = time.perf_counter()
    with stage_progress(progress) as bar:
        task = bar.task(f"indexing ({plan.factory})", total=total, unit="vectors")
        advance = lambda rows: bar.advance(task, rows)  # noqa: E731
        if config.num_shards > 1:
            built = Sharded(embeddings, plan, config, inputs, order, corpus, staging or work / ".staging")
            index, search, report, merge = built.build(work, rng, timings, workers, advance)
            if staging is None:  # no folder to resume from was given: the parts were this build's alone
                shutil.rmtree(built.staging, ignore_errors=True)
            parts: list[dict[str, Any]] | None = built.records
            kept = built.kept
        else:
            index, search, report, merge = _build_whole(embeddings, plan, config, order, corpus, rng, timings, advance)
            parts, kept = None, 0
    timings["total_seconds"] = time.perf_counter() - started

    # a sharded build's merged index is already on the CPU (and may live in an on-disk .ivfdata)
    write_index_files(work, faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index, embeddings, order)
    info = {
        **_describe(embeddings, plan, config, search, report, timings, merge, work),
        "count": total,
        "index_version": version,
        "trained": {"count": total, "added_since": 0, **({"reason": reason} if reason else {})},
        "inputs": inputs,
    }
    if parts is not None:
        info["build"].update(parts=parts, parts_kept=kept, train_reused=built.train_reused)
    write_index_json(work, info)
    return info


@dataclass(frozen=True)
class Layout:
    """What a build indexes and how: the plan, index id → embedding row (held-out rows last), the corpus size."""

    plan: IndexPlan
    order: np.ndarray
    corpus: int  # index ids [0, corpus) while tuning; the held-out rows follow
    rng: np.random.Generator  # drawn from next: the training sample

    @classmethod
    def of(cls, embeddings: EmbeddingSet, config: IndexConfig) -> Layout:
        live = embeddings.live_rows()
        if len(live) < 1:
            raise ValueError(f"{embeddings.path} holds no vectors to index")
        plan = plan_index(len(live), embeddings.dim, kind=config.kind, memory_budget=config.memory_budget)
        if config.num_shards > 1 and plan.nlist is None:
            raise ValueError(f"a sharded build needs an IVF index (--kind ivf or ivfpq), not {plan.kind}")
        rng = np.random.default_rng(config.seed)
        held_out = _held_out_rows(len(live), config.queries, rng)
        order = live[_index_order(len(live), held_out)]
        return cls(plan, order, len(live) - len(held_out), rng)


def _build_whole(
    embeddings: EmbeddingSet,
    plan: IndexPlan,
    config: IndexConfig,
    order: np.ndarray,
    corpus: int,
    rng: np.random.Generator,
    timings: dict[str, float],
    advance: Callable[[int], None],
) -> tuple[faiss.Index, dict[str, Any], dict[str, Any], None]:
    """One index in this process: trained, filled with the corpus, tuned, then given the held-out rows."""
    index = _trained_index(embeddings, np.sort(order), plan, config, rng, timings)  # the live rows, not re-read
    clock = time.perf_counter()
    for _, block in embeddings.ordered(order[:corpus], config.chunk_rows):
        index.add(block)
        advance(len(block))
    timings["add_seconds"] = time.perf_counter() - clock
    search, report = _tune_and_measure(index, embeddings, order, corpus, plan, config, timings)
    clock = time.perf_counter()
    if len(order) > corpus:  # the tuning queries join the index last: ids corpus, ..., count - 1
        index.add(embeddings.rows(order[corpus:]))
        advance(len(order) - corpus)
    timings["add_seconds"] += time.perf_counter() - clock
    return index, search, report, None


@dataclass
class Sharded:
    """A sharded build (`pipeline.index.shards`): staged, parts filled, merged twice (to tune, then whole)."""

    embeddings: EmbeddingSet
    plan: IndexPlan
    config: IndexConfig
    inputs: dict[str, Any]
    order: np.ndarray
    corpus: int
    staging: Path
    records: list[dict[str, Any]] | None = None
    kept: int = 0  # parts found filled when this build came to them: by a killed run, or by the flow's tasks
    train_reused: bool = False  # the quantizer came from the staging folder (an earlier run or the flow's task)

    def stage(self, rng: np.random.Generator, timings: dict[str, float]) -> StagedBuild:
        """The staging folder with the trained index (kept from an earlier run of this build, or trained now)."""
        config = self.config
        # the held-out rows are a part of their own, filled like the others and merged last
        bounds = [*shard_bounds(self.corpus, config.num_shards), (self.corpus, len(self.order))]

        def trained() -> faiss.Index:  # parts are filled on the CPU from a file: a GPU-trained index comes back
            live = np.sort(self.order)  # the live rows, without reading the parts' removals again
            index = _trained_index(self.embeddings, live, self.plan, config, rng, timings)
            return faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index

        # what the parts depend on: not the tuning's target, k or the merge, which a rerun may change freely
        shaping = ("kind", "metric", "memory_budget", "queries", "num_shards", "gpu", "seed")
        description = {
            "embeddings_manifest_sha256": self.inputs["embeddings_manifest_sha256"],
            "factory": self.plan.factory,
            "options": {name: getattr(config, name) for name in shaping},
        }
        staged, reused = stage(
            self.staging, self.embeddings, description, self.order, bounds, config.chunk_rows, trained
        )
        timings["train_seconds"] = staged.train_seconds  # as measured when it was staged
        self.train_reused = reused
        return staged

    def build(
        self, work: Path, rng: np.random.Generator, timings: dict[str, float], workers: int,
        advance: Callable[[int], None],
    ) -> tuple[faiss.Index, dict[str, Any], dict[str, Any], str]:  # fmt: skip
        config = self.config
        staged = self.stage(rng, timings)
        clock = time.perf_counter()
        records = fill_parts(staged, workers, advance)
        self.records = [_public(record) for record in records]
        self.kept = sum(record["reused"] for record in records)
        timings["add_seconds"] = time.perf_counter() - clock
        mode = merge_mode(staged, config.merge, config.memory_budget)
        clock = time.perf_counter()
        index = merge_parts(staged, mode, config.num_shards, work / TUNING_IVFDATA)  # the corpus, no held-out
        timings["merge_seconds"] = time.perf_counter() - clock
        search, report = _tune_and_measure(index, self.embeddings, self.order, self.corpus, self.plan, config, timings)
        del index
        clock = time.perf_counter()
        index = merge_parts(staged, mode, None, work / IVFDATA_FILE)  # the bundle's: every part
        (work / TUNING_IVFDATA).unlink(missing_ok=True)
        timings["merge_seconds"] += time.perf_counter() - clock
        for name, value in search["params"].items():
            set_search_parameter(index, name, value)
        return index, search, report, mode


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A part's record as ``index.json`` lists it: its rows, who filled it (host:pid, Dask worker) and how long."""
    start, stop = record["bounds"]
    return {"part": record["part"], "rows": stop - start, "writer": record["writer"], "seconds": record["seconds"]}


def _held_out_rows(count: int, queries: int, rng: np.random.Generator) -> np.ndarray:
    """Rows kept out of the index while it is tuned: at most ``queries`` and a tenth of the set."""
    size = min(queries, count // 10)
    return np.sort(rng.choice(count, size=size, replace=False)) if size else np.zeros(0, dtype=np.int64)


def _index_order(count: int, held_out: np.ndarray) -> np.ndarray:
    """Index id → embedding-set row: every other row in order, then the held-out rows."""
    keep = np.ones(count, dtype=bool)
    keep[held_out] = False
    return np.concatenate([np.flatnonzero(keep), held_out]).astype(np.int64)


def _trained_index(
    embeddings: EmbeddingSet,
    live: np.ndarray,
    plan: IndexPlan,
    config: IndexConfig,
    rng: np.random.Generator,
    timings: dict[str, float],
) -> faiss.Index:
    """A trained, empty index of ``plan``'s kind, trained on a random sample of the ``live`` rows."""
    index = faiss.index_factory(embeddings.dim, plan.factory, metric_type(config.metric))
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = HNSW_BUILD_EFFORT
    if config.gpu:
        index = gpu_index(index)
    clock = time.perf_counter()
    if plan.train_size:
        sample = live[np.sort(rng.choice(len(live), size=plan.train_size, replace=False))]
        index.train(embeddings.rows(sample))
    timings["train_seconds"] = time.perf_counter() - clock
    return index


def _tune_and_measure(
    index: faiss.Index,
    embeddings: EmbeddingSet,
    order: np.ndarray,
    corpus: int,
    plan: IndexPlan,
    config: IndexConfig,
    timings: dict[str, float],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune the search parameter on the held-out rows (not in the index yet); the setting and the report."""
    clock = time.perf_counter()
    queries = embeddings.rows(order[corpus:])
    k = min(config.k, corpus)
    if not len(queries) or k < 1:  # too few vectors to hold any out
        timings["tune_seconds"] = time.perf_counter() - clock
        return {"parameter": plan.search_parameter, "params": {}}, {"k": 0, "queries": 0, "recall": None}
    ngpu = faiss.get_num_gpus() if config.gpu else 0
    blocks = (block for _, block in embeddings.ordered(order[:corpus], config.chunk_rows))
    _, truth, exact_seconds = exact_neighbours(queries, blocks, k, config.metric, ngpu=ngpu)

    def recall_of(value: int) -> float:
        if plan.search_parameter is not None:
            set_search_parameter(index, plan.search_parameter, value)
        return recall_at_k(index.search(queries, k)[1], truth)

    start, limit = effort_bounds(plan.search_parameter, plan.nlist, k, gpu=config.gpu)
    tuning = tune(recall_of, plan.search_parameter, start=start, limit=limit, target=config.target_recall)
    if plan.search_parameter is not None:
        set_search_parameter(index, plan.search_parameter, tuning.value)
    qps = queries_per_second(lambda batch: index.search(batch, k), queries)
    timings["tune_seconds"] = time.perf_counter() - clock
    note = f"{len(queries)} corpus vectors kept out of the index while tuning, added last"
    return tuning_result(tuning, k, len(queries), qps, exact_seconds, note)


def tuning_result(
    tuning: Tuning, k: int, queries: int, qps: float, exact_seconds: float, held_out: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``index.json``'s ``search`` (the tuned setting) and ``recall_at_k`` (what the tuner measured)."""
    parameter = tuning.parameter
    search = {"parameter": parameter, "params": {parameter: tuning.value} if parameter else {}}
    report = {
        "k": k,
        "queries": queries,
        "recall": tuning.recall,
        "target": tuning.target,
        "target_met": tuning.reached,
        "qps": qps,
        "exact_qps": queries / exact_seconds if exact_seconds > 0 else None,
        "probes": [asdict(probe) for probe in tuning.probes],
        "held_out": held_out,
    }
    return search, report


def effort_bounds(parameter: str | None, nlist: int | None, k: int, *, gpu: bool) -> tuple[int, int]:
    """Where the tuner's search for ``nprobe``/``efSearch`` starts and ends."""
    if parameter == "nprobe":
        return 1, min(nlist or 1, GPU_NPROBE_LIMIT) if gpu else nlist or 1
    return max(16, k), EF_SEARCH_LIMIT


def embeddings_record(embeddings: EmbeddingSet) -> dict[str, Any]:
    """Which embedding set a version covers: its place, its manifest, its rows and parts (what an update checks)."""
    return {
        "path": str(embeddings.path.resolve()),
        "manifest_sha256": sha256_file(embeddings.path / EMBEDDINGS_MANIFEST),
        "rows": embeddings.count,  # rows covered: an update adds those beyond
        "parts": [part.keys_sha256 for part in embeddings.parts],  # an update checks these are unchanged
    }


def _describe(
    embeddings: EmbeddingSet,
    plan: IndexPlan,
    config: IndexConfig,
    search: dict[str, Any],
    report: dict[str, Any],
    timings: dict[str, float],
    merge: str | None,
    work: Path,
) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT,
        "kind": INDEX_KIND,
        "version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "index_kind": plan.kind,
        "factory": plan.factory,
        "reason": plan.reason,
        "metric": config.metric,
        "dim": embeddings.dim,
        "normalized": embeddings.normalized,
        "bundle_hash": embeddings.bundle_hash,
        "embeddings": embeddings_record(embeddings),
        "search": search,
        "recall_at_k": report,
        "build": {
            **{name: round(value, 3) for name, value in timings.items()},
            "train_size": plan.train_size,
            "chunk_rows": config.chunk_rows,
            "num_shards": config.num_shards,
            "merge": merge,
            "gpu": config.gpu,
            "memory_budget": config.memory_budget,
            "estimated_bytes": plan.estimated_bytes,
        },
        "bytes": sum(path.stat().st_size for path in work.iterdir() if path.suffix in {".faiss", ".ivfdata"}),
    }
