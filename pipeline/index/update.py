"""`mocoplus index --update`: the next version of an index bundle, from its embedding set after an update.

The current version's index is loaded, and then:

1. **removed** samples (rows a later shard-set generation removed, replaced
   photos included) join ``deleted.npy``: they stay in the FAISS index, and
   every search filters them out inside FAISS (`artifacts.index_bundle`), so
   no search path — image, key or vector, CLI or service — returns them
   (a Flat index has them removed outright: `_compacted`);
2. **new** rows (the parts embedded since) are added to the trained index
   as they are: no re-training, no re-clustering; half of them, up to
   ``queries``, are held out and added last, to tune on (queries the index
   does not hold, as in a first build);
3. the search parameter is **re-tuned** to the bundle's target recall,
   against exact search over the live vectors (with fewer than
   ``MIN_HELD_OUT`` new vectors the tuned setting is kept: stored vectors as
   queries would flatter an HNSW graph).

The bundle keeps the options it was built with; those given to an update
change them from its version on.

It rebuilds instead — trains afresh on the live rows and compacts the
removed ones away — and says why in ``index.json`` (``trained.reason``) when
the options that shape the index or its tuning change (kind, metric, target
recall, k, memory budget, shards), when the vectors added since the quantizer
was trained pass ``RETRAIN_SHARE`` of those it was trained on, when removed vectors pass ``DEAD_SHARE`` of those
stored, when the target recall is no longer reachable (for an index that
never reached it: when its best recall falls), when ``auto`` now plans
another kind for the grown corpus, or for an on-disk (``index.ivfdata``) index.

The result is a new version beside the old ones; ``current`` switches to it
in one rename, and versions beyond ``keep`` are removed
(`artifacts.versions`). A killed update leaves only a temp folder,
swept by the next run: the current version is untouched throughout. A
current version damaged on disk is rebuilt from the embedding set, and the
reason says so.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from artifacts.atomic import building_dir
from artifacts.embedding_set import EmbeddingSet
from artifacts.index_bundle import (
    INDEX_JSON,
    IndexBundle,
    IndexBundleError,
    OldIndexFormatError,
    live_selector,
    read_index_json,
    search_parameters_for,
    set_index_parameter,
    write_index_files,
    write_index_json,
)
from artifacts.versions import current_version, prune_versions, switch_current, version_name, versions
from pipeline.index.build import (
    IndexResult,
    build_index,
    effort_bounds,
    embeddings_record,
    index_inputs,
    tuning_result,
    write_version,
)
from pipeline.index.config import IndexConfig
from pipeline.index.plan import IndexPlan, plan_index
from pipeline.index.shards import staging_dir
from pipeline.index.tune import exact_neighbours, queries_per_second, recall_at_k, tune
from pipeline.progress import stage_progress

RETRAIN_SHARE = 0.5  # vectors added since training, as a share of those trained on, that call for a retrain
DEAD_SHARE = 0.5  # removed vectors, as a share of those stored, that call for a compacting rebuild
RECALL_DROP = 0.02  # an index that never reached the target is rebuilt when its best recall falls by this
MIN_HELD_OUT = 10  # fewer new vectors than this: tune on stored ones (the report says so)


def update_index(
    embeddings_dir: Path,
    out_dir: Path,
    changes: Mapping[str, Any] | None = None,
    *,
    keep: int = 3,
    progress: bool = True,
    workers: int = 1,
) -> IndexResult:
    """Bring the bundle at ``out_dir`` up to date with the embedding set (its first build when it has none).

    The bundle keeps the options it was built with (kind, metric, target recall, budget...); ``changes``
    (`IndexConfig` field → value) overrides some of them from this version on. A sharded rebuild fills its
    parts in ``workers`` processes.
    """
    root = Path(out_dir)
    if keep < 1:
        raise ValueError(f"--keep must be >= 1 (the current version is always kept); got {keep}")
    number = current_version(root)
    if number is None:
        if (root / INDEX_JSON).exists():
            raise IndexBundleError(
                f"{root} was built before index versions existed: build it once into a new --out, "
                "later updates then work"
            )
        return build_index(embeddings_dir, root, IndexConfig(**(changes or {})), progress=progress, workers=workers)
    embeddings = EmbeddingSet(embeddings_dir)
    base = root / version_name(number)
    next_number = max(versions(root), default=number) + 1
    try:
        info = read_index_json(base)
        config = replace(_recorded_config(info), **(changes or {}))
        inputs = index_inputs(embeddings, config)
        base_bundle = IndexBundle(base, mmap=False)  # in memory: the copy the new version grows from
    except OldIndexFormatError:
        raise  # its options are not read back: rebuilding with defaults would change the index silently
    except IndexBundleError as error:  # damaged on disk: the embedding set still holds everything
        config = IndexConfig(**(changes or {}))
        inputs = index_inputs(embeddings, config)
        with building_dir(root / version_name(next_number)) as work:
            reason = f"version {number} is unreadable ({error})"
            fresh = _rebuilt(work, embeddings, config, inputs, next_number, Rebuild(progress, root, workers), reason)
    else:
        if info.get("inputs") == _as_json(inputs):
            return IndexResult(root, info, up_to_date=True)
        _check_updatable(info, embeddings, base)
        with building_dir(root / version_name(next_number)) as work:
            fresh = _next_version(
                work, base, base_bundle, embeddings, config, inputs, next_number, Rebuild(progress, root, workers)
            )
    switch_current(root, next_number)
    shutil.rmtree(staging_dir(root), ignore_errors=True)
    prune_versions(root, keep)
    return IndexResult(root, fresh)


def _changed_options(before: IndexConfig, now: IndexConfig) -> str:
    """The options that shape the index or its tuning and differ (``a → b``, comma-separated), or ``""``."""
    shaping = ("kind", "metric", "target_recall", "k", "memory_budget", "num_shards", "merge")
    return ", ".join(
        f"{name} {getattr(before, name)} → {getattr(now, name)}"
        for name in shaping
        if getattr(before, name) != getattr(now, name)
    )


def _recorded_config(info: dict[str, Any]) -> IndexConfig:
    """The options the version was built with (defaults for any it does not record)."""
    recorded = (info.get("inputs") or {}).get("options") or {}
    known = {field.name for field in fields(IndexConfig)}
    return IndexConfig(**{name: value for name, value in recorded.items() if name in known})


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _check_updatable(info: dict[str, Any], embeddings: EmbeddingSet, base: Path) -> None:
    """The set must be the one the version covers, grown: the same model's, its parts unchanged."""
    if embeddings.bundle_hash != info["bundle_hash"]:
        raise IndexBundleError(
            f"{base} holds vectors of model bundle {info['bundle_hash'][:12]}, {embeddings.path} of "
            f"{embeddings.bundle_hash[:12]}: a new model gets a new index (index it into a new --out and serve "
            "the new model and index together)"
        )
    covered = list((info.get("embeddings") or {}).get("parts") or [])
    now = [part.keys_sha256 for part in embeddings.parts]
    if not covered or now[: len(covered)] != covered:
        raise IndexBundleError(
            f"{embeddings.path} is not the embedding set {base} covers with new parts added (re-embedded, or "
            "another set): build a new index without --update"
        )


def _next_version(
    work: Path,
    base: Path,
    bundle: IndexBundle,
    embeddings: EmbeddingSet,
    config: IndexConfig,
    inputs: dict[str, Any],
    number: int,
    how: Rebuild,
) -> dict[str, Any]:
    started = time.perf_counter()
    info = bundle.info
    alive = np.zeros(embeddings.count, dtype=bool)
    alive[embeddings.live_rows()] = True
    new_rows = np.flatnonzero(alive[int(info["embeddings"]["rows"]) :]) + int(info["embeddings"]["rows"])
    dead = np.flatnonzero(~alive[bundle.rows])  # stored ids whose sample is removed (earlier removals included)
    live_count = int(alive.sum())
    trained = info.get("trained") or {"count": bundle.index.ntotal, "added_since": 0}
    added_since = int(trained["added_since"]) + len(new_rows)
    plan = plan_index(live_count, embeddings.dim, kind=config.kind, memory_budget=config.memory_budget)
    stored = bundle.index.ntotal + len(new_rows)
    growth = Growth(live_count, stored, len(dead), added_since, int(trained["count"]))
    reasons = _rebuild_reasons(info, base, config, plan, growth)
    if reasons:
        return _rebuilt(work, embeddings, config, inputs, number, how, "; ".join(reasons))

    index, stored_rows = bundle.index, bundle.rows
    removed_now = len(dead) - len(bundle.deleted)
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat):  # see `_compacted`
        index, stored_rows, dead = _compacted(index, stored_rows, dead)
    rng = np.random.default_rng(config.seed)
    held = min(config.queries, len(new_rows) // 2)
    held_rows = np.sort(rng.choice(new_rows, size=held, replace=False)) if held >= MIN_HELD_OUT else new_rows[:0]
    first_rows = np.setdiff1d(new_rows, held_rows)
    timings: dict[str, float] = {}
    with stage_progress(how.progress) as bar:
        task = bar.task(f"updating ({info['factory']})", total=len(new_rows), unit="vectors")
        clock = time.perf_counter()
        for _, block in embeddings.ordered(first_rows, config.chunk_rows):
            index.add(block)
            bar.advance(task, len(block))
        timings["add_seconds"] = time.perf_counter() - clock
        rows = np.concatenate([stored_rows, first_rows]).astype(np.int64)
        if len(held_rows):
            search, report = _retune(
                index, embeddings, rows, dead, held_rows, alive, plan.search_parameter, config, info
            )
            timings["tune_seconds"] = report.pop("seconds")
            reason = _recall_lost(info["recall_at_k"], report) if plan.search_parameter is not None else None
            if reason:
                return _rebuilt(work, embeddings, config, inputs, number, how, reason)
        else:  # stored vectors would flatter an HNSW graph: the tuned setting stands until new vectors come
            note = f"kept from version {info.get('index_version')}: fewer than {MIN_HELD_OUT} new vectors to tune on"
            search, report = info["search"], {**info["recall_at_k"], "held_out": note}
        clock = time.perf_counter()
        if len(held_rows):
            index.add(embeddings.rows(held_rows))
            bar.advance(task, len(held_rows))
        timings["add_seconds"] += time.perf_counter() - clock
    rows = np.concatenate([rows, held_rows]).astype(np.int64)
    timings["total_seconds"] = time.perf_counter() - started
    write_index_files(work, index, embeddings, rows, dead)
    fresh = {
        **info,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "count": live_count,
        "index_version": number,
        "embeddings": embeddings_record(embeddings),
        "search": search,
        "recall_at_k": report,
        "trained": {"count": int(trained["count"]), "added_since": added_since},
        "update": {
            "from_version": info.get("index_version"),
            "added": len(new_rows),
            "removed": removed_now,
            "deleted_in_index": len(dead),
            **{name: round(value, 3) for name, value in timings.items()},
        },
        "bytes": sum(path.stat().st_size for path in work.iterdir() if path.suffix in {".faiss", ".ivfdata"}),
        "inputs": inputs,
    }
    write_index_json(work, fresh)
    return fresh


@dataclass(frozen=True)
class Growth:
    """What an update would make of the current version: vector counts the retrain rule looks at."""

    live: int  # searchable vectors after the update
    stored: int  # vectors the index would hold, removed ones included
    dead: int  # of those, removed
    added_since_training: int
    trained_on: int


def _rebuild_reasons(
    info: dict[str, Any], base: Path, config: IndexConfig, plan: IndexPlan, growth: Growth
) -> list[str]:
    """Why growing the current version would not do (see the module docstring); empty when it would."""
    reasons = []
    changed = _changed_options(_recorded_config(info), config)
    if changed:
        reasons.append(f"options changed ({changed})")
    elif plan.kind != info.get("index_kind"):
        reasons.append(f"{growth.live:,} vectors: {config.kind} now plans {plan.kind}, not {info.get('index_kind')}")
    if (base / "index.ivfdata").exists():
        reasons.append("an on-disk index (index.ivfdata) is rebuilt, not grown in place")
    if plan.train_size and growth.added_since_training > RETRAIN_SHARE * growth.trained_on:
        reasons.append(
            f"{growth.added_since_training:,} vectors added since the quantizer was trained on "
            f"{growth.trained_on:,} (over {RETRAIN_SHARE:.0%})"
        )
    if growth.dead > DEAD_SHARE * growth.stored:
        reasons.append(f"{growth.dead:,} of {growth.stored:,} stored vectors are removed ones (over {DEAD_SHARE:.0%})")
    return reasons


def _compacted(index: faiss.Index, rows: np.ndarray, dead: np.ndarray) -> tuple[faiss.Index, np.ndarray, np.ndarray]:
    """A flat index without its removed vectors, and its id → row map to match; no ids are left deleted.

    An exact index searched through an id filter loses its matrix-multiply path (FAISS scores vector by
    vector): a +10 % update of 37,000 2,043-d vectors spent 52 s in four filtered searches, against 5.6 s
    for a rebuild. Removing from a flat index shifts the later ids down in order: one memmove, so the
    update removes them outright instead.
    """
    if len(dead):
        index.remove_ids(faiss.IDSelectorBatch(len(dead), faiss.swig_ptr(np.ascontiguousarray(dead, np.int64))))
        rows = np.delete(rows, dead)
    return index, rows, dead[:0]


def _recall_lost(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why the grown index no longer searches well enough, or None: the target was reached and is not any more,
    or (an index whose codes never reached it, like IVF-PQ) the best recall fell by more than ``RECALL_DROP``."""
    if now["recall"] is None or before.get("recall") is None:
        return None
    if before.get("target_met") and not now["target_met"]:
        return f"the target recall {now['target']} is no longer reachable (best {now['recall']:.3f})"
    if not before.get("target_met") and now["recall"] < before["recall"] - RECALL_DROP:
        return f"the best recall fell from {before['recall']:.3f} to {now['recall']:.3f}"
    return None


@dataclass(frozen=True)
class Rebuild:
    """How a full build inside an update runs: its progress bar, the bundle (its staging folder), the workers."""

    progress: bool
    root: Path
    workers: int = 1


def _rebuilt(
    work: Path, embeddings: EmbeddingSet, config: IndexConfig, inputs: dict[str, Any], number: int, how: Rebuild,
    reason: str,
) -> dict[str, Any]:  # fmt: skip
    """A full build of the live rows into ``work`` (a version of its own, trained afresh), saying why."""
    return write_version(
        work, embeddings, config, inputs, version=number, progress=how.progress, reason=reason,
        staging=staging_dir(how.root), workers=how.workers,
    )  # fmt: skip


def _retune(
    index: faiss.Index,
    embeddings: EmbeddingSet,
    rows: np.ndarray,
    dead: np.ndarray,
    held_rows: np.ndarray,
    alive: np.ndarray,
    parameter: str | None,
    config: IndexConfig,
    before: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The smallest search effort that reaches the target recall on the live vectors, measured with the new
    vectors ``held_rows`` (not in the index yet) as queries; the setting and the report.

    An index whose codes never reached the target (IVF-PQ) is searched for its knee within 4× of the
    previous version's setting, either way: a day's growth does not move the knee far, and the full search
    up to nprobe = nlist costs a rebuild's tuning (34 of 35 s of a +1 % update on 1M vectors). When the knee
    did move further, the best recall falls and the update rebuilds (`_recall_lost`).
    """
    clock = time.perf_counter()
    live_ids = np.flatnonzero(alive[rows])
    queries, note = embeddings.rows(held_rows), f"{len(held_rows)} new vectors kept out while tuning, added last"
    k = min(config.k, len(live_ids))
    blocks = (block for _, block in embeddings.ordered(rows[live_ids], config.chunk_rows))
    _, positions, exact_seconds = exact_neighbours(queries, blocks, k, config.metric)
    truth = np.where(positions >= 0, live_ids[np.maximum(positions, 0)], -1)
    selector = live_selector(dead, index.ntotal)

    def searched(batch: np.ndarray, value: int | None) -> np.ndarray:
        params, _keep = search_parameters_for(index, parameter, value, selector)
        return index.search(batch, k, params=params)[1]

    nlist = faiss.extract_index_ivf(index).nlist if parameter == "nprobe" else None
    start, limit = effort_bounds(parameter, nlist, k, gpu=False)
    previous = (before.get("search") or {}).get("params", {}).get(parameter) if parameter else None
    if previous and not before.get("recall_at_k", {}).get("target_met"):
        start, limit = max(start, previous // 4), min(limit, previous * 4)
    tuning = tune(
        lambda value: recall_at_k(searched(queries, value if parameter else None), truth),
        parameter,
        start=start,
        limit=limit,
        target=config.target_recall,
    )
    if parameter is not None:
        set_index_parameter(index, parameter, tuning.value)  # type: ignore[arg-type]
    qps = queries_per_second(lambda batch: searched(batch, tuning.value), queries)
    search, report = tuning_result(tuning, k, len(queries), qps, exact_seconds, note)
    return search, {**report, "seconds": time.perf_counter() - clock}
