"""What one request and one connection may cost: the service's budgets, each with its `mocoplus serve` option.

`Limits` are checked by the app (`serving.payloads`, `serving.guards`,
`serving.service`), `ConnectionLimits` by the HTTP protocol before the app
sees a request (`serving.protocol`). Each setting's help is beside its
default (`artifacts.settings.Help`): ``mocoplus serve --help`` is built from
them, and docs/service.md, "Limits", lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated

from artifacts.settings import Help


@dataclass(frozen=True)
class Limits:
    """What one request may cost; docs/service.md, "Limits", lists them with their `mocoplus serve` flags."""

    max_images: Annotated[int, Help("Most images in one request (and query vectors in one search).")] = 64
    max_image_bytes: Annotated[int, Help("Most bytes of one image file.", byte_size=True)] = 16 << 20
    max_body_bytes: Annotated[  # counted as received, whatever Content-Length says
        int, Help("Most request body bytes, as received.", byte_size=True)
    ] = 64 << 20
    body_timeout_s: Annotated[  # from the app's first read
        float, Help("Seconds a request body may take to arrive.")
    ] = 60.0
    max_request_memory: Annotated[  # per server process
        int, Help("Most request body bytes held at once, all connections together; beyond, 503.", byte_size=True)
    ] = 512 << 20
    max_pixels: Annotated[int, Help("Most pixels of one image, from its header (decompression bombs).")] = 40_000_000
    max_decoded_bytes: Annotated[  # width × height × bytes per pixel, from the header
        int, Help("Most bytes one image may decode to.", byte_size=True)
    ] = 64 << 20
    max_k: Annotated[int, Help("Largest k of a search.")] = 1000
    max_effort: Annotated[int, Help("Largest nprobe / efSearch a search may ask for.")] = 65536
    max_search_work: Annotated[int, Help("Most queries × k × nprobe/ef in one search.")] = 1 << 24
    max_json_depth: Annotated[int, Help("Deepest nesting of a JSON body.")] = 32
    max_json_tokens: Annotated[  # about two per value: bounds the parse
        int, Help('Most JSON punctuation marks ([]{}",:) in a body.')
    ] = 1 << 19
    max_concurrent_decodes: Annotated[int, Help("Requests decoding images at once.")] = 4
    max_concurrent_searches: Annotated[int, Help("Searches running at once.")] = 4
    max_waiting: Annotated[int, Help("Requests waiting for a decode or search slot (each); beyond, 503.")] = 64

    def __post_init__(self) -> None:
        for limit in fields(self):
            if not getattr(self, limit.name) > 0:
                raise ValueError(f"limit {limit.name} must be > 0; got {getattr(self, limit.name)!r}")
        if self.max_request_memory < self.max_body_bytes:
            raise ValueError(
                f"max_request_memory ({self.max_request_memory:,}) must hold at least one body of max_body_bytes "
                f"({self.max_body_bytes:,})"
            )


@dataclass(frozen=True)
class ConnectionLimits:
    max_head_bytes: Annotated[  # a chunk more may be parsed before the check
        int, Help("Most bytes of a request line and headers.", byte_size=True)
    ] = 64 << 10
    max_headers: Annotated[int, Help("Most headers in one request.")] = 100
    head_timeout_s: Annotated[  # from the connection's opening, or a request's first byte, to its last header
        float, Help("Seconds a request head may take to arrive.")
    ] = 10.0
    keep_alive_s: Annotated[  # uvicorn's timeout_keep_alive
        int, Help("Seconds an idle keep-alive connection stays open.")
    ] = 5
    max_connections: Annotated[int, Help("Open connections per server process; beyond, 503.")] = 1024
    write_timeout_s: Annotated[
        float, Help("Seconds unsent response bytes may wait for the client to read; then it is dropped.")
    ] = 30.0

    def __post_init__(self) -> None:
        if (
            min(
                self.max_head_bytes,
                self.max_headers,
                self.head_timeout_s,
                self.keep_alive_s,
                self.max_connections,
                self.write_timeout_s,
            )
            <= 0
        ):
            raise ValueError(f"connection limits must be > 0; got {self}")
