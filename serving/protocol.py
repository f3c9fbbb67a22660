"""The HTTP/1.1 connection under the app: the limits that must hold before a request reaches it.

uvicorn's httptools protocol bounds nothing before the app runs: one 100 MiB
header is buffered whole (13 s with the event loop blocked), any number of
headers is accepted, a client that trickles its request head, or opens a
connection and sends nothing, holds it forever (the keep-alive timeout is
re-armed only after a response), and its own refusals are plain text.
`GuardedHttpToolsProtocol` adds, per connection: a cap on the bytes and the
number of headers of a request head (431), a deadline for the head once a
connection opens or a request's first byte arrives (408, or a silent close for a
connection that sent nothing), a cap on open connections (503), a write timeout
(a connection whose client stops reading is dropped once its unsent bytes have
not drained for ``write_timeout_s``, freeing its slot: 40 clients that pipeline
requests and never read would otherwise hold every slot for ever), and JSON
bodies for all of those and for malformed requests (400). `mocoplus serve`
hands it to uvicorn with `protocol_factory`.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from serving.limits import ConnectionLimits

RETRY_AFTER_SECONDS = 1  # what every 503, the app's and the connection's, tells a client to wait


class _HeadRefusedError(Exception):
    """Raised from a parser callback to stop parsing; `GuardedHttpToolsProtocol.send_400_response` answers it."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `ConnectionLimits` (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._head_timer: asyncio.TimerHandle | None = None  # armed while a request head is awaited
        self._write_timer: asyncio.TimerHandle | None = None  # armed while unsent bytes wait for the client to read
        self._head_bytes = 0
        self._head_begun = False  # a request line has started since the head was awaited
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._in_body = False  # between a request's last header and its end: only body and framing expected
        self._after_head = 0  # bytes received since the head ended (an overcount by at most the head's own)
        self._body_total = 0  # of which body, as httptools passed it on

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, f"too many connections (the limit is {self.limits.max_connections}); retry later")
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        self._writes_drained()
        super().connection_lost(exc)

    # -- the write timeout: a client must keep reading what it asked for --

    def pause_writing(self) -> None:
        """The transport's buffer passed its high-water mark: the client has stopped reading, for now."""
        super().pause_writing()
        self._await_drain()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._writes_drained()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._await_drain_after_close()

    def _await_drain(self) -> None:
        if self._write_timer is None and not self.transport.is_closing():
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s, self._write_timed_out)

    def _await_drain_after_close(self) -> None:
        """A closed transport stays open until its buffer is sent: a client that never reads would keep its slot."""
        if self.transport.is_closing() and self.transport.get_write_buffer_size() and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout_s, self._write_timed_out)

    def _writes_drained(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        """Nothing drained for `write_timeout_s`: drop the connection (unsent bytes too) and free its slot."""
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        self.logger.info(
            "%s: dropped after %gs without reading its response (%s bytes unsent)",
            client,
            self.limits.write_timeout_s,
            f"{unsent:,}",
        )
        self.transport.abort()  # connection_lost follows: the app's pending send is released, the slot freed

    def data_received(self, data: bytes) -> None:
        """Count the bytes httptools would buffer without a bound: a request head while one is awaited, and
        what arrives inside a message that is not body — chunk framing (a few bytes a chunk) and a chunked
        request's trailers, headers after the body that httptools collects whole."""
        awaiting = self._head_timer is not None
        super().data_received(data)
        if self.transport.is_closing():
            return
        if awaiting and self._head_timer is not None:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(431, f"request head exceeds {self.limits.max_head_bytes:,} bytes")
        if self._in_body:  # still inside a message: this call's bytes, minus body, are framing or trailers
            self._after_head += len(data)
            framing = self._after_head - self._body_total
            allowed = 2 * self.limits.max_head_bytes + self._body_total // 16  # the head's share, trailers, chunks
            if framing > allowed:
                self._refuse(431, f"request trailers or chunk framing exceed {self.limits.max_head_bytes:,} bytes")

    def on_body(self, body: bytes) -> None:
        self._body_total += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a pipelined request, or one after a response on a keep-alive connection
            self._await_head()
        self._head_begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, f"more than {self.limits.max_headers} request headers")
            raise _HeadRefusedError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_received()
        self._in_body, self._after_head, self._body_total = True, 0, 0
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_drain_after_close()  # a ``Connection: close`` response still unsent
        idle = self.cycle is None or self.cycle.response_complete  # no pipelined request started instead
        if idle and not self.transport.is_closing():
            self._await_head()

    def send_400_response(self, msg: str) -> None:
        """httptools stopped: a malformed request (400), or a callback's `_HeadRefusedError`; JSON either way."""
        status, reason = self._refusal or (400, "malformed HTTP request")
        self._refuse(status, reason)

    def _await_head(self) -> None:
        self._head_received()
        self._head_bytes, self._head_begun, self._header_count = 0, False, 0
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_begun:
            self.transport.close()  # nothing to answer: no request was started (an idle or silent connection)
            self._await_drain_after_close()
            return
        self._refuse(408, f"request head not received within {self.limits.head_timeout_s:g} s")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` with a JSON ``{"error": reason}`` and close, without the app."""
        self._head_received()
        if self.transport.is_closing():
            return
        body = json.dumps({"error": reason}).encode()
        headers = [*self.server_state.default_headers, (b"content-type", b"application/json")]
        headers += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        if status == 503:
            headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        self.transport.write(STATUS_LINE[status] + head + b"\r\n" + body)
        self.transport.close()
        self._await_drain_after_close()


def protocol_factory(limits: ConnectionLimits) -> Callable[..., GuardedHttpToolsProtocol]:
    """What to pass as uvicorn's ``http=``: picklable, so ``--workers`` processes get it too."""
    return functools.partial(GuardedHttpToolsProtocol, limits=limits)
