"""`mocoplus index --update` against a full rebuild: seconds, and recall@10 on queries outside the corpus.

Why: a corpus that changes every day is only cheap to serve if a day's change
costs a fraction of a rebuild and search quality holds. For each index kind
and each growth share, the same grown embedding set (``share`` of new vectors,
a tenth as many removed) is indexed twice in one run — `update_index` from
the previous version, `build_index` from scratch — and both are measured on
held-out queries against exact search over the live vectors. Then five
successive +10 % updates (with removals) show whether recall holds and when
the retrain rule fires.

    python benchmarks/bench_update.py                                 # 1M × 128 synthetic, hnsw and ivfpq
    python benchmarks/bench_update.py --n 100000 --kinds hnsw         # quicker
    python benchmarks/bench_update.py --embeddings emb/fmnist-train --queries-from emb/fmnist-test --kinds flat,hnsw

With ``--embeddings``, the set's first rows are the starting corpus and its
last rows (as many as the largest share and the successive updates need)
arrive as the updates. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from bench_index import synthetic
from harness import emit, environment, log

from artifacts.embedding_set import EmbeddingSet, grow_embedding_set, write_embedding_set
from artifacts.index_bundle import IndexBundle
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig
from pipeline.index.tune import recall_at_k
from pipeline.index.update import update_index

SUCCESSIVE = 5  # +10 % updates in a row


def vectors_and_queries(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """All vectors (start corpus first, arrivals after) and held-out queries outside them."""
    if args.embeddings:
        if not args.queries_from:
            raise SystemExit("--embeddings needs --queries-from: held-out queries must not be in the corpus")
        corpus, pool = EmbeddingSet(args.embeddings), EmbeddingSet(args.queries_from)
        everything = np.concatenate([block for _, block in corpus.chunks()])
        rng = np.random.default_rng(args.seed)
        ids = np.sort(rng.choice(pool.count, size=min(args.queries, pool.count), replace=False))
        return everything, pool.rows(ids), {"kind": "embedding set", "path": str(corpus.path)}
    vectors = synthetic(args.n * 2 + args.queries, args.d, 16, 0.1, args.seed)
    return vectors[: -args.queries], vectors[-args.queries :], {"kind": "synthetic", "d": args.d}


def start_size(total: int, args: argparse.Namespace) -> int:
    """The starting corpus: ``--n`` rows, or for a real set what leaves room for the arrivals."""
    if not args.embeddings:
        return args.n
    growth = max(max(args.shares), 1.1**SUCCESSIVE - 1)
    return int(total / (1 + growth))


def live_recall(bundle: IndexBundle, live: np.ndarray, keys: list[str], queries: np.ndarray, k: int) -> float:
    """recall@k of ``bundle`` on ``queries`` against exact search over the ``live`` vectors (keys ``keys``)."""
    exact = faiss.IndexFlatIP(live.shape[1])
    exact.add(live)
    truth = exact.search(queries, k)[1]
    id_of = {key: position for position, key in enumerate(keys)}
    found = np.array([[id_of[hit.key] for hit in row] + [-1] * (k - len(row)) for row in bundle.search(queries, k)])
    return recall_at_k(found, truth)


class Corpus:
    """The embedding set as it grows, and its live vectors by key (what exact search runs on)."""

    def __init__(self, folder: Path, vectors: np.ndarray, start: int) -> None:
        self.folder, self.pool, self.next = folder, vectors, start
        write_embedding_set(folder, vectors[:start], bundle_hash="bench", parts=16)
        self.live = {f"v{row}": row for row in range(start)}
        self.rng = np.random.default_rng(1)

    def grow(self, added: int, removed: int) -> None:
        if self.next + added > len(self.pool):
            raise SystemExit(f"not enough vectors for +{added:,}: give a larger corpus")
        gone = [str(key) for key in self.rng.choice(sorted(self.live), size=removed, replace=False)]
        keys = grow_embedding_set(self.folder, self.pool[self.next : self.next + added], removed=gone)
        for key in gone:
            del self.live[key]
        self.live.update(zip(keys, range(self.next, self.next + added), strict=True))
        self.next += added

    def vectors(self) -> tuple[np.ndarray, list[str]]:
        keys = sorted(self.live, key=lambda key: int(key[1:]))
        return self.pool[[self.live[key] for key in keys]], keys


def timed(function) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def first_version(kind: str, vectors: np.ndarray, start: int, work: Path, args) -> tuple[Corpus, float]:
    """Version 1 of the start corpus (built once per kind; each experiment grows a copy); its build seconds."""
    corpus = Corpus(work / "emb", vectors, start)
    config = IndexConfig(kind=kind, queries=args.tune_queries)
    _, seconds = timed(lambda: build_index(corpus.folder, work / "index", config, progress=False))
    return corpus, seconds


def copied(corpus: Corpus, base: Path, work: Path) -> Corpus:
    """A private copy of the corpus and its index bundle (the bundle's embedding path pointed at the copy)."""
    shutil.copytree(base, work, symlinks=True)
    twin = Corpus.__new__(Corpus)
    twin.folder, twin.pool, twin.next, twin.live = work / "emb", corpus.pool, corpus.next, dict(corpus.live)
    twin.rng = np.random.default_rng(1)
    return twin


def one_growth(kind: str, share: float, corpus: Corpus, base: Path, queries, work: Path, args) -> dict[str, Any]:
    """The start corpus grown by ``share`` (a tenth as many removed), indexed by an update and by a rebuild."""
    corpus = copied(corpus, base, work)
    start = len(corpus.live)
    corpus.grow(int(start * share), int(start * share / 10))
    updated, update_seconds = timed(lambda: update_index(corpus.folder, work / "index", progress=False))
    config = IndexConfig(kind=kind, queries=args.tune_queries)
    rebuilt, rebuild_seconds = timed(lambda: build_index(corpus.folder, work / "rebuilt", config, progress=False))
    live, keys = corpus.vectors()
    result = {
        "kind": kind,
        "share": share,
        "vectors": len(keys),
        "update_seconds": round(update_seconds, 2),
        "rebuild_seconds": round(rebuild_seconds, 2),
        "speedup": round(rebuild_seconds / update_seconds, 1),
        "retrained": updated.info["trained"].get("reason"),
        "update_recall_at_10": round(live_recall(IndexBundle(work / "index"), live, keys, queries, 10), 4),
        "rebuild_recall_at_10": round(live_recall(IndexBundle(work / "rebuilt"), live, keys, queries, 10), 4),
        "update_search": updated.info["search"]["params"],
        "rebuild_search": rebuilt.info["search"]["params"],
        "update_phases_s": {name: value for name, value in updated.info.get("update", {}).items() if "seconds" in name},
    }
    shutil.rmtree(work)
    return result


def successive(corpus: Corpus, base: Path, queries, work: Path) -> list[dict[str, Any]]:
    """Five +10 % updates in a row (a hundredth removed each time), recall after each."""
    corpus = copied(corpus, base, work)
    rows = []
    for step in range(1, SUCCESSIVE + 1):
        size = len(corpus.live)
        corpus.grow(int(size * 0.1), int(size * 0.01))
        info, seconds = timed(lambda: update_index(corpus.folder, work / "index", progress=False).info)
        live, keys = corpus.vectors()
        rows.append({
            "update": step, "vectors": len(keys), "seconds": round(seconds, 2),
            "recall_at_10": round(live_recall(IndexBundle(work / "index"), live, keys, queries, 10), 4),
            "tuned_recall": round(info["recall_at_k"]["recall"], 4), "search": info["search"]["params"],
            "retrained": info["trained"].get("reason"), "added_since_training": info["trained"]["added_since"],
        })  # fmt: skip
    shutil.rmtree(work)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic start corpus size")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--embeddings", type=Path, help="a real embedding set instead of synthetic vectors")
    parser.add_argument("--queries-from", type=Path, help="held-out queries for --embeddings (another set)")
    parser.add_argument("--kinds", default="hnsw,ivfpq")
    parser.add_argument("--shares", default="0.01,0.1", help="growth shares to compare")
    parser.add_argument("--queries", type=int, default=1000, help="held-out recall queries")
    parser.add_argument("--tune-queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.shares = [float(share) for share in args.shares.split(",")]
    vectors, queries, described = vectors_and_queries(args)
    start = start_size(len(vectors), args)
    results: dict[str, Any] = {"benchmark": "update", "corpus": {**described, "start": start},
                               "environment": environment(), "growth": [], "successive": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-update-") as folder:
        for kind in args.kinds.split(","):
            base = Path(folder) / kind
            corpus, seconds = first_version(kind, vectors, start, base, args)
            log("update", f"{kind}: version 1 of {start:,} vectors built in {seconds:.1f} s")
            results.setdefault("first_build_seconds", {})[kind] = round(seconds, 2)
            for share in args.shares:
                results["growth"].append(one_growth(kind, share, corpus, base, queries, Path(folder) / "g", args))
                log("update", json.dumps(results["growth"][-1]))
            results["successive"][kind] = successive(corpus, base, queries, Path(folder) / "s")
            log("update", json.dumps(results["successive"][kind]))
            shutil.rmtree(base)
    emit(results)


if __name__ == "__main__":
    main()
