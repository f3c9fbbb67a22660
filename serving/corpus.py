"""The corpus behind the index, for people: its images as PNG, its class names, a random key — and the search page.

``GET /`` is one self-contained page (``serving/static/search.html``: no CDN,
no build step) that searches with an uploaded image, a corpus key or a random
corpus image and shows the neighbours as a grid. ``GET /v1/images/{key}``
answers a corpus image as PNG: the key only ever goes through the index's id
map, so no path is taken from the request, and the stored image is held to the
service's image caps before it is decoded, and the answer is a thumbnail at
most `THUMBNAIL_SIDE` pixels wide. An ETag names each image of each index, so
browsers revalidate instead of showing another index's picture. Without an
index the page says so; with an index whose shards are not readable here,
searches work and images answer 503 with the reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse

from artifacts.corpus_images import CorpusImages, CorpusImagesError, StoredImageTooLargeError
from artifacts.images import InvalidImageError, decode_image, limit_side
from artifacts.index_bundle import IndexBundle
from serving.payloads import Limits, RequestError, shorten

if TYPE_CHECKING:
    from serving.app import Service

log = logging.getLogger("mocoplus.serve")
THUMBNAIL_SIDE = 256  # the page shows ~120 px cards: a 40-megapixel original would cost seconds and megabytes


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
            "count": self.index.count,
            "class_names": list(names) if names is not None else None,
            "images": self.images is not None,
            "images_unavailable": self.unavailable,
        }

    def random_key(self) -> str:
        """A live sample's key, uniformly (removed ones, fewer than half the ids, are drawn again)."""
        if not self.index.count:
            raise RequestError(404, "the corpus is empty")
        while not self.index.is_live(position := self.sampler.randrange(len(self.index.keys))):
            pass
        return self.index.keys[position]

    def require_key(self, key: str) -> None:
        """404 for a key the index does not hold: before any answer about its image, a 304 included."""
        try:
            self.index.id_of(key)
        except KeyError:
            raise RequestError(404, f"no sample with key {shorten(key)!r} in the index") from None

    def etag(self, key: str) -> str:
        """Names this image of this index: another index served on the same address is never taken for it."""
        version = (self.index.info.get("embeddings") or {}).get("manifest_sha256", "")
        return '"' + hashlib.sha256(f"{version}\0{key}".encode()).hexdigest()[:32] + '"'

    def png(self, key: str, limits: Limits) -> bytes:
        """The image of ``key`` as a PNG at most `THUMBNAIL_SIDE` wide, within ``limits`` (blocking: a thread)."""
        if self.images is None:
            raise RequestError(503, f"no corpus images: {self.unavailable}")
        self.require_key(key)
        try:
            data = self.images.read(key, max_bytes=limits.max_image_bytes)
            decoded = decode_image(data, max_pixels=limits.max_pixels, max_decoded_bytes=limits.max_decoded_bytes)
        except StoredImageTooLargeError:
            raise RequestError(413, f"the image of {shorten(key)!r} exceeds {limits.max_image_bytes:,} bytes") from None
        except (CorpusImagesError, InvalidImageError) as error:
            log.warning("image of key %r: %s", shorten(key), error)
            raise RequestError(503, f"the image of {shorten(key)!r} cannot be read on this server") from None
        buffer = io.BytesIO()
        limit_side(decoded.image, THUMBNAIL_SIDE).save(buffer, format="PNG")
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
    async def corpus_image(key: str, request: Request) -> Response:
        corpus = service.require_corpus()
        corpus.require_key(key)  # an unknown key is 404 even to a client that sends a matching If-None-Match
        etag = corpus.etag(key)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}  # revalidated each time: a 304 costs no decode
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(await service.corpus_png(key), media_type="image/png", headers=headers)
