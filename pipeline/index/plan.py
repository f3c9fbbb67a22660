"""Which FAISS index a corpus gets: the ``auto`` rule and the factory strings.

The rule follows FAISS's own guidelines ("Guidelines to choose an index"),
sized for one machine, with ``n`` vectors of ``d`` dimensions and a memory
budget ``B`` for the index:

1. ``n ≤ 50,000``: **Flat**, exact search. A query costs ``n·d`` multiply-adds,
   well under a millisecond here; no approximation is worth its recall loss.
2. ``n ≤ 2,000,000`` and the raw vectors plus the graph (``n·(4d + 8M + 16)``
   bytes, ``M = 32`` links) fit ``B``: **HNSW32,Flat**, the best recall per
   query time, no training. Its build time grows with ``n log n`` (108 s for
   1M × 128 on 2 cores) and is what stops it being the choice beyond 2M.
3. the raw vectors plus ids (``n·(4d + 8)``) fit ``B``: **IVF{nlist},Flat**,
   ``nlist`` a power of two near ``4√n``: exact distances inside the probed
   lists, a fast build (k-means on a sample, then one assignment per vector).
4. otherwise **OPQ{m},IVF{nlist},PQ{m}**: each vector becomes ``m`` bytes
   (``m`` the largest supported sub-quantizer count that divides ``d`` and
   fits the budget, at most ``d/2``), rotated first by OPQ so the bytes carry
   more. Recall is bounded by the compression; the tuner reports what it
   reached. (``np``: no polysemous training — a Hamming-distance pre-filter we
   do not use, which costs 15× the PQ training time.)

Training samples: ``64·nlist`` vectors for the coarse quantizer (FAISS warns
below 39 per centroid; k-means quality saturates well before 256), and at
least 65,536 when PQ codebooks are trained too — but never more than
``TRAIN_SAMPLE_BYTES`` (512 MiB) of float32, whatever the dimension: 1M
vectors at 128-d, 65,536 at 2,048-d. Where that cap would leave fewer than
39 vectors per list, ``nlist`` shrinks to fit it (at 2,048-d: at most 1,024
lists), trading search speed for a build whose memory does not grow with ``d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

IndexKind = Literal["auto", "flat", "hnsw", "ivf", "ivfpq"]
Metric = Literal["ip", "l2"]  # inner product (cosine on normalised vectors) or squared L2
KINDS: tuple[str, ...] = get_args(IndexKind)
METRICS: tuple[str, ...] = get_args(Metric)
FLAT_MAX = 50_000
HNSW_MAX = 2_000_000
HNSW_LINKS = 32
# efConstruction: faiss's default 40 built a graph of the demo's 1,024-d whitened vectors where 3.6 % of the
# test queries missed their nearest neighbour at the tuned efSearch (one of them the demo's search example);
# 80 took the build from 9.2 to 14.2 s and recall@10 at that efSearch from 0.964 to 0.993 (docs/results.md, "The demo")
HNSW_BUILD_EFFORT = 80
# Sub-quantizer counts FAISS supports everywhere, the GPU IVF-PQ included.
PQ_SIZES = (4, 8, 12, 16, 20, 24, 28, 32, 48, 56, 64, 96)
TRAIN_PER_LIST = 64
TRAIN_PER_LIST_MIN = 39  # FAISS warns below this many training vectors per centroid
PQ_TRAIN_MIN = 65_536
TRAIN_SAMPLE_BYTES = 512 << 20  # the training sample's float32 size, whatever the dimension


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # flat | hnsw | ivf | ivfpq
    factory: str  # the faiss.index_factory string
    train_size: int  # vectors to train on; 0: nothing to train
    search_parameter: str | None  # what the tuner sets: nprobe, efSearch, or None for exact search
    estimated_bytes: int
    reason: str  # one line: why this kind

    @property
    def nlist(self) -> int | None:
        return _nlist_of(self.factory)


def list_count(n: int, d: int = 1) -> int:
    """A power of two near ``4√n``, with at least 39 vectors per list in ``n`` and in the training sample
    ``d``-dimensional vectors may use (`train_cap`), in [1, 65536]."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    while nlist > 1 and min(n, train_cap(d)) < TRAIN_PER_LIST_MIN * nlist:
        nlist //= 2
    return min(nlist, 65536)


def train_cap(d: int) -> int:
    """The most ``d``-dimensional float32 vectors a training sample may hold (`TRAIN_SAMPLE_BYTES`)."""
    return max(1, TRAIN_SAMPLE_BYTES // (4 * d))


def plan_index(n: int, d: int, *, kind: str = "auto", memory_budget: int = 4 << 30) -> IndexPlan:
    """The index for ``n`` vectors of dimension ``d`` (see the module docstring for the rule)."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if n < 1 or d < 1:
        raise ValueError(f"cannot index {n} vectors of dimension {d}")
    flat_bytes, hnsw_bytes = n * (4 * d + 8), n * (4 * d + 8 * HNSW_LINKS + 16)
    if kind == "auto":
        if n <= FLAT_MAX:
            kind = "flat"
        elif n <= HNSW_MAX and hnsw_bytes <= memory_budget:
            kind = "hnsw"
        elif flat_bytes <= memory_budget:
            kind = "ivf"
        else:
            kind = "ivfpq"
        reason = _auto_reason(kind, n, memory_budget, graph_too_big=n <= HNSW_MAX)
    else:
        reason = f"asked for {kind}"
    nlist = list_count(n, d)
    cap = train_cap(d)
    if kind == "flat":
        return IndexPlan("flat", "Flat", 0, None, flat_bytes, reason)
    if kind == "hnsw":
        return IndexPlan("hnsw", f"HNSW{HNSW_LINKS},Flat", 0, "efSearch", hnsw_bytes, reason)
    if kind == "ivf":
        return IndexPlan("ivf", f"IVF{nlist},Flat", min(n, TRAIN_PER_LIST * nlist, cap), "nprobe", flat_bytes, reason)
    m = pq_bytes(n, d, memory_budget)
    train = min(n, max(TRAIN_PER_LIST * nlist, PQ_TRAIN_MIN), cap)
    return IndexPlan("ivfpq", f"OPQ{m},IVF{nlist},PQ{m}np", train, "nprobe", n * (m + 8) + 4 * d * nlist, reason)


def pq_bytes(n: int, d: int, memory_budget: int) -> int:
    """The largest code size (bytes per vector) that divides ``d``, is at most ``d/2`` and fits the budget."""
    fitting = [m for m in PQ_SIZES if d % m == 0 and m <= max(d // 2, 4) and n * (m + 8) <= memory_budget]
    if not fitting:
        smallest = min((m for m in PQ_SIZES if d % m == 0), default=None)
        if smallest is None:
            raise ValueError(f"dimension {d} is not divisible by any PQ size {PQ_SIZES}; use --kind ivf or flat")
        raise ValueError(
            f"a memory budget of {memory_budget:,} bytes cannot hold {n:,} vectors even at {smallest} bytes "
            f"each (+8 for the id): raise --memory-budget to at least {n * (smallest + 8):,}"
        )
    return max(fitting)


def _auto_reason(kind: str, n: int, budget: int, *, graph_too_big: bool = False) -> str:
    """Why ``kind``; ``graph_too_big``: IVF although ``n`` is few enough for HNSW (its graph broke the budget)."""
    gib = budget / (1 << 30)
    why_not_hnsw = f"HNSW's vectors + graph exceed {gib:.3g} GiB" if graph_too_big else f"{n:,} vectors > {HNSW_MAX:,}"
    return {
        "flat": f"{n:,} vectors ≤ {FLAT_MAX:,}: exact search is fast enough",
        "hnsw": f"{n:,} vectors ≤ {HNSW_MAX:,} and vectors + graph fit {gib:.3g} GiB",
        "ivf": f"{why_not_hnsw}, raw vectors fit {gib:.3g} GiB",
        "ivfpq": f"raw vectors of {n:,} exceed {gib:.3g} GiB: compressed with OPQ + PQ",
    }[kind]


def _nlist_of(factory: str) -> int | None:
    for component in factory.split(","):
        if component.startswith("IVF"):
            return int(component[3:])
    return None
