"""Helpers for tests that start real servers: a free loopback port, `mocoplus serve`, stopping by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s: always by the process's own pid."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_server(*args: str, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`mocoplus serve` on a free port; its output to a pipe, or to ``log`` for a server that answers many
    requests (its access log would fill a pipe nobody reads, and the server would block writing)."""
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", *args, "--port", str(port)]
    with open(log, "w") if log else open(os.devnull) as sink:
        output = sink if log else subprocess.PIPE
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1]
        )
    return process, f"http://127.0.0.1:{port}"


def wait_listening(process: subprocess.Popen, url: str, seconds: float = 90) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.stdout.read() if process.stdout else "the server exited (see its log)"
        try:
            if client.get("/readyz").status_code == 200:
                return client
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.1)
