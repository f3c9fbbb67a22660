"""``POST /v1/embed`` and ``POST /v1/search``: images (or a key, or vectors) in, vectors or neighbours out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serving.payloads import read_payload
from serving.routes import TheService
from serving.schemas import (
    ERRORS,
    EmbedForm,
    EmbedRequest,
    EmbedResponse,
    SearchForm,
    SearchRequest,
    SearchResponse,
    request_body,
)

router = APIRouter(prefix="/v1", tags=["search"], responses=ERRORS)


@router.post(
    "/embed",
    summary="Embed one or more images",
    description='multipart/form-data with `images` file parts, or JSON `{"images": [base64, ...]}`. '
    "Returns L2-normalised float32 vectors in request order.",
    response_model=EmbedResponse,
    openapi_extra=request_body(EmbedRequest, EmbedForm),
)
async def embed(request: Request, service: TheService) -> dict[str, Any]:
    service.require_ready()  # before the body is read: a loading service answers at once
    payload = await read_payload(request, service.config.limits, EmbedRequest.model_fields, EmbedForm.model_fields)
    async with service.pinned() as live:
        vectors = await service.embed_images(payload.images, live)
        return {"model": live.model.hash, "dim": int(vectors.shape[1]), "embeddings": vectors.tolist()}


@router.post(
    "/search",
    summary="Search the index with images, a corpus key, or vectors",
    description='JSON `{"images": [...]}`, `{"key": "..."}` or `{"vectors": [[...]]}` (or multipart '
    "`images` with form fields), `k` (default 10) and `nprobe`/`ef` overrides. Scores are similarities.",
    response_model=SearchResponse,
    openapi_extra=request_body(SearchRequest, SearchForm),
)
async def search(request: Request, service: TheService) -> dict[str, Any]:
    payload = await read_payload(request, service.config.limits, SearchRequest.model_fields, SearchForm.model_fields)
    return await service.search(payload)
