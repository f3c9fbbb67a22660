"""`mocoplus serve`: the ONNX Runtime embedding and FAISS search service — no torch.

See docs/architecture.md, "Packages and what each may import".

FastAPI on uvicorn. Images from concurrent requests are decoded off the event
loop, then coalesced by the `MicroBatcher` into one ONNX Runtime call; search
runs in a thread too. Readiness comes only after the model (and index) are
loaded and a warm-up batch has run. Every failure is a JSON
``{"error": "<one line>"}``: bad input a 4xx with its reason
(`serving.payloads`), a body over its budget 413/408 (`serving.guards`), a
full queue or too many decodes or searches waiting a 503 with ``Retry-After``,
unknown routes and methods 404/405, and a bug a 500 whose details stay in the
server log. Messages quote client strings shortened and never show server
paths. Startup refuses an index built with another model and a CUDA request
that ONNX Runtime would silently serve on the CPU (`ModelBundle`). ``/docs``
serves Swagger UI from an installed package (fastapi-offline), not a CDN.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from artifacts.files import read_regular_file
from artifacts.index_bundle import INDEX_JSON, IndexBundle, IndexBundleError
from artifacts.model_bundle import MODEL_JSON, ModelBundle, resolve_model
from artifacts.query_vectors import QueryVectorError
from artifacts.versions import resolve_version
from serving.batcher import BatcherConfig, BatchStats, MicroBatcher, QueueFullError
from serving.corpus import Corpus, add_corpus_routes
from serving.gpus import worker_device
from serving.guards import BodyGuard, Gate, MemoryBudget
from serving.metrics import ServiceMetrics
from serving.payloads import Limits, Payload, RequestError, decode_images, int_field, read_payload, shorten
from serving.protocol import RETRY_AFTER_SECONDS

log = logging.getLogger("uvicorn.error")

FAISS_DEFAULT_EFFORT = {"ef": 16, "nprobe": 1}  # what FAISS searches with when an index was never tuned

CONFIG_ENV = "MOCOPLUS_SERVE_CONFIG"  # how `mocoplus serve --workers N` hands the config to each worker process


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


class ReloadTriggers:
    """What starts a `Service.reload`: SIGHUP (where this process's event loop can take signals) and, with
    ``watch_s``, a poll of the bundles' fingerprints every ``watch_s`` seconds."""

    def __init__(self, service: Service, watch_s: float | None) -> None:
        self.service, self.watch_s = service, watch_s
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signal = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._spawn, "SIGHUP")
            self._signal = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no signals
            log.debug("SIGHUP reloads are not available in this process")
        if self.watch_s:
            self._tasks.add(loop.create_task(self._watch(self.watch_s)))

    def stop(self) -> None:
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in self._tasks:
            task.cancel()

    def _spawn(self, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self.service.reload(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            if self.service.ready and await asyncio.to_thread(self.service.bundles_changed):
                await self.service.reload("the bundles changed")


class RequestMetrics:
    """Pure ASGI middleware: latency and status per route (the route's template, so a scan of random
    paths cannot blow up the label set). Cheaper than ``@app.middleware("http")``, which wraps every
    request and response body in extra tasks and streams."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)
            self.metrics.responses.labels(endpoint=endpoint, code=str(status)).inc()


def create_app(config: ServiceConfig, service: Service | None = None, *, ready_before_serving: bool = False) -> FastAPI:
    """The FastAPI application for ``config``.

    Loading and the warm-up run in the background from startup on, so
    ``/healthz`` answers at once and ``/readyz`` says 503 until they are done;
    pass a ``service`` whose `Service.load` already ran to fail fast on a bad
    model or index before the server listens (the CLI does). With
    ``ready_before_serving`` the server accepts no request before they are
    done: a ``--workers`` process that uvicorn's rolling restart (SIGHUP)
    brings in beside an old one must not answer 503 "still loading".
    """
    service = service or Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(service.start())
        if ready_before_serving:
            await starting
        reloads = ReloadTriggers(service, config.watch_s)
        reloads.start()
        yield
        reloads.stop()
        await asyncio.gather(starting, return_exceptions=True)
        await service.stop()

    app = FastAPIOffline(  # FastAPI with /docs and /redoc assets served from the installed package
        title="mocoplus",
        summary="Embed images with an exported MoCo encoder (ONNX Runtime) and search a FAISS index.",
        version="1",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},  # Swagger UI would ask validator.swagger.io otherwise
    )
    app.state.service = service

    app.add_middleware(
        BodyGuard,
        max_bytes=config.limits.max_body_bytes,
        timeout_s=config.limits.body_timeout_s,
        budget=MemoryBudget(config.limits.max_request_memory),
    )
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    add_error_handlers(app, service)

    @app.post(
        "/v1/embed",
        summary="Embed one or more images",
        description='multipart/form-data with `images` file parts, or JSON `{"images": [base64, ...]}`. '
        "Returns L2-normalised float32 vectors in request order.",
    )
    async def embed(request: Request) -> dict[str, Any]:
        service.require_ready()
        payload = await read_payload(request, config.limits)
        async with service.pinned() as live:
            vectors = await service.embed_images(payload.images, live)
            return {"model": live.model.hash, "dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}

    @app.post(
        "/v1/search",
        summary="Search the index with images, a corpus key, or vectors",
        description='JSON `{"images": [...]}`, `{"key": "..."}` or `{"vectors": [[...]]}` (or multipart '
        "`images` with form fields), `k` (default 10) and `nprobe`/`ef` overrides. Scores are similarities.",
    )
    async def search(request: Request) -> dict[str, Any]:
        return await service.search(await read_payload(request, config.limits))

    add_corpus_routes(app, service)

    @app.get("/v1/model", summary="The model bundle's model.json, the index summary and the generation serving")
    async def model() -> dict[str, Any]:
        live = service.live
        if live is None:
            raise RequestError(503, "still loading")
        return {"model": live.model.info, "index": live.summary() or None, "generation": live.number}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: model and index loaded, warm-up batch done")
    async def readyz() -> JSONResponse:
        body: dict[str, Any] = {"ready": service.ready}
        if service.failure:
            body["error"] = service.failure
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every failure: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": " ".join(reason.split())}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI, service: Service) -> None:
    """Every failure as `error_response`: ours, the framework's (404, 405, validation), and bugs (500)."""

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, error: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 503 else {}
        if error.close:
            headers["Connection"] = "close"
        return error_response(error.status, error.reason, headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, error: ClientDisconnect) -> Response:
        # the client went away before its body was read: one log line, not a traceback; nobody reads an answer
        log.info("%s %s: the client disconnected before sending its whole body", request.method, request.url.path)
        return Response(status_code=400, headers={"Connection": "close"})

    @app.exception_handler(IndexBundleError)
    async def bad_search_parameter(request: Request, error: IndexBundleError) -> JSONResponse:
        return error_response(422, service.without_paths(str(error)))

    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, error: HTTPException) -> JSONResponse:
        where = f"{request.method} {shorten(request.url.path)}"
        reasons = {404: f"not found: {where}", 405: f"method not allowed: {where}"}
        return error_response(error.status_code, reasons.get(error.status_code, str(error.detail)), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"invalid request: {where} {shorten(str(first.get('msg', '')))}".strip())

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client gets no internals
        return error_response(500, "internal server error; the server log has the details")


def config_to_json(config: ServiceConfig) -> str:
    data = asdict(config)
    data["model"], data["index"] = str(config.model), str(config.index) if config.index else None
    return json.dumps(data)


def app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: the config `config_to_json` put in ``$MOCOPLUS_SERVE_CONFIG``."""
    data = json.loads(os.environ[CONFIG_ENV])
    config = ServiceConfig(
        **{
            **data,
            "model": Path(data["model"]),
            "index": Path(data["index"]) if data["index"] else None,
            "batcher": BatcherConfig(**data["batcher"]),
            "limits": Limits(**data["limits"]),
        }
    )
    if config.provider == "cuda":  # worker slot i embeds on GPU i mod the GPU count
        config = replace(config, device_id=worker_device(config.device_id))
    return create_app(config, ready_before_serving=True)
