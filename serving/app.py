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
import json
import logging
import os
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

from artifacts.index_bundle import IndexBundle, IndexBundleError
from artifacts.model_bundle import ModelBundle
from artifacts.query_vectors import QueryVectorError
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


class Service:
    """What the endpoints share: the loaded model and index, the batcher, the metrics, readiness."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics()
        self.ready = False
        self.model: ModelBundle | None = None
        self.index: IndexBundle | None = None
        self.corpus: Corpus | None = None  # the index's images and class names, for the search page
        self.batcher: MicroBatcher | None = None
        self.failure: str | None = None  # why loading failed, for /readyz
        limits = config.limits
        self.decodes = Gate("decodes", limits.max_concurrent_decodes, limits.max_waiting)
        self.searches = Gate("searches", limits.max_concurrent_searches, limits.max_waiting)

    def load(self) -> None:
        """Load and cross-check the model and index (blocking: run it in a thread)."""
        config = self.config
        model = ModelBundle(config.model, provider=config.provider, threads=config.threads, device_id=config.device_id)
        index = IndexBundle(self.config.index) if self.config.index else None
        if index is not None:
            index.check_model(model.hash, self.config.model)
        self.model, self.index = model, index
        self.corpus = Corpus.of(index) if index is not None else None
        self.metrics.provider.labels(provider=model.session.get_providers()[0]).set(1)

    async def start(self) -> None:
        """Load (unless `load` ran already), start the batcher, run a warm-up batch, then become ready."""
        try:
            if self.model is None:
                await asyncio.to_thread(self.load)
        except (ValueError, OSError) as error:
            self.failure = self.without_paths(str(error))
            return
        assert self.model is not None
        self.batcher = MicroBatcher(self.model.embed, self.config.batcher, self._record_batch)
        await self.batcher.start()
        warmup = np.zeros((min(self.config.batcher.max_batch, 8), self.model.size, self.model.size, 3), np.uint8)
        await self.batcher.embed(warmup)
        self.ready = True

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
        corpus = self.require_corpus()
        async with self.decodes.slot():
            return await asyncio.to_thread(corpus.png, key, self.config.limits)

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.stage_seconds.labels(stage="inference").observe(stats.inference_seconds)
        for wait in stats.queue_waits:
            self.metrics.stage_seconds.labels(stage="queue_wait").observe(wait)

    async def embed_images(self, blobs: list[bytes]) -> np.ndarray:
        self.require_ready()
        assert self.model is not None and self.batcher is not None
        if not blobs:
            raise RequestError(422, "no images: send one or more 'images'")
        async with self.decodes.slot():
            started = time.perf_counter()
            pixels = await asyncio.to_thread(decode_images, blobs, self.model.size, self.config.limits)
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - started)
        self.metrics.queue_depth.set(self.batcher.depth + len(pixels))
        try:
            return await self.batcher.embed(pixels)
        except QueueFullError as error:
            raise RequestError(503, f"overloaded: {error}; retry later") from None
        finally:
            self.metrics.queue_depth.set(self.batcher.depth)

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

    async def query_vectors(self, payload: Payload) -> np.ndarray:
        """The search queries as vectors (`query_count` has checked the payload)."""
        assert self.index is not None
        if payload.key is not None:
            try:
                return self.index.vector_of(payload.key)[None, :]
            except KeyError:
                raise RequestError(404, f"no sample with key {shorten(payload.key)!r} in the index") from None
        if payload.vectors is not None:
            if payload.vectors.shape[1] != self.index.dim:
                raise RequestError(
                    422, f"vectors must have {self.index.dim} dimensions; got {payload.vectors.shape[1]}"
                )
            return payload.vectors
        return await self.embed_images(payload.images)

    def check_work(self, count: int, k: int, effort_name: str, effort: int | None) -> None:
        """Refuse a search whose cost (queries × k × nprobe/efSearch, the tuned one unless overridden) is over budget.

        Each factor has its own cap, but their product is what a search costs: 64 queries × k 1000 × ef 65536
        took 44 s of CPU.
        """
        assert self.index is not None
        used = effort or self.index.tuned_effort or FAISS_DEFAULT_EFFORT.get(effort_name, 1)
        work, budget = count * k * used, self.config.limits.max_search_work
        if work > budget:
            raise RequestError(
                422,
                f"search work {count} queries × k {k} × {effort_name} {used} = {work:,} exceeds {budget:,}; "
                f"lower k, {effort_name} or the number of queries",
            )

    async def search(self, payload: Payload) -> dict[str, Any]:
        self.require_ready()
        if self.index is None:
            raise RequestError(404, "this service has no index (start it with --index)")
        limits = self.config.limits
        k = int_field(payload, "k", self.config.default_k, 1, limits.max_k)
        effort_name = "nprobe" if self.index.search_parameter == "nprobe" else "ef"
        for name in {"nprobe", "ef"} - {effort_name} if self.index.search_parameter else {"nprobe", "ef"}:
            if name in payload.fields:
                raise RequestError(422, f"{name!r} does not apply to this {self.index.info['index_kind']} index")
        effort = int_field(payload, effort_name, None, 1, limits.max_effort)
        self.check_work(self.query_count(payload), k, effort_name, effort)
        vectors = await self.query_vectors(payload)
        async with self.searches.slot():
            started = time.perf_counter()
            try:
                hits = await asyncio.to_thread(self.index.search, vectors, k, effort)
            except QueryVectorError as error:  # a stored vector, or scores that overflow all the same
                raise RequestError(422, str(error)) from None
        self.metrics.stage_seconds.labels(stage="search").observe(time.perf_counter() - started)
        return {
            "index": self.index.info["factory"],
            "model": self.index.bundle_hash,
            "results": [
                {"query": position, "hits": [hit.as_dict() for hit in row]} for position, row in enumerate(hits)
            ],
        }


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


def create_app(config: ServiceConfig, service: Service | None = None) -> FastAPI:
    """The FastAPI application for ``config``.

    Loading and the warm-up run in the background from startup on, so
    ``/healthz`` answers at once and ``/readyz`` says 503 until they are done;
    pass a ``service`` whose `Service.load` already ran to fail fast on a bad
    model or index before the server listens (the CLI does).
    """
    service = service or Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(service.start())
        yield
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
        vectors = await service.embed_images(payload.images)
        assert service.model is not None
        return {"model": service.model.hash, "dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}

    @app.post(
        "/v1/search",
        summary="Search the index with images, a corpus key, or vectors",
        description='JSON `{"images": [...]}`, `{"key": "..."}` or `{"vectors": [[...]]}` (or multipart '
        "`images` with form fields), `k` (default 10) and `nprobe`/`ef` overrides. Scores are similarities.",
    )
    async def search(request: Request) -> dict[str, Any]:
        return await service.search(await read_payload(request, config.limits))

    add_corpus_routes(app, service)

    @app.get("/v1/model", summary="The model bundle's model.json and the index summary")
    async def model() -> dict[str, Any]:
        if service.model is None:
            raise RequestError(503, "still loading")
        index = service.index.info if service.index else None
        summary = None
        if index is not None:
            fields = ("factory", "index_kind", "metric", "count", "dim", "search", "recall_at_k")
            summary = {name: index.get(name) for name in fields}
        return {"model": service.model.info, "index": summary}

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
    return create_app(config)
