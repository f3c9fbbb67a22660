"""Scale: IVF-PQ index bundles of 1M, 3M and 10M synthetic vectors built on this machine, and served.

Why: a corpus outgrows the demo long before it outgrows one machine, and the
claims that matter at that size — the build fits in memory, recall holds,
time grows linearly, the service does not hold the key count in memory —
only show at size. Each corpus goes through the real path: an embedding set
on disk (1M-row parts, written a part at a time), then ``mocoplus index
--kind ivfpq --num-shards S --workers W --merge disk`` in a subprocess whose
whole process tree (the workers included) is sampled for resident memory
every second. Recall@10 is the tuned setting's, measured by the build itself
against exact search on held-out corpus vectors (not in the index while it
is tuned); queries/s at that setting, one query batch of 1,000.

The vectors are shaped like embeddings (`bench_index.synthetic`: 16-d
Gaussian codes through a fixed random map, plus noise, unit length), so
neighbours mean something and compression costs what it would on real data.

With ``--model`` (a model bundle whose embedding has the corpus's
dimension), the largest bundle is then served: ``mocoplus serve`` is
started, answers vector and key searches, and its resident memory is read.

    python benchmarks/bench_scale.py --work /tmp/scale                          # 1M, 3M, 10M × 128, 10M × 256
    python benchmarks/bench_scale.py --work /tmp/scale --runs 1000000x128 --model models/photos

Prints one JSON object; ``time_exponent`` is the slope of log(build seconds) over log(n) for the 128-d runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from bench_index import synthetic  # benchmarks/ is the script's folder, first on sys.path
from bench_service import free_port
from harness import emit, environment

from artifacts.atomic import prepare_out_dir
from artifacts.embedding_set import part_name, write_manifest, write_part
from artifacts.model_bundle import ModelBundle

PART_ROWS = 1_000_000
ROOT = Path(__file__).resolve().parents[1]


def write_synthetic_set(folder: Path, n: int, d: int, bundle_hash: str, seed: int) -> Path:
    """``n`` × ``d`` synthetic embeddings as an embedding set, one 1M-row part in memory at a time."""
    folder = prepare_out_dir(folder)
    sources = []
    for index, start in enumerate(range(0, n, PART_ROWS)):
        rows = min(PART_ROWS, n - start)
        block = synthetic(rows, d, intrinsic=16, noise=0.05, seed=seed + index, mixing_seed=seed)
        sources.append(f"synthetic-{index}")
        record = {"source": sources[-1], "source_bytes": None, "bundle_hash": bundle_hash, "dtype": "float32",
                  "dim": d, "count": rows, "keys": [f"v{row}" for row in range(start, start + rows)],
                  "labels": [-1] * rows, "skipped": []}  # fmt: skip
        write_part(folder, index, block, record, fp16=False)
        print(f"  wrote {part_name(index)} ({start + rows:,} of {n:,})", file=sys.stderr)
    write_manifest(folder, sources, ("", bundle_hash, True), d, "float32")
    return folder


class TreeMemory:
    """The peak summed resident memory of a process and all its descendants, sampled every ``interval`` s.

    Each sample walks /proc: every 0.2 s it cost a quarter of a core, which the build would lose.
    """

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.root, self.interval, self.peak, self.peak_processes = psutil.Process(pid), interval, 0, 0
        self.peak_anon = 0  # the heap alone: the rest of RSS is mapped file pages (parts, the merged lists)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
                total = anon = 0
                for process in tree:
                    with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):  # ended since the listing
                        total += process.memory_info().rss
                        anon += resident_kinds(process.pid).get("anon_after_bytes", 0)
                if total > self.peak:
                    self.peak, self.peak_processes = total, len(tree)
                self.peak_anon = max(self.peak_anon, anon)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def build(embeddings: Path, out: Path, args: argparse.Namespace) -> tuple[dict[str, Any], float, TreeMemory]:
    """``mocoplus index`` on ``embeddings`` in a subprocess: its index.json, wall seconds and memory."""
    command = [sys.executable, "-m", "flows.cli", "index", str(embeddings), "--out", str(out), "--kind", "ivfpq",
               "--num-shards", str(args.num_shards), "--workers", str(args.workers), "--merge", args.merge,
               "--json", "--no-progress"]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    memory.stop()
    if process.returncode != 0:
        raise SystemExit(f"mocoplus index failed: {stderr.strip()[-2000:]}")
    return json.loads(stdout), seconds, memory


def serve(model: str, index: Path, keys: list[str], d: int, queries: int) -> dict[str, Any]:
    """Serve ``index``, search it by vector and by key, and read the server's resident memory."""
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", "--model", model, "--index", str(index), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < 600:
            if process.poll() is not None:
                raise SystemExit(f"mocoplus serve exited: {process.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        ready_seconds = time.perf_counter() - started
        idle = psutil.Process(process.pid).memory_info().rss
        rng = np.random.default_rng(1)
        clock = time.perf_counter()
        for _ in range(queries):
            vector = rng.standard_normal(d).astype(np.float32)
            vector /= np.linalg.norm(vector)
            found = post(f"{url}/v1/search", {"vectors": [vector.tolist()], "k": 10})
            assert len(found["results"][0]["hits"]) == 10, found
        vector_qps = queries / (time.perf_counter() - clock)
        for key in keys:
            found = post(f"{url}/v1/search", {"key": key, "k": 10})
            assert found["results"][0]["hits"], (key, found)
        info = psutil.Process(process.pid).memory_full_info()
        return {"ready_seconds": round(ready_seconds, 1), "rss_idle_bytes": idle, "rss_after_bytes": info.rss,
                "uss_after_bytes": info.uss, **resident_kinds(process.pid), "vector_searches": queries,
                "key_searches": len(keys), "vector_search_per_s_one_client": round(vector_qps, 1)}  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=60)


def resident_kinds(pid: int) -> dict[str, int]:
    """Resident bytes by kind (/proc/PID/status): anonymous (the heap: what the process holds) and file-backed
    (mapped index and id-map pages: page cache the kernel may drop and read again)."""
    kinds = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            kinds[f"{name[3:].lower()}_after_bytes"] = int(value.split()[0]) * 1024
    return kinds


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def run_one(n: int, d: int, args: argparse.Namespace, bundle_hash: str) -> dict[str, Any]:
    work = Path(args.work) / f"{n}x{d}"
    recorded = work / "result.json"
    if args.reuse_builds and recorded.exists() and (work / "index" / "current").exists():
        print(f"{n:,} × {d}: reusing the build measured in {recorded}", file=sys.stderr)
        return json.loads(recorded.read_text())
    embeddings = work / "embeddings"
    if not (embeddings / "manifest.json").exists():
        shutil.rmtree(embeddings, ignore_errors=True)
        clock = time.perf_counter()
        write_synthetic_set(embeddings, n, d, bundle_hash, args.seed)
        print(f"{n:,} × {d}: embedding set written in {time.perf_counter() - clock:.0f} s", file=sys.stderr)
    out = work / "index"
    shutil.rmtree(out, ignore_errors=True)
    info, seconds, memory = build(embeddings, out, args)
    report = info["recall_at_k"]
    result = {
        "n": n, "d": d, "factory": info["factory"], "seconds": round(seconds, 1),
        "build": {name: value for name, value in info["build"].items() if name.endswith("_seconds")},
        "peak_rss_bytes": memory.peak, "peak_rss_gib": round(memory.peak / 2**30, 2),
        "peak_anon_gib": round(memory.peak_anon / 2**30, 2),
        "processes_at_peak": memory.peak_processes,
        "recall_at_10": report["recall"], "nprobe": info["search"]["params"].get("nprobe"),
        "qps": round(report["qps"], 1), "exact_qps": round(report["exact_qps"] or 0, 2),
        "bundle_bytes": sum(path.stat().st_size for path in (out / "current").resolve().iterdir()),
        "merge": info["build"]["merge"], "parts": len(info["build"].get("parts") or []),
    }  # fmt: skip
    print(json.dumps(result), file=sys.stderr)
    recorded.write_text(json.dumps(result) + "\n")
    return result


def exponent(points: list[tuple[int, float]]) -> float | None:
    """The least-squares slope of log(seconds) over log(n)."""
    if len(points) < 2:
        return None
    x = np.log([n for n, _ in points])
    y = np.log([seconds for _, seconds in points])
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the embedding sets and bundles (tens of GB)")
    parser.add_argument("--runs", default="1000000x128,3000000x128,10000000x128,10000000x256")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--merge", default="disk", choices=["auto", "memory", "disk"])
    parser.add_argument("--model", help="a model bundle of the corpus's dimension: serve the largest bundle with it")
    parser.add_argument("--queries", type=int, default=200, help="vector searches sent to the service")
    parser.add_argument("--keep", action="store_true", help="keep the embedding sets and bundles")
    parser.add_argument(
        "--reuse-builds", action="store_true", help="with --keep: a kept run (bundle and result.json) is not rebuilt"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = [tuple(int(value) for value in run.split("x")) for run in args.runs.split(",")]
    model = ModelBundle(args.model) if args.model else None
    if model is not None and any(d != model.dim for _, d in runs[-1:]):
        raise SystemExit(f"--model embeds {model.dim}-d vectors; the last run to be served is {runs[-1][1]}-d")
    bundle_hash = model.hash if model is not None else "synthetic"
    results = [run_one(n, d, args, bundle_hash) for n, d in runs]
    served = None
    if model is not None:
        n, d = runs[-1]
        keys = [f"v{row}" for row in np.random.default_rng(2).choice(n, size=20, replace=False)]
        index = Path(args.work) / f"{n}x{d}" / "index"
        served = {"n": n, "d": d, **serve(str(args.model), index, keys, d, args.queries)}
    linear = [(result["n"], result["seconds"]) for result in results if result["d"] == 128]
    if not args.keep:
        for n, d in runs:
            shutil.rmtree(Path(args.work) / f"{n}x{d}", ignore_errors=True)
    slope = exponent(linear)
    emit(
        {
            "benchmark": "scale",
            "environment": environment(),
            "settings": {"num_shards": args.num_shards, "workers": args.workers, "merge": args.merge},
            "runs": results,
            "time_exponent": None if slope is None or math.isnan(slope) else round(slope, 3),
            "served": served,
        }
    )


if __name__ == "__main__":
    main()
