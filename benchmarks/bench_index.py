"""Index kinds side by side: build time, bytes, queries/s and recall@10 against exact search.

Why: `mocoplus index --kind auto` promises the smallest search effort that
keeps recall@k at the target; this shows what each kind costs and gives on
one corpus, in one run, and what ``auto`` picked. Every index is built with
the real stage (`pipeline.index.build.build_index`: train on a sample, add in
chunks, tune nprobe/efSearch on held-out corpus queries) and then measured
on separate held-out queries that are not in the corpus at all, against
exact search (`IndexFlatIP`) timed in the same run.

The synthetic corpus is shaped like real embeddings: 16-d Gaussian codes
through one fixed random linear map into 128-d, plus small isotropic noise,
L2-normalised (low intrinsic dimension; an isotropic mixture would make
neighbours nearly random and no index could beat exact search on it).

    python benchmarks/bench_index.py                              # 1M × 128 synthetic, all kinds
    python benchmarks/bench_index.py --n 200000 --kinds auto,ivf   # quicker
    python benchmarks/bench_index.py --embeddings emb/fmnist-train --queries-from emb/fmnist-test

Prints one JSON object. ``speedup`` is each index's QPS over exact search's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from harness import emit, environment  # benchmarks/ is the script's folder, first on sys.path

from artifacts.embedding_set import EmbeddingSet, write_embedding_set
from artifacts.index_bundle import IndexBundle
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig
from pipeline.index.plan import plan_index
from pipeline.index.tune import queries_per_second, recall_at_k

KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")


def synthetic(n: int, d: int, intrinsic: int, noise: float, seed: int, mixing_seed: int | None = None) -> np.ndarray:
    """Unit vectors near a random ``intrinsic``-dimensional subspace of R^d (see the module docstring).

    ``mixing_seed``: the subspace's own seed, so corpora made a part at a time (other ``seed``) share it.
    """
    rng = np.random.default_rng(seed)
    mixing_rng = rng if mixing_seed is None else np.random.default_rng(mixing_seed)
    mixing = mixing_rng.standard_normal((intrinsic, d)).astype(np.float32) / np.sqrt(intrinsic)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):  # bounded temporaries
        rows = min(100_000, n - start)
        block = rng.standard_normal((rows, intrinsic), dtype=np.float32) @ mixing
        block += noise * rng.standard_normal((rows, d), dtype=np.float32)
        out[start : start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def corpus_and_queries(args: argparse.Namespace, work: Path) -> tuple[Path, np.ndarray, dict[str, Any]]:
    """(embedding set folder, held-out queries, corpus description)."""
    if args.embeddings:
        corpus = EmbeddingSet(args.embeddings)
        pool = EmbeddingSet(args.queries_from) if args.queries_from else None
        if pool is None:
            raise SystemExit("--embeddings needs --queries-from: held-out queries must not be in the corpus")
        rng = np.random.default_rng(args.seed)
        ids = np.sort(rng.choice(pool.count, size=min(args.queries, pool.count), replace=False))
        described = {"kind": "embedding set", "path": str(corpus.path), "queries_from": str(pool.path)}
        return corpus.path, pool.rows(ids), {**described, "n": corpus.count, "d": corpus.dim}
    vectors = synthetic(args.n + args.queries, args.d, args.intrinsic, args.noise, args.seed)
    folder = write_embedding_set(work / "corpus", vectors[: args.n], bundle_hash="synthetic", parts=16)
    described = {"kind": "synthetic", "n": args.n, "d": args.d, "intrinsic_dim": args.intrinsic, "noise": args.noise}
    return folder, vectors[args.n :], described


def exact_search(embeddings: EmbeddingSet, queries: np.ndarray, k: int, repeats: int) -> tuple[np.ndarray, float]:
    """Exact top-k ids of the held-out queries (brute force, in memory) and its queries/s."""
    exact = faiss.IndexFlat(embeddings.dim, faiss.METRIC_INNER_PRODUCT)
    for _, block in embeddings.chunks():
        exact.add(block)
    _, truth = exact.search(queries, k)
    return truth, queries_per_second(lambda batch: exact.search(batch, k), queries, repeats)


def measure_kind(
    kind: str, corpus: Path, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    out = work / f"index-{kind}"
    config = IndexConfig(
        kind=kind, target_recall=args.target, k=args.k, memory_budget=args.memory_budget, queries=args.tune_queries
    )
    started = time.perf_counter()
    info = build_index(corpus, out, config, progress=False).info
    wall = time.perf_counter() - started
    bundle = IndexBundle(out)
    hits = bundle.search(queries, args.k)
    found = np.array([[bundle.rows[hit.id] for hit in row] + [-1] * (args.k - len(row)) for row in hits])
    qps = queries_per_second(lambda batch: bundle.index.search(batch, args.k), queries, args.repeats)
    return {
        "asked": kind,
        "kind": info["index_kind"],
        "factory": info["factory"],
        "reason": info["reason"],
        "params": info["search"]["params"],
        "build_seconds": round(wall, 2),
        "build": {name: info["build"][name] for name in ("train_seconds", "add_seconds", "tune_seconds")},
        "bytes": info["bytes"],
        "tuned_recall_on_held_out_rows": round(info["recall_at_k"]["recall"], 4),
        f"recall@{args.k}": round(recall_at_k(found, truth), 4),
        "qps": round(qps, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic corpus size")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--intrinsic", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.05, help="std of the isotropic noise per dimension")
    parser.add_argument("--embeddings", help="a real embedding set instead of the synthetic corpus")
    parser.add_argument("--queries-from", help="embedding set to draw held-out queries from (with --embeddings)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries measured")
    parser.add_argument("--tune-queries", type=int, default=1000, help="corpus queries the builder tunes on")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--memory-budget", type=int, default=4 << 30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        work = Path(tmp)
        corpus_dir, queries, corpus = corpus_and_queries(args, work)
        embeddings = EmbeddingSet(corpus_dir)
        truth, exact_qps = exact_search(embeddings, queries, args.k, args.repeats)
        auto = plan_index(embeddings.count, embeddings.dim, memory_budget=args.memory_budget)
        if "auto" in kinds and auto.kind in kinds:
            kinds.remove("auto")  # the same index twice would only cost time
        rows = [measure_kind(kind, corpus_dir, queries, truth, args, work) for kind in kinds]
    for row in rows:
        row["speedup"] = round(row["qps"] / exact_qps, 1)
        row["meets_target"] = row[f"recall@{args.k}"] >= args.target and row["speedup"] >= 20
    report = {
        "benchmark": "index",
        "corpus": corpus,
        "queries": len(queries),
        "k": args.k,
        "target": {f"recall@{args.k}": args.target, "speedup_over_exact": 20},
        "exact_qps": round(exact_qps, 1),
        "auto_chose": {"kind": auto.kind, "factory": auto.factory, "reason": auto.reason},
        "indexes": rows,
        "threads": faiss.omp_get_max_threads(),
        "environment": environment(),
    }
    emit(report)


if __name__ == "__main__":
    main()
