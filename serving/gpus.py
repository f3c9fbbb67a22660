"""Which GPU a `mocoplus serve --workers N` process embeds on: worker slots spread over the visible GPUs.

uvicorn starts its worker processes without telling them their number, so
each claims one: the parent makes a folder of N slot files, and a worker holds
an exclusive ``flock`` on the first free one for as long as it lives (a worker
that dies frees its slot for the one uvicorn starts in its place). Worker
slot i embeds on GPU ``i mod count``, the count read from the CUDA driver
(``libcuda``, so ``CUDA_VISIBLE_DEVICES`` applies) without torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
from pathlib import Path
from typing import IO

SLOTS_ENV = "MOCOPLUS_SERVE_SLOTS"  # the slot folder `mocoplus serve --workers N` hands to its workers

_held: list[IO[bytes]] = []  # the claimed slot files, open for the life of the process


def make_slots(folder: Path, count: int) -> Path:
    """``count`` empty slot files in ``folder`` (created if need be)."""
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(count):
        (folder / f"slot-{slot}").touch()
    return folder


def claim_slot(folder: Path) -> int:
    """The number of the first slot in ``folder`` no live process holds; held until this process exits."""
    slots = sorted(folder.glob("slot-*"), key=lambda path: int(path.name.removeprefix("slot-")))
    for path in slots:
        handle = path.open("rb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held.append(handle)
        return int(path.name.removeprefix("slot-"))
    raise RuntimeError(f"all {len(slots)} worker slots in {folder} are taken")


def cuda_device_count() -> int:
    """Visible CUDA devices by the driver API (0 without a driver or a GPU); torch is never imported here."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def device_for_slot(slot: int, device_count: int) -> int:
    """Worker slot ``slot`` → its GPU: round robin over ``device_count`` (GPU 0 when none is counted)."""
    return slot % device_count if device_count > 0 else 0


def worker_device(default: int = 0) -> int:
    """This worker's GPU: from its claimed slot under `SLOTS_ENV`, else ``default`` (a single process)."""
    folder = os.environ.get(SLOTS_ENV)
    if not folder:
        return default
    with contextlib.suppress(OSError, RuntimeError):
        return device_for_slot(claim_slot(Path(folder)), cuda_device_count())
    return default
