"""The corpus for people: ``GET /`` (the search page), ``/v1/corpus``, ``/v1/corpus/random``, ``/v1/images/{key}``.

``GET /`` is one self-contained page (``serving/static/search.html``: no CDN,
no build step). An image's ETag names it in its index, so a browser
revalidates instead of showing another index's picture, and a 304 costs no
decode; an unknown key is 404 even to a client that sends a matching
``If-None-Match``.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from serving.routes import TheService
from serving.schemas import ERRORS, CorpusSummary, RandomKey

router = APIRouter(tags=["corpus"], responses=ERRORS)


@cache
def search_page() -> str:
    return files("serving").joinpath("static/search.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, summary="The search page", include_in_schema=False)
async def index_page() -> HTMLResponse:
    return HTMLResponse(search_page(), headers={"Cache-Control": "no-cache"})


@router.get(
    "/v1/corpus",
    summary="The indexed corpus: size, class names, whether its images can be shown",
    response_model=CorpusSummary,
)
async def corpus_summary(service: TheService) -> dict[str, Any]:
    return service.require_corpus().summary()


@router.get("/v1/corpus/random", summary="A random corpus key (the page's 'random image')", response_model=RandomKey)
async def random_key(service: TheService) -> dict[str, str]:
    return {"key": service.require_corpus().random_key()}


@router.get(
    "/v1/images/{key:path}",
    summary="A corpus image as PNG",
    responses={200: {"content": {"image/png": {}}, "description": "The image, at most 256 pixels wide"}},
    response_class=Response,
)
async def corpus_image(key: str, request: Request, service: TheService) -> Response:
    corpus = service.require_corpus()
    corpus.require_key(key)  # an unknown key is 404 even to a client that sends a matching If-None-Match
    etag = corpus.etag(key)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}  # revalidated each time: a 304 costs no decode
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(await service.corpus_png(key), media_type="image/png", headers=headers)
