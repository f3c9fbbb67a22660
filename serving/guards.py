"""Budgets the service keeps whatever a client does: the request body, and how much work runs at once.

`BodyGuard` holds every request body to a byte cap counted as the bytes arrive
(a chunked upload, or one whose Content-Length lies, has no size to check up
front) and to a time limit (a body shorter than its Content-Length would
otherwise be waited for forever), and all bodies together to one
`MemoryBudget`: each cap alone would still let 64 connections hold 64 bodies
of 63 MiB each (4 GB), so a body whose bytes do not fit the budget left gets
503 before it is read. `Gate` bounds the decodes and searches in
flight: a few run, a bounded number wait, the rest get 503 with Retry-After at
once instead of a thread each. What must hold before a request reaches the app
(its head) is `serving.protocol`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.payloads import RequestError


class MemoryBudget:
    """Bytes of request bodies this server process holds at once, across every connection.

    A request reserves its body's bytes before reading them (its Content-Length,
    or chunk by chunk as a chunked body arrives) and releases them when its
    response is done. One event loop serves them all, so no lock is needed.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used = max(0, self.used - size)

    def refusal(self, size: int) -> RequestError:
        return RequestError(
            503,
            f"request bodies in flight hold {self.used:,} of {self.limit:,} bytes; this one's {size:,} do not fit, "
            "retry later",
            close=True,
        )


class BodyGuard:
    """Pure ASGI middleware: the app reads the body through a `receive` that refuses past the budgets.

    Past ``max_bytes`` or ``timeout_s`` the wrapped ``receive`` raises `RequestError` (413 or 408, with
    ``close``) before the app sees another byte, so nothing more is buffered; the service answers it as
    JSON and the server closes the connection instead of reading the rest. A body whose bytes do not fit
    ``budget`` gets 503 (with ``close``) the same way, before its first byte is read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, budget: MemoryBudget) -> None:
        self.app, self.max_bytes, self.timeout_s, self.budget = app, max_bytes, timeout_s, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        reader = _BodyReader(receive, self.max_bytes, self.timeout_s, declared, self.budget)
        has_body = bool(declared) or _is_chunked(scope)

        async def send_closing_if_unread(message: Message) -> None:
            """An answer given before the body was read (415, 404, 503...) closes the connection: the unread
            rest of the body would otherwise be parsed as the next request's head."""
            if message["type"] == "http.response.start" and has_body and not reader.complete:
                headers = [(name, value) for name, value in message.get("headers", []) if name != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, reader.receive, send_closing_if_unread)
        finally:
            reader.release()


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


def _is_chunked(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" and b"chunked" in value.lower() for name, value in scope["headers"])


class _BodyReader:
    """One request's body budget: bytes so far, and a deadline set by the app's first read."""

    def __init__(
        self, receive: Receive, max_bytes: int, timeout_s: float, declared: int | None, budget: MemoryBudget
    ) -> None:
        self._receive, self.max_bytes, self.timeout_s, self.declared = receive, max_bytes, timeout_s, declared
        self.budget, self.reserved = budget, 0
        self.received = 0
        self.complete = False
        self.deadline: float | None = None

    def _reserve(self, size: int) -> None:
        """Hold ``size`` more bytes of the budget for this body, or refuse it (503) before reading them."""
        if size > self.reserved:
            if not self.budget.reserve(size - self.reserved):
                raise self.budget.refusal(size)
            self.reserved = size

    def release(self) -> None:
        self.budget.release(self.reserved)
        self.reserved = 0

    async def receive(self) -> Message:
        if self.complete:  # after the body the app only waits for a disconnect: not ours to time
            return await self._receive()
        if self.declared is not None and self.declared > self.max_bytes:
            raise self._too_large(f"request body of {self.declared:,} bytes")
        if self.declared:
            self._reserve(self.declared)  # the whole body, before its first byte is read
        loop = asyncio.get_running_loop()
        self.deadline = self.deadline or loop.time() + self.timeout_s
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self.deadline - loop.time()))
        except asyncio.TimeoutError:
            reason = f"request body not received within {self.timeout_s:g} s"
            raise RequestError(408, reason, close=True) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise self._too_large("request body")
            self._reserve(self.received)  # a chunked body (or one longer than it said), as it arrives
            self.complete = not message.get("more_body", False)
        return message

    def _too_large(self, what: str) -> RequestError:
        return RequestError(413, f"{what} exceeds the limit of {self.max_bytes:,} bytes", close=True)


class Gate:
    """At most ``slots`` holders at once and ``queue`` more waiting; beyond that, `RequestError` 503 at once.

    A `Service` owns one per kind of work, so limits belong to the app instance, not the process.
    """

    def __init__(self, what: str, slots: int, queue: int) -> None:
        self.what, self.slots, self.queue = what, slots, queue
        self._semaphore = asyncio.Semaphore(slots)
        self.waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore.locked() and self.waiting >= self.queue:
            reason = f"overloaded: {self.slots} {self.what} running and {self.queue} waiting; retry later"
            raise RequestError(503, reason)
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()
