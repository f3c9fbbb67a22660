"""How `mocoplus ingest` writes shards.

Free of torch, webdataset and braceexpand, so the command line reads its
defaults and choices from here without loading the stage (and the serving
image, which has none of them, can still start it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

from artifacts.files import MAX_FILE_BYTES
from artifacts.images import DEFAULT_MAX_PIXELS
from artifacts.settings import Help

ImageFormat = Literal["png", "jpg", "webp", "keep"]  # keep: the original bytes where the format allows
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True)
class IngestConfig:
    """How to write the shards. Only ``output_options`` (not workers, overwrite or update) affects the bytes.

    ``update``: bring a finished set made from an earlier state of the source up
    to date (new shards for new and changed inputs, removed keys recorded).
    """

    shard_size: Annotated[int, Help("Samples per shard.")] = 5000
    shard_bytes: Annotated[
        int, Help("Byte cap per shard (e.g. 512M, 1G); a shard closes at whichever limit comes first.", byte_size=True)
    ] = 512 * 2**20
    image_format: Annotated[
        ImageFormat, Help("Stored image format: png, jpg, webp, or keep (original bytes if possible).")
    ] = "png"
    max_side: Annotated[int | None, Help("Shrink images whose longer side exceeds this.")] = None
    max_pixels: Annotated[int, Help("Reject images with more pixels than this (decompression bombs).")] = (
        DEFAULT_MAX_PIXELS
    )
    max_file_bytes: Annotated[  # checked before a file is read: a 3 GB ".png" is skipped, not loaded
        int, Help("Skip files larger than this (e.g. 256M), checked before reading them.", byte_size=True)
    ] = MAX_FILE_BYTES
    name: Annotated[str, Help("Shard file prefix: NAME-000000.tar.")] = "shard"
    workers: Annotated[int, Help("Worker processes (default: all cores).")] = field(default_factory=_default_workers)
    overwrite: Annotated[bool, Help("Replace a shard set made from other input.")] = False
    update: Annotated[
        bool,
        Help(
            "Bring a finished set up to date with its source: new and changed inputs go into new shards, "
            "removed ones are recorded (existing shards are never rewritten)."
        ),
    ] = False

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.shard_bytes < 1:
            raise ValueError(f"shard size must be >= 1 sample and >= 1 byte; got {self.shard_size}, {self.shard_bytes}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"format must be one of {', '.join(IMAGE_FORMATS)}; got {self.image_format!r}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max side must be >= 1 pixel; got {self.max_side}")
        if min(self.max_pixels, self.max_file_bytes, self.workers) < 1:
            raise ValueError(
                f"max pixels, max file bytes and workers must be >= 1; got {self.max_pixels}, "
                f"{self.max_file_bytes}, {self.workers}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"shard name may hold only letters, digits, '_' and '-'; got {self.name!r}")

    def output_options(self) -> dict[str, Any]:
        options = {
            "shard_size": self.shard_size,
            "shard_bytes": self.shard_bytes,
            "format": self.image_format,
            "max_side": self.max_side,
            "max_pixels": self.max_pixels,
            "name": self.name,
        }
        if self.max_file_bytes != MAX_FILE_BYTES:  # at its default it is left out: shard sets made before the
            options["max_file_bytes"] = self.max_file_bytes  # option existed stay "already up to date"
        return options
