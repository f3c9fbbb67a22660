"""Prometheus metrics of the service, on a registry of its own (no process-global state).

Request latency per endpoint and per stage (decode, queue wait, inference,
search) as histograms, the batch-size histogram, the queue depth, responses
by status code, reloads by outcome and the generation serving, and which execution provider is active — what an operator
needs to see whether micro-batching works and where the time goes.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "mocoplus_request_seconds",
            "Request latency by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "mocoplus_stage_seconds",
            "Time per stage: decode, queue_wait, inference, search.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mocoplus_batch_size", "Images per model call.", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("mocoplus_queue_depth", "Images waiting for a batch.", registry=self.registry)
        self.responses = Counter(
            "mocoplus_responses", "Responses by endpoint and status code.", ["endpoint", "code"], registry=self.registry
        )
        self.reloads = Counter(
            "mocoplus_reloads", "Reloads of the model and index, by outcome (loaded, failed).", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.generation = Gauge(
            "mocoplus_generation", "The number of the (model, index) generation loaded last.", registry=self.registry
        )
        self.provider = Gauge(
            "mocoplus_execution_provider", "The active ONNX Runtime execution provider (1).", ["provider"],
            registry=self.registry,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
