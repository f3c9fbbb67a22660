"""The service itself: ``/v1/model``, ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from serving.payloads import RequestError
from serving.routes import TheService
from serving.schemas import ERRORS, Liveness, ModelResponse, Readiness

router = APIRouter(tags=["service"])


@router.get(
    "/v1/model",
    summary="The model bundle's model.json, the index summary and the generation serving",
    response_model=ModelResponse,
    responses={503: ERRORS[503]},
)
async def model(service: TheService) -> dict[str, Any]:
    live = service.live
    if live is None:
        raise RequestError(503, "still loading")
    return {"model": live.model.info, "index": live.summary() or None, "generation": live.number}


@router.get("/healthz", summary="Liveness", response_model=Liveness)
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="Readiness: model and index loaded, warm-up batch done",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready (yet, or ever: `error` says why)"}},
)
async def readyz(service: TheService) -> JSONResponse:
    body = Readiness(ready=service.ready, error=service.failure).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=200 if service.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(service: TheService) -> Response:
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
