"""The service under load: micro-batching against batch-1 serving, side by side in one run.

Why: dynamic micro-batching is what lets one ONNX Runtime session keep up
with many clients; this measures how much it buys and checks that load plus
hostile input never produces a 5xx. For each setting, a real `mocoplus serve`
process is started on 127.0.0.1 and a load generator (asyncio + httpx, in
this process) runs ``--clients`` concurrent clients sending ``--requests``
one-image ``/v1/embed`` requests, ``--bad-share`` of them malformed (random
bytes, a truncated PNG, broken JSON, an empty image list). Reported per
setting: throughput (all requests / wall time), p50/p95/p99 latency of the
good requests, status counts, the largest batch seen in ``/metrics``.

    python benchmarks/bench_service.py --model models/fmnist --data shards/fmnist-test

The load generator shares the machine's cores with the server; on 2 cores
that caps both settings alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from harness import emit, environment  # benchmarks/ is the script's folder, first on sys.path

SETTINGS = {"micro-batching": ["--max-batch", "64", "--max-wait-ms", "5"], "batch-1": ["--max-batch", "1"]}


def corpus_images(data: Path, count: int) -> list[bytes]:
    """Up to ``count`` encoded images from the shards, as clients would upload them."""
    images: list[bytes] = []
    for shard in sorted(Path(data).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.rsplit(".", 1)[-1] in {"png", "jpg", "webp"}:
                    images.append(tar.extractfile(member).read())
                    if len(images) == count:
                        return images
    if not images:
        raise SystemExit(f"no images in {data}")
    return images


def malformed(rng: random.Random, good: bytes) -> dict[str, Any]:
    """One of four hostile requests (httpx keyword arguments)."""
    kind = rng.randrange(4)
    if kind == 0:
        return {"files": [("images", ("x.png", rng.randbytes(200), "image/png"))]}
    if kind == 1:
        return {"files": [("images", ("x.png", good[: len(good) // 2], "image/png"))]}
    if kind == 2:
        return {"content": b'{"images": [', "headers": {"content-type": "application/json"}}
    return {"json": {"images": []}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", "--model", model, "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}: {' '.join(command)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("server never became ready")
        time.sleep(0.2)


async def load(url: str, images: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    plan = [(rng.random() < args.bad_share, rng.choice(images)) for _ in range(args.requests)]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    bad_answered_4xx = bad_total = 0
    position = 0

    async def worker() -> None:
        # one client (one connection) per simulated user: a shared pool with 32 waiters costs more
        # CPU than the server's whole request (356 vs 1,200 requests/s on /healthz here)
        nonlocal position, bad_answered_4xx, bad_total
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while position < len(plan):
                is_bad, image = plan[position]
                position += 1
                kwargs = malformed(rng, image) if is_bad else {"files": [("images", ("q.png", image, "image/png"))]}
                started = time.perf_counter()
                answer = await client.post("/v1/embed", **kwargs)
                statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1
                if is_bad:
                    bad_total += 1
                    bad_answered_4xx += 400 <= answer.status_code < 500
                elif answer.status_code == 200:
                    latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    wall = time.perf_counter() - started
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        metrics = (await client.get("/metrics")).text
    batches = _metric(metrics, "mocoplus_batch_size_count")
    images = _metric(metrics, "mocoplus_batch_size_sum")
    milliseconds = np.percentile(np.array(latencies) * 1000, [50, 95, 99]) if latencies else [None] * 3
    return {
        "requests": len(plan),
        "wall_seconds": round(wall, 2),
        "requests_per_s": round(len(plan) / wall, 1),
        "good_images_per_s": round(len(latencies) / wall, 1),
        "latency_ms": {
            name: round(float(value), 2) for name, value in zip(("p50", "p95", "p99"), milliseconds, strict=True)
        },
        "statuses": dict(sorted(statuses.items())),
        "malformed": bad_total,
        "malformed_answered_4xx": bad_answered_4xx,
        "server_5xx": sum(count for code, count in statuses.items() if code.startswith("5")),
        "mean_batch": round(images / batches, 2) if batches else None,  # over the server's life, warm-up included
    }


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model bundle (from mocoplus export)")
    parser.add_argument("--data", required=True, help="a shard folder to take request images from")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--bad-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = corpus_images(Path(args.data), 512)
    results = {}
    for name, extra in SETTINGS.items():
        process, url = start_server(args.model, extra)
        try:
            asyncio.run(load(url, images, args))  # warm-up: connections, caches, the first batches
            results[name] = asyncio.run(load(url, images, args))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    batched, single = results["micro-batching"], results["batch-1"]
    report = {
        "benchmark": "service",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "clients": args.clients,
        "requests": args.requests,
        "bad_share": args.bad_share,
        "settings": {name: " ".join(extra) for name, extra in SETTINGS.items()},
        "results": results,
        "throughput_ratio": round(batched["requests_per_s"] / single["requests_per_s"], 2),
        "targets": {
            "no_5xx": batched["server_5xx"] == single["server_5xx"] == 0,
            "malformed_all_4xx": all(r["malformed"] == r["malformed_answered_4xx"] for r in results.values()),
            "ratio_at_least_3": batched["requests_per_s"] >= 3 * single["requests_per_s"],
        },
        "environment": environment(),
    }
    emit(report)


if __name__ == "__main__":
    main()
