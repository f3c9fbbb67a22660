"""The corpus behind the served index, for people: its images as PNG, its class names, a random key.

The routes are `serving.routes.corpus`. An image is found by its key through
the index's id map only, so no path is ever taken from a request; the stored
image is held to the service's image caps before it is decoded, and the answer
is a thumbnail at most `THUMBNAIL_SIDE` pixels wide. With an index whose
shards are not readable here, searches work and images answer 503 with the
reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from dataclasses import dataclass
from typing import Any

from artifacts.corpus_images import CorpusImages, CorpusImagesError, StoredImageTooLargeError
from artifacts.images import InvalidImageError, decode_image, limit_side
from artifacts.index_bundle import IndexBundle
from serving.limits import Limits
from serving.payloads import RequestError, shorten

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
