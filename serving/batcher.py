"""Dynamic micro-batching: many clients' images, one ONNX Runtime call.

A request's images wait in a bounded queue; one worker task takes the first
waiting request, keeps collecting until the batch holds ``max_batch`` images
or ``max_wait_ms`` have passed since it started, and runs the model on the
whole batch in a thread, off the event loop. A request never straddles two
batches unless it alone holds more than ``max_batch`` images (then it is cut
into ``max_batch`` pieces). Only decoded, validated arrays reach the queue, so
one client's bad image can never fail the batch it would have shared.

The queue is bounded in images: a request that would overfill it is refused
at once (`QueueFullError`, which the service answers 503 with ``Retry-After``)
instead of waiting behind an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np

from artifacts.settings import Help


class QueueFullError(RuntimeError):
    """The batcher's queue cannot take this request's images now."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: Annotated[int, Help("Most images per ONNX Runtime call.")] = 64
    max_wait_ms: Annotated[float, Help("Longest a batch waits to fill, in milliseconds.")] = 5.0
    max_queue: Annotated[int, Help("Most images waiting, across requests; beyond, 503.")] = 1024

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError("need max_batch >= 1, max_queue >= 1 and max_wait_ms >= 0")


@dataclass
class _Request:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    """What one model call did: for the metrics."""

    size: int
    requests: int
    queue_waits: tuple[float, ...]  # seconds each request waited before its batch ran
    inference_seconds: float


class MicroBatcher:
    """``await batcher.embed(images)`` from any number of coroutines; ``start``/``stop`` around serving."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        config: BatcherConfig = BatcherConfig(),
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
    ) -> None:
        self._run, self.config, self._on_batch = run, config, on_batch
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._waiting = 0  # images queued, not yet taken into a batch
        self._carry: _Request | None = None
        self._getter: asyncio.Future[_Request] | None = None

    @property
    def depth(self) -> int:
        """Images waiting for a batch."""
        return self._waiting

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._serve(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker."""
        if self._queue is not None and self._worker is not None:
            await self._queue.join()
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            if self._getter is not None:
                self._getter.cancel()
        self._executor.shutdown(wait=True)

    async def embed(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[N, D]`` for uint8 ``[N, H, W, 3]``, computed in some batch with other requests' images."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if self._waiting + len(images) > self.config.max_queue:
            raise QueueFullError(f"{self._waiting} images already queued (limit {self.config.max_queue})")
        step = self.config.max_batch
        pieces = [images[start : start + step] for start in range(0, len(images), step)]
        loop = asyncio.get_running_loop()
        futures = []
        for piece in pieces:
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._waiting += len(piece)
            self._queue.put_nowait(_Request(piece, future))
            futures.append(future)
        results = await asyncio.gather(*futures)
        return np.concatenate(results) if len(results) > 1 else results[0]

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(timeout=None)
            assert first is not None
            batch, size = [first], len(first.images)
            deadline = time.perf_counter() + self.config.max_wait_ms / 1000
            while size < self.config.max_batch:
                request = await self._next(timeout=max(0.0, deadline - time.perf_counter()))
                if request is None:
                    break
                if size + len(request.images) > self.config.max_batch:
                    self._carry = request  # first in the next batch: keeps arrival order
                    break
                batch.append(request)
                size += len(request.images)
            self._waiting -= size
            started = time.perf_counter()
            try:
                vectors = await loop.run_in_executor(
                    self._executor, self._run, np.concatenate([request.images for request in batch])
                )
            except Exception as error:  # the model failed (a bug, not bad input): every request in it learns so
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
            else:
                offset = 0
                for request in batch:
                    if not request.future.done():  # a client that went away leaves a cancelled future
                        request.future.set_result(vectors[offset : offset + len(request.images)])
                    offset += len(request.images)
            finally:
                for _ in batch:
                    self._queue.task_done()
            waits = tuple(started - request.enqueued for request in batch)
            self._on_batch(BatchStats(size, len(batch), waits, time.perf_counter() - started))

    async def _next(self, timeout: float | None) -> _Request | None:
        """The next request, or None after ``timeout`` seconds.

        A ``queue.get`` that times out is kept for the next call rather than
        cancelled, so no request can be lost between a get and a timeout.
        """
        assert self._queue is not None
        if self._carry is not None:
            request, self._carry = self._carry, None
            return request
        if self._getter is None:
            if not self._queue.empty():
                return self._queue.get_nowait()
            self._getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        request, self._getter = self._getter.result(), None
        return request
