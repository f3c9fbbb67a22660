"""Corpus images by key, read back from the shards an embedding set was made from — no torch.

Search answers name samples by key; showing them (a result grid, the service's
``GET /v1/images/{key}``) needs the picture itself. Each part of an embedding
set names its source shard, and the index maps a key to its embedding row, so
a key leads to one shard. A shard's tar headers are read once (no image data)
to find where each sample's image lies; a lookup afterwards is one seek and
one bounded read. Paths come only from the embedding set's manifest, never
from the key, so a request cannot name a file. A shard whose size is not the
one embedded, or an embedding set that is not the one indexed, is an error:
its images might not be the ones the vectors describe.
"""

from __future__ import annotations

import bisect
import os
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from artifacts.atomic import sha256_file
from artifacts.embedding_set import EMBEDDINGS_MANIFEST, EmbeddingSet, EmbeddingSetError
from artifacts.shard_set import IMAGE_EXTENSIONS, MANIFEST_NAME, read_manifest

if TYPE_CHECKING:  # faiss loads with the index, not with the map command
    from artifacts.index_bundle import IndexBundle

MAX_STORED_IMAGE_BYTES = 16 << 20  # one sample's image as stored in its shard


class CorpusImagesError(ValueError):
    """The images cannot be read: no embedding set, a shard gone or changed, a sample missing from its shard."""


class StoredImageTooLargeError(CorpusImagesError):
    """A stored image over the reader's byte cap."""


@dataclass(frozen=True)
class StoredImage:
    """Where one sample's encoded image lies in its shard."""

    offset: int
    size: int


class CorpusImages:
    """Encoded corpus images by key, and the corpus's class names (from its shard set's manifest).

    ``row_of`` maps a key to its embedding-set row (or raises `KeyError`): `of_index` builds it from an
    index bundle's id map. Safe to share between threads: each shard is scanned once, under its own lock,
    so a first look into a large shard holds up only the readers of that shard.
    """

    def __init__(self, embeddings: EmbeddingSet, row_of: Callable[[str], int]) -> None:
        self.embeddings, self._row_of = embeddings, row_of
        self._starts = [part.start for part in embeddings.parts]
        self._members: dict[int, dict[str, StoredImage]] = {}
        self._locks = [threading.Lock() for _ in embeddings.parts]
        self.class_names = class_names_of(embeddings)

    @classmethod
    def of_index(cls, index: IndexBundle) -> CorpusImages:
        """The images behind ``index``: its embedding set must be the very one it was built from."""
        recorded = index.info.get("embeddings") or {}
        if not recorded.get("path"):
            raise CorpusImagesError(f"{index.path}: index.json names no embedding set, so no corpus images")
        path = Path(recorded["path"])
        embeddings = open_embedding_set(path, f"the embedding set of index {index.path}")
        expected = recorded.get("manifest_sha256")
        if expected and sha256_file(path / EMBEDDINGS_MANIFEST) != expected:
            raise CorpusImagesError(f"{path} changed after index {index.path} was built from it: rebuild the index")
        return cls(embeddings, lambda key: int(index.rows[index.id_of(key)]))

    def label_name(self, label: int) -> str:
        """``label`` as its class name where the shard set has names; ``""`` for unlabelled (-1)."""
        if label < 0:
            return ""
        if self.class_names is not None and label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def read(self, key: str, max_bytes: int = MAX_STORED_IMAGE_BYTES) -> bytes:
        """The encoded image of ``key`` as stored (PNG, JPEG or WebP bytes); `KeyError` for an unknown key."""
        part = bisect.bisect_right(self._starts, self._row_of(key)) - 1
        shard = self.embeddings.parts[part].source
        stored = self._images_in(part).get(key)
        if stored is None:
            raise CorpusImagesError(f"shard {shard} has no image for key {key!r} (the shard changed after embedding)")
        if stored.size > max_bytes:
            raise StoredImageTooLargeError(
                f"the image of {key!r} is {stored.size:,} bytes, over the cap of {max_bytes:,}"
            )
        with open(shard, "rb") as handle:
            handle.seek(stored.offset)
            data = handle.read(stored.size)
        if len(data) != stored.size:
            raise CorpusImagesError(f"shard {shard} is truncated (the image of {key!r} is cut short)")
        return data

    def _images_in(self, part: int) -> dict[str, StoredImage]:
        found = self._members.get(part)
        if found is None:
            with self._locks[part]:
                found = self._members.get(part)
                if found is None:
                    found = self._members[part] = self._scan(part)
        return found

    def _scan(self, part: int) -> dict[str, StoredImage]:
        shard = self.embeddings.parts[part].source
        if not os.path.isabs(shard):
            raise CorpusImagesError(
                f"{self.embeddings.path} names its shards by relative paths (made before mocoplus recorded "
                "absolute ones): rerun mocoplus embed into a new folder to show its images"
            )
        if not os.path.isfile(shard):
            raise CorpusImagesError(f"shard {shard} (a source of embedding set {self.embeddings.path}) is missing")
        try:  # the part must still be the one the manifest lists (`EmbeddingSet.record`)
            embedded_size = self.embeddings.record(self.embeddings.parts[part]).get("source_bytes")
        except EmbeddingSetError as error:
            raise CorpusImagesError(str(error)) from None
        if embedded_size is not None and os.path.getsize(shard) != embedded_size:
            raise CorpusImagesError(f"shard {shard} changed after it was embedded ({embedded_size:,} bytes then)")
        return scan_shard(shard)


def scan_shard(shard: str) -> dict[str, StoredImage]:
    """Key → where its image lies, from the tar's headers alone (WebDataset's key: the name before its first dot).

    Where a sample holds several images, the first extension of `IMAGE_EXTENSIONS` wins, as in the streams.
    """
    if "://" in shard or shard.startswith("pipe:"):
        raise CorpusImagesError(f"corpus images are read from local shard files; {shard} is a URL")
    found: dict[str, tuple[int, StoredImage]] = {}
    try:
        with tarfile.open(shard, "r:") as archive:
            while (member := archive.next()) is not None:
                archive.members.clear()  # tarfile would keep every header: the scan keeps only the images
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                extension = extension.lower()
                if not dot or extension not in IMAGE_EXTENSIONS:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                preference = IMAGE_EXTENSIONS.index(extension)
                if key not in found or preference < found[key][0]:
                    found[key] = (preference, StoredImage(member.offset_data, member.size))
    except (tarfile.TarError, OSError) as error:
        raise CorpusImagesError(f"shard {shard} cannot be read: {error}") from None
    return {key: stored for key, (_preference, stored) in found.items()}


def open_embedding_set(path: Path, what: str) -> EmbeddingSet:
    """``EmbeddingSet(path)``, its failures as `CorpusImagesError` naming ``what`` it was meant to be."""
    try:
        return EmbeddingSet(path)
    except (EmbeddingSetError, OSError) as error:
        raise CorpusImagesError(f"{what} cannot be read: {error}") from None


def class_names_of(embeddings: EmbeddingSet) -> tuple[str, ...] | None:
    """The class names of the shard set the embeddings came from, when its manifest is beside the shards."""
    folders = {Path(part.source).parent for part in embeddings.parts if os.path.isabs(part.source)}
    names = set()
    for folder in folders:
        if not (folder / MANIFEST_NAME).is_file():
            return None
        try:
            names.add(read_manifest(folder).class_names)
        except (ValueError, OSError):
            return None
    return names.pop() if len(names) == 1 else None
