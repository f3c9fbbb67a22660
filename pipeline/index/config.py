"""How `mocoplus index` builds and tunes: torch- and FAISS-free, so the command line reads its defaults and choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from artifacts.settings import Help
from pipeline.index.plan import KINDS, METRICS, IndexKind, Metric

Merge = Literal["auto", "memory", "disk"]  # how a sharded build merges its parts (`pipeline.index.shards`)
MERGES: tuple[str, ...] = get_args(Merge)


@dataclass(frozen=True)
class IndexConfig:
    kind: Annotated[IndexKind, Help("auto, flat, hnsw, ivf or ivfpq.")] = "auto"
    metric: Annotated[Metric, Help("ip (inner product: cosine on normalised vectors) or l2.")] = "ip"
    target_recall: Annotated[float, Help("recall@k against exact search to tune for.")] = 0.95
    k: Annotated[int, Help("The k of recall@k.")] = 10
    memory_budget: Annotated[int, Help("Memory the index may use, e.g. 4G or 512M.", byte_size=True)] = 4 << 30
    queries: Annotated[int, Help("Held-out queries for tuning (and the recall/QPS report).")] = 1000
    chunk_rows: int = 65_536
    num_shards: Annotated[int, Help("Build IVF shards on one trained index, then merge.")] = 1
    merge: Annotated[
        Merge,
        Help(
            "How shards merge: auto (in memory while they fit --memory-budget), memory, or disk "
            "(an index.ivfdata searched memory-mapped)."
        ),
    ] = "auto"
    gpu: Annotated[bool, Help("Train, add and tune on GPU (needs faiss-gpu).")] = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose ip or l2")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target recall must lie in (0, 1]; got {self.target_recall}")
        if self.merge not in MERGES:
            raise ValueError(f"unknown merge {self.merge!r}; choose auto, memory or disk")
        if min(self.k, self.queries, self.chunk_rows, self.num_shards, self.memory_budget) < 1:
            raise ValueError("k, queries, chunk_rows, num_shards and memory_budget must be >= 1")
