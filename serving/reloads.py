"""What starts a `serving.service.Service.reload`: SIGHUP, and a poll of the bundles with ``--watch``."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from serving.service import Service

log = logging.getLogger("uvicorn.error")


class ReloadTriggers:
    """What starts a `Service.reload`: SIGHUP (where this process's event loop can take signals) and, with
    ``watch_s``, a poll of the bundles' fingerprints every ``watch_s`` seconds."""

    def __init__(self, service: Service, watch_s: float | None) -> None:
        self.service, self.watch_s = service, watch_s
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signal = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._spawn, "SIGHUP")
            self._signal = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no signals
            log.debug("SIGHUP reloads are not available in this process")
        if self.watch_s:
            self._tasks.add(loop.create_task(self._watch(self.watch_s)))

    def stop(self) -> None:
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in self._tasks:
            task.cancel()

    def _spawn(self, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self.service.reload(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            if self.service.ready and await asyncio.to_thread(self.service.bundles_changed):
                await self.service.reload("the bundles changed")
