"""The service's state: the loaded (model, index) generation, embedding and search, reloads — no HTTP.

The routes (`serving.routes`) call a `Service`; `serving.app` assembles them.
A `Generation` is one loaded (model, index) pair with its micro-batcher; a
reload builds the next beside the live one and swaps them in one assignment,
and each request keeps the generation it started on (`Service.pinned`), so no
query ever meets an index of another model's vectors. Every refusal is a
`RequestError` with its status and one line; messages quote client strings
shortened and never show server paths (`Service.without_paths`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.files import read_regular_file
from artifacts.index_bundle import INDEX_JSON, IndexBundle
from artifacts.model_bundle import MODEL_JSON, ModelBundle, resolve_model
from artifacts.query_vectors import QueryVectorError
from artifacts.versions import resolve_version
from serving.batcher import BatcherConfig, BatchStats, MicroBatcher, QueueFullError
from serving.corpus import Corpus
from serving.guards import Gate
from serving.limits import Limits
from serving.metrics import ServiceMetrics
from serving.payloads import Payload, RequestError, decode_images, int_field, shorten

log = logging.getLogger("uvicorn.error")

FAISS_DEFAULT_EFFORT = {"ef": 16, "nprobe": 1}  # what FAISS searches with when an index was never tuned


@dataclass(frozen=True)
class ServiceConfig:
    model: Path
    index: Path | None = None
    provider: str = "cpu"
    threads: int = 0  # ONNX Runtime intra-op threads; 0: its default
    device_id: int = 0  # the GPU with provider cuda (each `--workers` process takes its own: serving.gpus)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    limits: Limits = field(default_factory=Limits)
    default_k: int = 10
    watch_s: float | None = None  # poll the bundles every this many seconds and reload when they change


@dataclass(frozen=True)
class Loaded:
    """What `Service.load` read: the bundles, and the fingerprint of the builds the paths named before it."""

    model: ModelBundle
    index: IndexBundle | None
    fingerprint: dict[str, Any]


class Generation:
    """One loaded (model, index) pair with its batcher: what a request uses from its start to its answer.

    A reload builds the next generation beside the live one and swaps them in
    one assignment; a request pins the generation it started on (`Service.pinned`),
    so it finishes on it and no query ever meets an index of another model's
    vectors. A retired generation's batcher stops once its last request is done.
    """

    def __init__(self, number: int, loaded: Loaded, batcher: MicroBatcher) -> None:
        self.number, self.model, self.index, self.batcher = number, loaded.model, loaded.index, batcher
        self.fingerprint = loaded.fingerprint  # taken before loading: a switch during the load is seen next poll
        self.corpus = Corpus.of(self.index) if self.index is not None else None  # images and class names, for the page
        self.users = 0  # requests pinned to it now
        self.retired = False  # swapped out by a reload: its batcher stops once its last request is done
        self.stopped = False

    async def close(self) -> None:
        """Stop its batcher once every queued image is embedded."""
        await self.batcher.stop()
        self.stopped = True

    def summary(self) -> dict[str, Any]:
        """What `/v1/model` says about the index: its kind and size, and which build of it this is."""
        if self.index is None:
            return {}
        fields = ("factory", "index_kind", "metric", "count", "dim", "search", "recall_at_k")
        return {
            **{name: self.index.info.get(name) for name in fields},
            "count": self.index.count,
            "version": self.index.version,
            "build": self.fingerprint["index"]["version"] if self.fingerprint["index"] else None,
        }


def bundle_fingerprint(model: Path, index: Path | None) -> dict[str, Any]:
    """Which model and index builds ``model`` and ``index`` name now: resolved folders (a symlink switched to a
    new build counts) and a digest of their ``model.json`` / ``index.json`` (a bundle rebuilt in place counts)."""

    def of(folder: Path, info: str) -> dict[str, Any] | None:
        resolved = Path(folder).resolve()
        try:
            digest = hashlib.sha256(read_regular_file(resolved / info, 64 << 20)).hexdigest()[:16]
        except (OSError, ValueError):
            digest = None
        return {"path": str(resolved), "version": digest}

    # an index bundle folder: the version its `current` names (an update switches it)
    return {
        "model": of(resolve_model(model), MODEL_JSON),
        "index": of(resolve_version(index), INDEX_JSON) if index is not None else None,
    }


class Service:
    """What the endpoints share: the live `Generation`, the metrics, readiness, the gates, and reloads."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics()
        self.ready = False
        self.live: Generation | None = None
        self.failure: str | None = None  # why loading failed, for /readyz
        limits = config.limits
        self.decodes = Gate("decodes", limits.max_concurrent_decodes, limits.max_waiting)
        self.searches = Gate("searches", limits.max_concurrent_searches, limits.max_waiting)
        self._loaded: Loaded | None = None  # by `load` (the CLI's, before the server starts), for the next generation
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._generations = 0

    # -- loading and reloading --

    def load(self) -> None:
        """Load and cross-check the model and index (blocking: run it in a thread); `start` or `reload` serve them."""
        config = self.config
        fingerprint = bundle_fingerprint(config.model, config.index)
        model = ModelBundle(config.model, provider=config.provider, threads=config.threads, device_id=config.device_id)
        index = IndexBundle(config.index) if config.index else None
        if index is not None:
            index.check_model(model.hash, config.model)
        self._loaded = Loaded(model, index, fingerprint)

    async def _next_generation(self) -> Generation:
        """Load (unless `load` just did), start a batcher and run a warm-up batch: ready to swap in."""
        if self._loaded is None:
            await asyncio.to_thread(self.load)
        loaded, self._loaded = self._loaded, None
        assert loaded is not None
        model = loaded.model
        batcher = MicroBatcher(model.embed, self.config.batcher, self._record_batch)
        await batcher.start()
        try:
            warmup = np.zeros((min(self.config.batcher.max_batch, 8), model.size, model.size, 3), np.uint8)
            await batcher.embed(warmup)
        except BaseException:
            await batcher.stop()
            raise
        self._generations += 1
        self.metrics.provider.labels(provider=model.session.get_providers()[0]).set(1)
        self.metrics.generation.set(self._generations)
        return Generation(self._generations, loaded, batcher)

    async def start(self) -> None:
        """The first generation; the service is ready once its warm-up batch is done."""
        try:
            self.live = await self._next_generation()
        except (ValueError, OSError) as error:
            self.failure = self.without_paths(str(error))
            return
        self.ready = True

    async def reload(self, reason: str) -> bool:
        """Load the bundles the configured paths name now, check and warm them up, then swap them in.

        A new version that fails to load (corrupt, or an index of another
        model) is logged and counted, and the live one keeps serving. Requests
        in flight finish on the generation they started with.
        """
        async with self._reload_lock:
            if not self.ready or self.live is None:
                return False
            try:
                fresh = await self._next_generation()
            except Exception as error:  # whatever a bad build raises, the live generation keeps serving
                self.metrics.reloads.labels(outcome="failed").inc()
                log.error("reload (%s) failed, generation %d keeps serving: %s", reason, self.live.number, error)
                return False
            old, self.live = self.live, fresh
            self.metrics.reloads.labels(outcome="loaded").inc()
            log.info("reload (%s): generation %d serves %s", reason, fresh.number, fresh.fingerprint)
            self._retire(old)
            return True

    def bundles_changed(self) -> bool:
        """Whether the configured paths name other builds than the live generation's (what ``--watch`` polls)."""
        if self.live is None:
            return False
        return bundle_fingerprint(self.config.model, self.config.index) != self.live.fingerprint

    def _retire(self, generation: Generation) -> None:
        generation.retired = True
        if generation.users == 0:
            self._stop_later(generation)

    def _stop_later(self, generation: Generation) -> None:
        task = asyncio.get_running_loop().create_task(generation.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @asynccontextmanager
    async def pinned(self) -> AsyncIterator[Generation]:
        """The live generation, held by this request until it is answered, whatever reloads happen meanwhile."""
        self.require_ready()
        generation = self.live
        assert generation is not None
        generation.users += 1
        try:
            yield generation
        finally:
            generation.users -= 1
            if generation.retired and generation.users == 0:
                self._stop_later(generation)

    # -- what the endpoints read --

    @property
    def model(self) -> ModelBundle | None:
        return self.live.model if self.live is not None else None

    @property
    def index(self) -> IndexBundle | None:
        return self.live.index if self.live is not None else None

    @property
    def corpus(self) -> Corpus | None:
        return self.live.corpus if self.live is not None else None

    def without_paths(self, message: str) -> str:
        """``message`` with the bundles' server paths replaced by what they are: clients see it."""
        for path, name in ((self.config.model, "<model bundle>"), (self.config.index, "<index bundle>")):
            if path is not None:
                message = message.replace(str(Path(path).resolve()), name).replace(str(path), name)
        return message

    def require_ready(self) -> None:
        if not self.ready:
            raise RequestError(503, self.failure or "still loading: the model is not ready yet")

    def require_corpus(self) -> Corpus:
        self.require_ready()
        if self.corpus is None:
            raise RequestError(404, "this service has no index (start it with --index)")
        return self.corpus

    async def corpus_png(self, key: str) -> bytes:
        """A corpus image as PNG, decoded in a decode slot like any uploaded image."""
        async with self.pinned() as live:
            if live.corpus is None:
                raise RequestError(404, "this service has no index (start it with --index)")
            async with self.decodes.slot():
                return await asyncio.to_thread(live.corpus.png, key, self.config.limits)

    async def stop(self) -> None:
        self.ready = False
        if self.live is not None:
            await self.live.close()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.stage_seconds.labels(stage="inference").observe(stats.inference_seconds)
        for wait in stats.queue_waits:
            self.metrics.stage_seconds.labels(stage="queue_wait").observe(wait)

    # -- embedding and search, each on the generation it started with --

    async def embed_images(self, blobs: list[bytes], live: Generation) -> np.ndarray:
        if not blobs:
            raise RequestError(422, "no images: send one or more 'images'")
        async with self.decodes.slot():
            started = time.perf_counter()
            pixels = await asyncio.to_thread(decode_images, blobs, live.model.size, self.config.limits)
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - started)
        self.metrics.queue_depth.set(live.batcher.depth + len(pixels))
        try:
            return await live.batcher.embed(pixels)
        except QueueFullError as error:
            raise RequestError(503, f"overloaded: {error}; retry later") from None
        finally:
            self.metrics.queue_depth.set(live.batcher.depth)

    @staticmethod
    def query_count(payload: Payload) -> int:
        """How many queries: checks the payload holds exactly one of images, a key, or vectors."""
        given = [name for name, present in (("images", payload.images), ("key", payload.key is not None),
                                            ("vectors", payload.vectors is not None)) if present]  # fmt: skip
        if len(given) != 1:
            raise RequestError(422, f"send exactly one of images, key or vectors; got {given or 'none'}")
        if payload.key is not None:
            return 1
        return len(payload.vectors) if payload.vectors is not None else len(payload.images)

    async def query_vectors(self, payload: Payload, live: Generation) -> np.ndarray:
        """The search queries as vectors (`query_count` has checked the payload, `search` that there is an index)."""
        index = live.index
        assert index is not None
        if payload.key is not None:
            try:
                return index.vector_of(payload.key)[None, :]
            except KeyError:
                raise RequestError(404, f"no sample with key {shorten(payload.key)!r} in the index") from None
        if payload.vectors is not None:
            if payload.vectors.shape[1] != index.dim:
                raise RequestError(422, f"vectors must have {index.dim} dimensions; got {payload.vectors.shape[1]}")
            return payload.vectors
        return await self.embed_images(payload.images, live)

    def check_work(self, index: IndexBundle, count: int, k: int, effort_name: str, effort: int | None) -> None:
        """Refuse a search whose cost (queries × k × nprobe/efSearch, the tuned one unless overridden) is over budget.

        Each factor has its own cap, but their product is what a search costs: 64 queries × k 1000 × ef 65536
        took 44 s of CPU.
        """
        used = effort or index.tuned_effort or FAISS_DEFAULT_EFFORT.get(effort_name, 1)
        work, budget = count * k * used, self.config.limits.max_search_work
        if work > budget:
            raise RequestError(
                422,
                f"search work {count} queries × k {k} × {effort_name} {used} = {work:,} exceeds {budget:,}; "
                f"lower k, {effort_name} or the number of queries",
            )

    async def search(self, payload: Payload) -> dict[str, Any]:
        async with self.pinned() as live:
            index = live.index
            if index is None:
                raise RequestError(404, "this service has no index (start it with --index)")
            limits = self.config.limits
            k = int_field(payload, "k", self.config.default_k, 1, limits.max_k)
            effort_name = "nprobe" if index.search_parameter == "nprobe" else "ef"
            for name in {"nprobe", "ef"} - {effort_name} if index.search_parameter else {"nprobe", "ef"}:
                if name in payload.fields:
                    raise RequestError(422, f"{name!r} does not apply to this {index.info['index_kind']} index")
            effort = int_field(payload, effort_name, None, 1, limits.max_effort)
            self.check_work(index, self.query_count(payload), k, effort_name, effort)
            vectors = await self.query_vectors(payload, live)
            async with self.searches.slot():
                started = time.perf_counter()
                try:
                    hits = await asyncio.to_thread(index.search, vectors, k, effort)
                except QueryVectorError as error:  # a stored vector, or scores that overflow all the same
                    raise RequestError(422, str(error)) from None
            self.metrics.stage_seconds.labels(stage="search").observe(time.perf_counter() - started)
            return {
                "index": index.info["factory"],
                "model": index.bundle_hash,
                "generation": live.number,
                "results": [
                    {"query": position, "hits": [hit.as_dict() for hit in row]} for position, row in enumerate(hits)
                ],
            }
