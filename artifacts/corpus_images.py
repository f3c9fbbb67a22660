"""Corpus images by key, read back from the shards an embedding set was made from — no torch.

Search answers name samples by key; showing them (a result grid, the service's
``GET /v1/images/{key}``) needs the picture itself. Each part of an embedding
set names its source shard, and the index maps a key to its embedding row, so
a key leads to one shard. A shard's tar headers are read once (no image data)
to find where each sample's image lies; a lookup afterwards is one seek and
one bounded read. Paths come only from the embedding set's manifest, never
from the key, so a request cannot name a file.
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

from artifacts.embedding_set import EmbeddingSet, EmbeddingSetError
from artifacts.shard_set import IMAGE_EXTENSIONS, MANIFEST_NAME, read_manifest

if TYPE_CHECKING:  # faiss loads with the index, not with the map command
    from artifacts.index_bundle import IndexBundle

MAX_STORED_IMAGE_BYTES = 16 << 20  # one sample's image as stored in its shard


class CorpusImagesError(ValueError):
    """The images cannot be read: no embedding set, a shard gone, a sample missing from its shard."""


@dataclass(frozen=True)
class StoredImage:
    """Where one sample's encoded image lies in its shard."""

    offset: int
    size: int
    extension: str


class CorpusImages:
    """Encoded corpus images by key, and the corpus's class names (from its shard set's manifest).

    ``row_of`` maps a key to its embedding-set row (or raises `KeyError`); `of_index` and
    `of_embeddings` build it from an index bundle's id map or the set's own keys.
    """

    def __init__(self, embeddings: EmbeddingSet, row_of: Callable[[str], int]) -> None:
        self.embeddings, self._row_of = embeddings, row_of
        self._starts = [part.start for part in embeddings.parts]
        self._sources = [part.source for part in embeddings.parts]
        self._members: dict[str, dict[str, StoredImage]] = {}
        self._lock = threading.Lock()
        self.class_names = class_names_of(embeddings)

    @classmethod
    def of_index(cls, index: IndexBundle) -> CorpusImages:
        path = index.info.get("embeddings", {}).get("path")
        if not path:
            raise CorpusImagesError(f"{index.path}: index.json names no embedding set, so no corpus images")
        embeddings = open_embedding_set(Path(path), f"the embedding set of index {index.path}")
        if embeddings.count != index.index.ntotal:
            raise CorpusImagesError(
                f"{embeddings.path} holds {embeddings.count} samples, index {index.path} {index.index.ntotal}: "
                "the index was built from another version of it"
            )
        return cls(embeddings, lambda key: int(index.rows[index.id_of(key)]))

    @classmethod
    def of_embeddings(cls, embeddings: EmbeddingSet) -> CorpusImages:
        keys, _labels = embeddings.keys_and_labels()
        rows = {key: row for row, key in enumerate(keys)}

        def row_of(key: str) -> int:
            if key not in rows:
                raise KeyError(f"no sample with key {key!r} in {embeddings.path}")
            return rows[key]

        return cls(embeddings, row_of)

    def label_name(self, label: int) -> str:
        """``label`` as its class name where the shard set has names; ``""`` for unlabelled (-1)."""
        if label < 0:
            return ""
        if self.class_names is not None and label < len(self.class_names):
            return self.class_names[label]
        return str(label)

    def shard_of(self, key: str) -> str:
        """The shard that holds ``key`` (`KeyError` for a key not in the corpus)."""
        row = self._row_of(key)
        return self._sources[bisect.bisect_right(self._starts, row) - 1]

    def read(self, key: str, max_bytes: int = MAX_STORED_IMAGE_BYTES) -> tuple[bytes, str]:
        """The encoded image of ``key`` as stored (PNG, JPEG or WebP bytes) and its extension."""
        shard = self.shard_of(key)
        stored = self._images_in(shard).get(key)
        if stored is None:
            raise CorpusImagesError(f"shard {shard} has no image for key {key!r} (the shard changed after embedding)")
        if stored.size > max_bytes:
            raise CorpusImagesError(f"the image of {key!r} is {stored.size:,} bytes, over the cap of {max_bytes:,}")
        with open(shard, "rb") as handle:
            handle.seek(stored.offset)
            data = handle.read(stored.size)
        if len(data) != stored.size:
            raise CorpusImagesError(f"shard {shard} is truncated (the image of {key!r} is cut short)")
        return data, stored.extension

    def _images_in(self, shard: str) -> dict[str, StoredImage]:
        with self._lock:
            if shard not in self._members:
                self._members[shard] = _scan_shard(shard, self.embeddings.path)
            return self._members[shard]


def open_embedding_set(path: Path, what: str) -> EmbeddingSet:
    try:
        return EmbeddingSet(path)
    except (EmbeddingSetError, OSError) as error:
        raise CorpusImagesError(f"{what} cannot be read: {error}") from None


def class_names_of(embeddings: EmbeddingSet) -> tuple[str, ...] | None:
    """The class names of the shard set the embeddings came from, when its manifest is beside the shards."""
    folders = {Path(part.source).parent for part in embeddings.parts if part.source}
    names = set()
    for folder in folders:
        if not (folder / MANIFEST_NAME).is_file():
            return None
        try:
            names.add(read_manifest(folder).class_names)
        except (ValueError, OSError):
            return None
    return names.pop() if len(names) == 1 else None


def _scan_shard(shard: str, embeddings: Path) -> dict[str, StoredImage]:
    """Key → where its image lies, from the tar's headers alone (WebDataset's key: the name before its first dot)."""
    if "://" in shard or shard.startswith("pipe:"):
        raise CorpusImagesError(f"corpus images are read from local shard files; {shard} is a URL")
    if not os.path.isfile(shard):
        raise CorpusImagesError(f"shard {shard} (a source of embedding set {embeddings}) is missing")
    found: dict[str, dict[str, StoredImage]] = {}
    try:
        with tarfile.open(shard, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                if dot and extension.lower() in IMAGE_EXTENSIONS:
                    found.setdefault(key, {})[extension.lower()] = StoredImage(
                        member.offset_data, member.size, extension.lower()
                    )
    except (tarfile.TarError, OSError) as error:
        raise CorpusImagesError(f"shard {shard} cannot be read: {error}") from None
    return {
        key: next(images[extension] for extension in IMAGE_EXTENSIONS if extension in images)
        for key, images in found.items()
    }
