"""Recall against exact search, and the smallest search effort that reaches a target.

Held-out queries are corpus vectors kept out of the index while it is tuned
(the builder adds them last): a query that is itself in an HNSW graph sits on
a node linked to its own neighbours and makes the graph look far better than
it is for new queries (0.99 against 0.91 recall@10 at the same efSearch on 1M
vectors). recall@k is the mean fraction
of the exact top-k that the index also returns in its top-k (FAISS's
"k-recall@k", the intersection measure).

The search parameter (``nprobe`` for IVF, ``efSearch`` for HNSW) is doubled
until the target is reached, then bisected between the last value that
missed and the first that reached it: recall grows with effort, so this finds
the smallest value in O(log) evaluations of the query set. An index that
cannot reach the target (PQ codes too coarse) gets the smallest value within
0.005 of the best recall it reached: past that knee, effort buys nothing —
and the doubling stops once two doublings in a row each gain less than
``PLATEAU`` (0.001; one flat step can be the query set's granularity),
instead of running on to an exhaustive scan (``nprobe = nlist``: at 10M
vectors and 16,384 lists, minutes of tuning for nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from artifacts.index_bundle import set_index_parameter

KNEE = 0.005
PLATEAU = 0.001  # a doubling of the effort that gains less than this ends the search upwards


@dataclass(frozen=True)
class Probe:
    value: int
    recall: float


@dataclass(frozen=True)
class Tuning:
    parameter: str | None
    value: int | None
    recall: float
    target: float
    reached: bool
    probes: tuple[Probe, ...]


def metric_type(metric: str) -> int:
    return {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[metric]


def exact_neighbours(
    queries: np.ndarray, corpus_chunks: Iterable[np.ndarray], k: int, metric: str, *, ngpu: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact top-k (scores, ids) over a corpus streamed in chunks, and the seconds it took."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    start = time.perf_counter()
    scores, ids = knn_ground_truth(queries, corpus_chunks, k, metric_type=metric_type(metric), ngpu=ngpu)
    return scores, ids, time.perf_counter() - start


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / |truth| over queries (ids −1 are padding, never matches)."""
    hits = [
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


def set_search_parameter(index: faiss.Index, name: str, value: int) -> None:
    """Set ``nprobe``/``efSearch`` through any wrapper (OPQ pre-transform, GPU clone, replicas): the GPU
    parameter space for a GPU index, the CPU one otherwise (`artifacts.index_bundle.parameter_space`)."""
    set_index_parameter(index, name, value)


def tune(recall_of: Callable[[int], float], parameter: str | None, *, start: int, limit: int, target: float) -> Tuning:
    """The smallest ``value`` in [start, limit] whose ``recall_of(value)`` ≥ ``target``; when none does (or
    recall plateaus first), the smallest within `KNEE` of the best recall measured."""
    if parameter is None:
        recall = recall_of(0)
        return Tuning(None, None, recall, target, recall >= target, (Probe(0, recall),))
    probes: dict[int, float] = {}

    def measure(value: int) -> float:
        if value not in probes:
            probes[value] = recall_of(value)
        return probes[value]

    def smallest_reaching(goal: float) -> int:
        low, value, flat = None, max(1, start), 0
        while measure(value) < goal and value < limit:
            flat = flat + 1 if low is not None and measure(value) - measure(low) < PLATEAU else 0
            if flat == 2:
                break  # a plateau below the goal: more effort buys nothing
            low, value = value, min(limit, value * 2)
        if measure(value) >= goal and low is not None:
            high = value
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if measure(middle) >= goal else (middle, high)
            value = high
        return value

    value = smallest_reaching(target)
    if probes[value] < target:
        value = smallest_reaching(max(probes.values()) - KNEE)
    ordered = tuple(Probe(v, r) for v, r in sorted(probes.items()))
    return Tuning(parameter, value, probes[value], target, probes[value] >= target, ordered)


def queries_per_second(search: Callable[[np.ndarray], object], queries: np.ndarray, repeats: int = 3) -> float:
    """Batch-search throughput, best of ``repeats`` (the first run also warms caches)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        search(queries)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best if best > 0 else float("inf")
