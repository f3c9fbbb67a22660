"""What this machine's measured scale figures predict for a billion images (docs/scale.md's numbers).

Reads the JSON of `bench_scale.py` and computes, for ``--n`` vectors split
into index shards of ``--shard-vectors`` each (one shard per serving machine),
from the largest run of dimension ``--d`` (its phases' seconds, bytes and memory):

- the build of one shard: training as measured (from 10M vectors at 128-d
  the planner's nlist, 16,384, and training sample, 1M vectors = the 512 MiB
  cap, no longer grow, so training costs the same), adding, merging and
  tuning in proportion to the vectors; then divided by ``--cores`` over the
  cores measured (an assumption, said so in the output: FAISS's k-means,
  assignment and PQ encoding are OpenMP loops);
- a shard's bundle bytes (index + id map, per vector as measured) and the
  embeddings it is built from (``4·d`` bytes a vector, or ``2·d`` in float16);
- the build's peak memory: the heap (anonymous) in proportion to the vectors
  (an upper bound: part of it is the fixed training sample), the mapped file
  pages (parts and merged lists: page cache the kernel can drop) likewise;
- the service's resident memory as measured, and if a search had paged in
  every list of the shard;
- search: queries/s per shard, scaled by the codes a query scans (nprobe ×
  vectors per list) and by cores;
- the embedding: ``--n / --images-per-s`` worker-seconds (one worker's rate:
  pass a GPU's from `benchmarks/gpu_check.sh` once one has been measured; the
  default is this machine's `cifar-resnet18` end-to-end rate, 2 cores).

    python benchmarks/plan_billion.py --scale scale.json
    python benchmarks/plan_billion.py --scale scale.json --shard-vectors 50000000 --cores 32 --images-per-s 4000

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from harness import emit

from pipeline.index.plan import plan_index

DAY = 86_400
LARGEST_FIELDS = ("n", "d", "factory", "seconds", "recall_at_10", "nprobe", "qps")


def plan(scale: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    runs = [run for run in scale["runs"] if run["d"] == args.d]
    if not runs:
        raise SystemExit(f"--scale holds no {args.d}-d run")
    largest = max(runs, key=lambda run: run["n"])
    cores_measured = scale["environment"].get("usable_cores") or scale["environment"].get("cpu_count") or 2
    budget = int(args.memory_budget_gib * 2**30)
    shard_plan = plan_index(int(args.shard_vectors), args.d, kind="ivfpq", memory_budget=budget)
    growth = args.shard_vectors / largest["n"]
    phases = largest["build"]
    scaling = phases.get("add_seconds", 0) + phases.get("merge_seconds", 0) + phases.get("tune_seconds", 0)
    shard_seconds = phases.get("train_seconds", 0) + scaling * growth
    speedup = args.cores / cores_measured
    shards = math.ceil(args.n / args.shard_vectors)
    anon = largest.get("peak_anon_gib")
    served = scale.get("served") or {}
    per_list_now = largest["n"] / _nlist(largest["factory"])
    per_list_then = args.shard_vectors / (shard_plan.nlist or 1)
    inputs = {"n": args.n, "shard_vectors": args.shard_vectors, "d": args.d, "cores": args.cores,
              "images_per_s": args.images_per_s, "cores_measured": cores_measured,
              "memory_budget_gib": args.memory_budget_gib,
              "largest_run": {name: largest[name] for name in LARGEST_FIELDS}}  # fmt: skip
    return {
        "inputs": inputs,
        "shards": shards,
        "shard_factory": shard_plan.factory,
        "same_lists_as_measured": shard_plan.factory == largest["factory"],
        "per_shard": {
            "build_hours_on_measured_cores": round(shard_seconds / 3600, 2),
            "build_hours_on_cores": round(shard_seconds / speedup / 3600, 2),
            "assumes": "build and search speed grow linearly with cores (measured here on 2 only)",
            "build_peak_heap_gib_at_most": round(anon * growth, 1) if anon is not None else None,
            "build_peak_mapped_files_gib": round((largest["peak_rss_gib"] - (anon or 0)) * growth, 1),
            "bundle_gib": round(largest["bundle_bytes"] * growth / 2**30, 1),
            "embeddings_gib_float32": round(4 * args.d * args.shard_vectors / 2**30, 1),
            "embeddings_gib_float16": round(2 * args.d * args.shard_vectors / 2**30, 1),
            "service_measured": {name: served.get(name) for name in ("n", "rss_after_bytes", "anon_after_bytes")},
            "service_if_every_list_paged_gib": round(largest["bundle_bytes"] * growth / 2**30, 1),
            "vectors_per_list_measured": round(per_list_now),
            "vectors_per_list": round(per_list_then),
            "qps_at_same_nprobe": round(largest["qps"] * per_list_now / per_list_then * speedup, 1),
        },
        "whole": {
            "bundle_tib": round(largest["bundle_bytes"] * args.n / largest["n"] / 2**40, 2),
            "embeddings_tib_float16": round(2 * args.d * args.n / 2**40, 2),
            "build_machine_hours": round(shards * shard_seconds / speedup / 3600, 1),
            "embed_worker_days": round(args.n / args.images_per_s / DAY, 1),
        },
    }


def _nlist(factory: str) -> int:
    return next(int(part[3:]) for part in factory.split(",") if part.startswith("IVF"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", required=True, help="the JSON bench_scale.py printed")
    parser.add_argument("--n", type=float, default=1e9)
    parser.add_argument("--shard-vectors", type=float, default=1e8, help="vectors per index shard (per machine)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--cores", type=int, default=16, help="cores of a machine building one shard")
    parser.add_argument("--memory-budget-gib", type=float, default=16, help="a shard's --memory-budget")
    parser.add_argument("--images-per-s", type=float, default=196.0, help="one embedding worker's rate")
    args = parser.parse_args()
    emit(plan(json.loads(Path(args.scale).read_text()), args))


if __name__ == "__main__":
    main()
