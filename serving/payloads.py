"""Request bodies → validated inputs for the service, or one-line 4xx errors.

Two ways to send images: ``multipart/form-data`` with one or more ``images``
file parts, or JSON ``{"images": ["<base64>", ...]}``. Search also takes JSON
``{"key": "..."}`` or ``{"vectors": [[...], ...]}``, with ``k`` and an
optional ``nprobe``/``ef`` override (form fields or JSON members).

Every limit is checked before the expensive step it protects: the body's bytes
as they arrive (`serving.guards.BodyGuard`), the JSON's punctuation and nesting
before parsing it, the number of images before decoding any, the pixel count and
decoded size from the header before decoding pixels (`artifacts.images`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from artifacts.images import InvalidImageError, decode_image, fit_square, to_mode
from artifacts.query_vectors import query_vector_problem
from serving.limits import Limits

SHORT = 80  # characters of a client's string that an error message quotes


class RequestError(Exception):
    """A bad request: ``status`` (4xx/5xx) and a one-line ``reason``.

    ``close`` asks for the connection to be closed after the answer: set when the
    body was left unread, which the next request on the connection would not survive.
    """

    def __init__(self, status: int, reason: str, *, close: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason, self.close = status, reason, close


@dataclass
class Payload:
    images: list[bytes] = field(default_factory=list)
    key: str | None = None
    vectors: np.ndarray | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def shorten(text: str, limit: int = SHORT) -> str:
    """``text`` cut to ``limit`` characters: an error message must not echo a megabyte the client sent."""
    return text if len(text) <= limit else text[:limit] + "…"


def media_type(content_type: str) -> str:
    """The media type of a Content-Type header: case-insensitive, parameters dropped (RFC 9110 §8.3.1)."""
    return content_type.split(";", 1)[0].strip().lower()


async def read_payload(
    request: Request, limits: Limits, json_members: Collection[str], form_members: Collection[str]
) -> Payload:
    """The request's images (raw bytes), key, vectors and scalar fields.

    ``json_members`` and ``form_members`` are the names the endpoint reads from
    a JSON body and from a multipart form (its request models' fields,
    `serving.schemas`): any other member or field is a 422, so a misspelt
    ``topk`` is never silently searched with the default ``k``.
    """
    content_type = request.headers.get("content-type", "")
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        return await _read_multipart(request, limits, form_members)
    if kind == "application/json":
        body = await request.body()  # `BodyGuard` caps it as it arrives
        return await asyncio.to_thread(_parse_json, body, limits, json_members)
    shown = repr(shorten(content_type)) if content_type else "no content type"
    raise RequestError(415, f"send multipart/form-data or application/json, not {shown}")


def _check_members(names: Collection[str], members: Collection[str]) -> None:
    unknown = [name for name in names if name not in members]
    if unknown:
        raise RequestError(
            422, f"unknown field {shorten(unknown[0])!r}: this endpoint reads {', '.join(sorted(members))}"
        )


async def _read_multipart(request: Request, limits: Limits, members: Collection[str]) -> Payload:
    try:
        form = await request.form(max_files=limits.max_images, max_fields=16)
    except HTTPException as error:  # how Starlette reports a malformed body or a passed limit
        raise _multipart_error(str(error.detail), limits) from None
    payload = Payload()
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "images" or name not in members:
                    raise RequestError(422, f"unexpected file field {shorten(name)!r}: send images as 'images'")
                if value.size is not None and value.size > limits.max_image_bytes:
                    position = len(payload.images)
                    raise RequestError(413, f"image {position} exceeds {limits.max_image_bytes:,} bytes")
                payload.images.append(await value.read())
            else:
                payload.fields[name] = value
    finally:
        await form.close()  # uploads over 1 MiB spill to temp files: free them now, not at garbage collection
    _check_members(payload.fields, members)
    payload.key = payload.fields.pop("key", None)
    return payload


def _multipart_error(detail: str, limits: Limits) -> RequestError:
    """Starlette tells a passed limit from a malformed body only by its message: limits are 413s."""
    if detail.startswith("Too many files"):
        return RequestError(413, f"more than {limits.max_images} images in one request")
    if detail.startswith(("Too many fields", "Part exceeded", "Field exceeded")):
        return RequestError(413, f"multipart body over a limit ({shorten(detail)})")
    return RequestError(400, f"malformed multipart body ({shorten(detail)})")


_STRUCTURE = b'[]{}",:'
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(_STRUCTURE)))


def _check_json_structure(body: bytes, limits: Limits) -> None:
    """Refuse JSON whose parse would be long or deep, before parsing it, in a few linear C passes.

    The C parser holds the GIL from start to end, so a parse in a thread still stalls the event loop (6 M
    numbers: 1.4 s for every client), and it recurses once per nesting level. Its cost follows the
    punctuation, which base64 images have none of; escaped quotes and backslashes are dropped first, so
    the quotes left delimit strings and the brackets outside them give the nesting depth.
    """
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = plain.translate(None, _NOT_STRUCTURE)
    if len(structure) > limits.max_json_tokens:
        raise RequestError(413, f'JSON body has over {limits.max_json_tokens:,} punctuation marks ([]{{}}",:)')
    chars = np.frombuffer(structure, np.uint8)
    quotes = chars == ord('"')
    outside = (np.cumsum(quotes) % 2 == 0) & ~quotes
    steps = np.isin(chars, list(b"[{")).astype(np.int32) - np.isin(chars, list(b"]}"))
    depth = int(np.cumsum(steps * outside).max(initial=0))
    if depth > limits.max_json_depth:
        raise RequestError(422, f"JSON nested {depth} levels deep; the limit is {limits.max_json_depth}")


def _parse_json(body: bytes, limits: Limits, members: Collection[str]) -> Payload:
    """The JSON body as a `Payload` (run it in a thread: base64 decoding and the parse take CPU)."""
    _check_json_structure(body, limits)
    try:
        data = json.loads(body)
    except RecursionError:  # a body the structure check misjudged (UTF-16): still a 4xx
        raise RequestError(422, "JSON nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise RequestError(422, f"body is not valid JSON ({shorten(str(error))})") from None
    if not isinstance(data, dict):
        raise RequestError(422, "JSON body must be an object")
    _check_members(data, members)
    return _json_payload(data, limits)


def _json_payload(data: dict[str, Any], limits: Limits) -> Payload:
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
    """``[N, D]`` float32 from JSON numbers only: NumPy would also take ``"1.5"`` and ``true``."""
    rows = value if isinstance(value, list) and value and all(isinstance(row, list) for row in value) else [value]
    width = len(rows[0]) if isinstance(rows[0], list) else 0
    if not width or not all(
        isinstance(row, list) and len(row) == width and all(type(x) in (int, float) for x in row) for row in rows
    ):
        raise RequestError(422, "'vectors' must be a list of equal-length lists of numbers")
    if len(rows) > limits.max_images:
        raise RequestError(413, f"{len(rows)} vectors in one request; the limit is {limits.max_images}")
    try:
        with np.errstate(over="ignore"):
            array = np.array(rows, dtype=np.float64).astype(np.float32)
        finite = bool(np.isfinite(array).all())
    except OverflowError:  # an integer beyond float64
        finite = False
    if not finite:
        raise RequestError(422, "'vectors' contains NaN or infinity (or a number beyond float32)")
    for row, vector in enumerate(array):
        problem = query_vector_problem(vector)
        if problem:
            raise RequestError(422, f"'vectors' row {row}: {problem}")
    return array


_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses


def int_field(payload: Payload, name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer field within [low, high], or ``default`` when absent."""
    value = payload.fields.get(name)
    if value is None:
        return default
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, bool) or not (isinstance(value, int) or (text and _INTEGER.fullmatch(text))):
        raise RequestError(422, f"{name!r} must be an integer; got {shorten(repr(value))}")
    number = int(text if text is not None else value)
    if not low <= number <= high:
        raise RequestError(422, f"{name!r} must lie in [{low}, {high}]; got {shorten(str(number))}")
    return number


def decode_images(blobs: list[bytes], size: int, limits: Limits) -> np.ndarray:
    """uint8 ``[N, size, size, 3]``; the first bad image fails the request with its position and reason.

    Resized before it becomes RGB, so a large gray image is never held three bands wide.
    """
    pixels = []
    for position, blob in enumerate(blobs):
        if len(blob) > limits.max_image_bytes:
            raise RequestError(413, f"image {position} exceeds {limits.max_image_bytes:,} bytes")
        try:
            decoded = decode_image(blob, max_pixels=limits.max_pixels, max_decoded_bytes=limits.max_decoded_bytes)
        except InvalidImageError as error:
            raise RequestError(_status_of(str(error)), f"image {position}: {error}") from None
        pixels.append(np.asarray(to_mode(fit_square(decoded.image, size), "RGB"), dtype=np.uint8))
    return np.stack(pixels)


def _status_of(reason: str) -> int:
    if reason.startswith("not a recognised image format"):
        return 415
    if reason.startswith("image too large"):
        return 413
    return 400
