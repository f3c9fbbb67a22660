"""The ``refresh-corpus`` Prefect flow: a changed catalogue reaches the running service, on a schedule.

ingest ``--update`` (new, changed and removed images into a new shard-set
generation) → `flows.index_corpus.index_corpus` with ``update=True`` (new
shards embedded in parallel shares, the index's next version) → SIGHUP to the
service whose pid file is given (it reloads the version ``current`` now names,
docs/service.md, "Reloading without a restart"). Each step skips what is done: a run
with nothing new changes nothing and tells no one. A markdown artifact
reports what changed, the recall, and the update's time against the last full
build's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.index_corpus import index_corpus


@task(retries=1, retry_delay_seconds=5)
def ingest_update(source: str, shards: str) -> dict[str, Any]:
    """The source's changes into the shard set's next generation (its first ingest when there is none)."""
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest

    result = ingest(source, Path(shards), IngestConfig(update=True), progress=False)
    manifest = result.manifest
    return {
        "generation": len(manifest.generations) - 1,
        "added": 0 if result.up_to_date else result.added,
        "removed": 0 if result.up_to_date else result.removed,
        "live": manifest.live,
        "up_to_date": result.up_to_date,
    }


@task
def reload_service(pid_file: str) -> int:
    """SIGHUP to the service that wrote ``pid_file`` (`mocoplus serve --pid-file`); its pid."""
    from serving.pid_file import send_reload

    pid = send_reload(Path(pid_file))
    get_run_logger().info("sent SIGHUP to the service (pid %d): it reloads the new index version", pid)
    return pid


@flow(name="refresh-corpus", log_prints=True)
def refresh_corpus(
    source: str,
    model: str,
    shards: str,
    out: str,
    pid_file: str | None = None,
    shares: int = 2,
    kind: str = "auto",
    target_recall: float = 0.95,
    keep: int = 3,
) -> dict[str, Any]:
    """Bring ``shards`` and ``out`` (embeddings and index, as `index_corpus` lays them out) up to date with
    ``source``, then tell the service behind ``pid_file`` to reload."""
    started = time.perf_counter()
    ingested = ingest_update(source, shards)
    corpus = index_corpus(
        model, shards, out, shares=shares, kind=kind, target_recall=target_recall, map_sample=0, update=True, keep=keep
    )
    notified = reload_service(pid_file) if pid_file and not corpus["reused"] else None
    seconds = time.perf_counter() - started
    update = corpus["update"] or {}
    rows = [
        ("shard-set generation", f"{ingested['generation']} (+{ingested['added']:,} added, "
                                 f"−{ingested['removed']:,} removed; {ingested['live']:,} live)"),
        ("index version", f"{corpus['version']} ({corpus['count']:,} vectors)"),
        ("index change", f"+{update.get('added', 0):,} / −{update.get('removed', 0):,}"
                         + (f"; retrained: {corpus['retrained']}" if corpus["retrained"] else "")),
        ("recall", "not measured" if corpus["recall"] is None else f"{corpus['recall']:.3f}"),
        ("index update", f"{update.get('total_seconds', 0):.1f} s (last full build: {corpus['build_seconds']:.1f} s)"),
        ("refresh", f"{seconds:.1f} s"),
        ("service", f"SIGHUP to pid {notified}" if notified else "not told (nothing changed, or no pid file)"),
    ]  # fmt: skip
    table = "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
    create_markdown_artifact(table, key="refresh-corpus", description="refresh-corpus: what changed and what it cost")
    return {"ingest": ingested, "index": corpus, "reloaded_pid": notified, "seconds": seconds}
