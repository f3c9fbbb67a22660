"""Request bodies → validated inputs for the service, or one-line 4xx errors.

Two ways to send images: ``multipart/form-data`` with one or more ``images``
file parts, or JSON ``{"images": ["<base64>", ...]}``. Search also takes JSON
``{"key": "..."}`` or ``{"vectors": [[...], ...]}``, with ``k`` and an
optional ``nprobe``/``ef`` override (form fields or JSON members).

Every limit is checked before the expensive step it protects: the declared
body size before reading it, the number of images before decoding any, the
pixel count from the header before decoding pixels (`serving.images`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from serving.images import InvalidImageError, decode_image, fit_square, to_mode


@dataclass(frozen=True)
class Limits:
    max_images: int = 64  # per request
    max_image_bytes: int = 16 << 20
    max_body_bytes: int = 64 << 20
    max_pixels: int = 40_000_000
    max_k: int = 1000
    max_effort: int = 65536  # nprobe / efSearch


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Payload:
    images: list[bytes] = field(default_factory=list)
    key: str | None = None
    vectors: np.ndarray | None = None
    fields: dict[str, Any] = field(default_factory=dict)


async def read_payload(request: Request, limits: Limits) -> Payload:
    """The request's images (raw bytes), key, vectors and scalar fields."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestError(413, f"request body of {int(declared):,} bytes exceeds {limits.max_body_bytes:,}")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request, limits)
    if content_type.startswith("application/json"):
        return _read_json(await _read_body(request, limits), limits)
    raise RequestError(415, f"send multipart/form-data or application/json, not {content_type or 'no content type'!r}")


async def _read_body(request: Request, limits: Limits) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise RequestError(413, f"request body exceeds {limits.max_body_bytes:,} bytes")
    return bytes(body)


async def _read_multipart(request: Request, limits: Limits) -> Payload:
    try:
        form = await request.form(max_files=limits.max_images + 1, max_fields=16)
    except Exception as error:  # starlette raises its own MultiPartException for malformed bodies
        raise RequestError(400, f"malformed multipart body ({error})") from None
    payload = Payload()
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "images":
                raise RequestError(422, f"unexpected file field {name!r}: send images as 'images'")
            if len(payload.images) >= limits.max_images:
                raise RequestError(413, f"more than {limits.max_images} images in one request")
            if value.size is not None and value.size > limits.max_image_bytes:
                raise RequestError(413, f"image {value.filename!r} exceeds {limits.max_image_bytes:,} bytes")
            payload.images.append(await value.read())
        else:
            payload.fields[name] = value
    payload.key = payload.fields.pop("key", None)
    return payload


def _read_json(body: bytes, limits: Limits) -> Payload:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(422, f"body is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise RequestError(422, "JSON body must be an object")
    payload = Payload(fields={name: data[name] for name in ("k", "nprobe", "ef") if name in data})
    images = data.get("images", [])
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise RequestError(422, "'images' must be a list of base64 strings")
    if len(images) > limits.max_images:
        raise RequestError(413, f"{len(images)} images in one request; the limit is {limits.max_images}")
    for position, text in enumerate(images):
        if len(text) > limits.max_image_bytes * 4 // 3 + 4:
            raise RequestError(413, f"image {position} exceeds {limits.max_image_bytes:,} bytes")
        try:
            payload.images.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(422, f"image {position} is not valid base64") from None
    if "key" in data:
        if not isinstance(data["key"], str):
            raise RequestError(422, "'key' must be a string")
        payload.key = data["key"]
    if "vectors" in data:
        payload.vectors = _vectors(data["vectors"], limits)
    return payload


def _vectors(value: Any, limits: Limits) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError(422, "'vectors' must be a list of equal-length lists of numbers") from None
    array = array.reshape(1, -1) if array.ndim == 1 else array
    if array.ndim != 2 or not array.size:
        raise RequestError(422, "'vectors' must be a list of equal-length lists of numbers")
    if len(array) > limits.max_images:
        raise RequestError(413, f"{len(array)} vectors in one request; the limit is {limits.max_images}")
    if not np.isfinite(array).all():
        raise RequestError(422, "'vectors' contains NaN or infinity")
    return array


def int_field(payload: Payload, name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer field within [low, high], or ``default`` when absent."""
    value = payload.fields.get(name)
    if value is None:
        return default
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, bool) or not (isinstance(value, int) or (text and text.lstrip("-").isdigit())):
        raise RequestError(422, f"{name!r} must be an integer; got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise RequestError(422, f"{name!r} must lie in [{low}, {high}]; got {number}")
    return number


def decode_images(blobs: list[bytes], size: int, limits: Limits) -> np.ndarray:
    """uint8 ``[N, size, size, 3]``; the first bad image fails the request with its position and reason."""
    pixels = []
    for position, blob in enumerate(blobs):
        if len(blob) > limits.max_image_bytes:
            raise RequestError(413, f"image {position} exceeds {limits.max_image_bytes:,} bytes")
        try:
            image = to_mode(decode_image(blob, max_pixels=limits.max_pixels).image, "RGB")
        except InvalidImageError as error:
            raise RequestError(_status_of(str(error)), f"image {position}: {error}") from None
        pixels.append(np.asarray(fit_square(image, size), dtype=np.uint8))
    return np.stack(pixels)


def _status_of(reason: str) -> int:
    if reason.startswith("not a recognised image format"):
        return 415
    if reason.startswith("image too large"):
        return 413
    return 400
