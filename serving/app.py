"""`mocoplus serve`: the ONNX Runtime embedding and FAISS search service — no torch.

See docs/architecture.md, "Packages and what each may import".

This module assembles the application: the `serving.service.Service` (state,
embedding, search, reloads), its routers (`serving.routes`: search and embed,
the corpus, the service itself, each route with its Pydantic response model
from `serving.schemas`), the guards that come before any route reads a body
(`serving.guards.BodyGuard`: bytes, time and memory per request), request
metrics, and one error shape for every failure (`serving.errors`). Images from
concurrent requests are decoded off the event loop, then coalesced by the
`MicroBatcher` into one ONNX Runtime call; search runs in a thread too.
Readiness comes only after the model (and index) are loaded and a warm-up
batch has run. Startup refuses an index built with another model and a CUDA
request that ONNX Runtime would silently serve on the CPU (`ModelBundle`).
``/docs`` serves Swagger UI from an installed package (fastapi-offline), not a
CDN.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from serving.batcher import BatcherConfig
from serving.errors import add_error_handlers
from serving.gpus import worker_device
from serving.guards import BodyGuard, MemoryBudget
from serving.limits import Limits
from serving.metrics import RequestMetrics
from serving.reloads import ReloadTriggers
from serving.routes import corpus, meta, search
from serving.schemas import request_models
from serving.service import Service, ServiceConfig

CONFIG_ENV = "MOCOPLUS_SERVE_CONFIG"  # how `mocoplus serve --workers N` hands the config to each worker process


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
    add_error_handlers(app, service.without_paths)
    for router in (search.router, corpus.router, meta.router):
        app.include_router(router)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the request models that the routes name but read through the guarded parser."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in request_models():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema


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
