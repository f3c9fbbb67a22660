"""The corpus behind the index, for people: its images as PNG, its class names, a random key — and the search page.

``GET /`` is one self-contained page (``serving/static/search.html``: no CDN,
no build step) that searches with an uploaded image, a corpus key or a random
corpus image and shows the neighbours as a grid. ``GET /v1/images/{key}``
answers a corpus image as PNG: the key only ever goes through the index's id
map, so no path is taken from the request, and the stored image is held to the
service's image caps before it is decoded. Without an index the page says so;
with an index whose shards are not readable here, searches work and images
answer 404 with the reason.
"""

from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse

from artifacts.corpus_images import CorpusImages, CorpusImagesError
from artifacts.images import InvalidImageError, decode_image
from artifacts.index_bundle import IndexBundle
from serving.payloads import Limits, RequestError, shorten

if TYPE_CHECKING:
    from serving.app import Service

log = logging.getLogger("mocoplus.serve")
IMAGE_CACHE_SECONDS = 3600  # an index bundle's images do not change while it is served


@dataclass
class Corpus:
    """The served index's corpus: images when its shards are readable here (else why not), names, a key sampler."""

    index: IndexBundle
    images: CorpusImages | None
    unavailable: str | None  # why there are no images, for clients (no server paths)
    sampler: random.Random

    @classmethod
    def of(cls, index: IndexBundle) -> Corpus:
        try:
            return cls(index, CorpusImages.of_index(index), None, random.Random())
        except CorpusImagesError as error:
            log.warning("corpus images unavailable: %s", error)
            reason = "the embedding set this index was built from is not readable on this server"
            return cls(index, None, reason, random.Random())

    def summary(self) -> dict[str, Any]:
        names = self.images.class_names if self.images is not None else None
        return {
            "count": self.index.index.ntotal,
            "class_names": list(names) if names is not None else None,
            "images": self.images is not None,
            "images_unavailable": self.unavailable,
        }

    def random_key(self) -> str:
        return self.index.keys[self.sampler.randrange(len(self.index.keys))]

    def png(self, key: str, limits: Limits) -> bytes:
        """The image of ``key`` re-encoded as PNG, within ``limits`` (blocking: run it in a thread)."""
        if self.images is None:
            raise RequestError(404, f"no corpus images: {self.unavailable}")
        try:
            self.index.id_of(key)
        except KeyError:
            raise RequestError(404, f"no sample with key {shorten(key)!r} in the index") from None
        try:
            data, _extension = self.images.read(key, max_bytes=limits.max_image_bytes)
            decoded = decode_image(data, max_pixels=limits.max_pixels, max_decoded_bytes=limits.max_decoded_bytes)
        except (CorpusImagesError, InvalidImageError) as error:
            log.warning("image of key %r: %s", shorten(key), error)
            raise RequestError(404, f"the image of {shorten(key)!r} cannot be read on this server") from None
        buffer = io.BytesIO()
        decoded.image.save(buffer, format="PNG")
        return buffer.getvalue()


def search_page() -> str:
    return files("serving").joinpath("static/search.html").read_text(encoding="utf-8")


def add_corpus_routes(app: FastAPI, service: Service) -> None:
    """``GET /``, ``/v1/corpus``, ``/v1/corpus/random`` and ``/v1/images/{key}``."""
    page = search_page()

    @app.get("/", response_class=HTMLResponse, summary="The search page", include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/v1/corpus", summary="The indexed corpus: size, class names, whether its images can be shown")
    async def corpus_summary() -> dict[str, Any]:
        return service.require_corpus().summary()

    @app.get("/v1/corpus/random", summary="A random corpus key (the page's 'random image')")
    async def random_key() -> dict[str, str]:
        return {"key": service.require_corpus().random_key()}

    @app.get(
        "/v1/images/{key:path}",
        summary="A corpus image as PNG",
        responses={200: {"content": {"image/png": {}}}},
        response_class=Response,
    )
    async def corpus_image(key: str) -> Response:
        data = await service.corpus_png(key)
        return Response(data, media_type="image/png", headers={"Cache-Control": f"max-age={IMAGE_CACHE_SECONDS}"})
