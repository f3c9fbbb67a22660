"""One input → one WebDataset sample, serialised as tar members: the work of ingest's worker processes.

Workers do everything per sample, the tar headers included (Python's tarfile
spends as long on a 28 px image's headers as PIL on its PNG), so the writer in
the main process only appends bytes and the work spreads over all cores.
Headers are fixed (mtime 0, owner ``mocoplus``, mode 0444): the same sample
always gives the same bytes. Kept apart from the shard writer so that a worker
imports only PIL and numpy (webdataset imports torch, a second or more per
spawned worker).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from artifacts.files import FileTooLargeError, UnreadableFileError
from artifacts.images import FORMAT_EXTENSIONS, DecodedImage, InvalidImageError, decode_image, encode_image, limit_side
from artifacts.shard_set import SkippedInput
from pipeline.data.sources.base import SourceItem

TAR_MTIME = 0
TAR_OWNER = "mocoplus"
TAR_MODE = 0o444


@dataclass(frozen=True)
class PreparedSample:
    """A sample ready for a shard: its key and its tar members (headers and padded data), in name order."""

    key: str
    members: bytes


@dataclass(frozen=True)
class SampleOptions:
    image_format: str
    max_side: int | None
    max_pixels: int
    max_file_bytes: int
    class_names: tuple[str, ...] | None


def prepare_sample(item: SourceItem, options: SampleOptions) -> PreparedSample | SkippedInput:
    """Open, validate and encode one input: the sample's tar members, or why it was skipped."""
    raw: bytes | None = None
    try:
        opened = item.input.open(options.max_file_bytes)
        if isinstance(opened, np.ndarray):
            pixels = Image.fromarray(np.ascontiguousarray(opened, dtype=np.uint8))
            decoded = DecodedImage(pixels, "array", pixels.mode, "")
        else:
            raw = opened
            decoded = decode_image(raw, max_pixels=options.max_pixels)
    except FileTooLargeError as error:
        return SkippedInput(item.origin, f"{error} (--max-file-bytes)")
    except (InvalidImageError, UnreadableFileError) as error:
        return SkippedInput(item.origin, str(error))
    except OSError as error:  # an input of another kind that could not be fetched: skipped, like an unreadable file
        return SkippedInput(item.origin, f"cannot read it: {error.strerror or error}")
    image = decoded.image
    if options.max_side is not None:
        image = limit_side(image, options.max_side)
    keep = options.image_format == "keep"
    if (
        keep
        and raw is not None
        and decoded.unchanged
        and image is decoded.image
        and decoded.original_format in FORMAT_EXTENSIONS
    ):
        extension, payload = FORMAT_EXTENSIONS[decoded.original_format], raw
    else:
        extension = "png" if keep else options.image_format
        payload = encode_image(image, extension)
    fields = {extension: payload}
    if item.label is not None:
        fields["cls"] = str(item.label).encode()
    if raw is not None:  # where an encoded image came from and what was done to it; array rows need no record
        fields["json"] = _provenance(item, decoded, image, options)
    return PreparedSample(item.key, tar_members(item.key, fields))


def prepare_chunk(items: list[SourceItem], options: SampleOptions) -> list[PreparedSample | SkippedInput]:
    """`prepare_sample` over consecutive items: one round trip to a worker per chunk."""
    return [prepare_sample(item, options) for item in items]


def tar_members(key: str, fields: dict[str, bytes]) -> bytes:
    """``KEY.FIELD`` members in name order, as WebDataset's TarWriter lays them out, with fixed headers.

    A plain ustar header where the name fits (the fast path), a PAX one where it does not.
    """
    chunks: list[bytes] = []
    for name in sorted(fields):
        data = fields[name]
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
        info.uname = info.gname = TAR_OWNER
        try:
            header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        except ValueError:  # name too long for ustar
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        chunks += [header, data, bytes(-len(data) % tarfile.BLOCKSIZE)]
    return b"".join(chunks)


def _provenance(item: SourceItem, decoded: DecodedImage, image: Image.Image, options: SampleOptions) -> bytes:
    record: dict[str, Any] = {
        "source": item.origin,
        "original": {
            "format": decoded.original_format,
            "mode": decoded.original_mode,
            "size": list(decoded.image.size),
        },
        "size": list(image.size),
        "mode": image.mode,
    }
    if decoded.conversion:
        record["conversion"] = decoded.conversion
    if item.label is not None and options.class_names is not None:
        record["label_name"] = options.class_names[item.label]
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
