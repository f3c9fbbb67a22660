"""One input → one WebDataset sample: the work ingest's worker processes do.

Kept apart from the shard writer so that a worker process imports only PIL
and numpy (webdataset imports torch, a second or more per spawned worker).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.sources import SkippedInput, SourceItem
from serving.images import FORMAT_EXTENSIONS, DecodedImage, InvalidImageError, decode_image, encode_image, limit_side


@dataclass(frozen=True)
class SampleOptions:
    image_format: str
    max_side: int | None
    max_pixels: int
    class_names: tuple[str, ...] | None


def prepare_sample(task: tuple[SourceItem, np.ndarray | None], options: SampleOptions) -> dict[str, Any] | SkippedInput:
    """Read, validate and encode one input: a WebDataset sample dict, or why it was skipped."""
    item, pixels = task
    try:
        if pixels is not None:
            decoded, raw = (
                DecodedImage(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)), "array", "L", ""),
                None,
            )
        else:
            raw = _read(item)
            decoded = decode_image(raw, max_pixels=options.max_pixels)
    except (InvalidImageError, OSError) as error:
        return SkippedInput(item.origin, str(error))
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
    sample: dict[str, Any] = {"__key__": item.key, extension: payload}
    if item.label is not None:
        sample["cls"] = str(item.label).encode()
    if item.path is not None:  # where a file came from and what was done to it; array rows need no record
        sample["json"] = _provenance(item, decoded, image, options)
    return sample


def _read(item: SourceItem) -> bytes:
    assert item.path is not None
    try:
        with open(item.path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise OSError(f"unreadable file ({error.strerror or error})") from None


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
