"""How `mocoplus index` builds and tunes: torch- and FAISS-free, so the command line reads its defaults and choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from pipeline.index.plan import KINDS, METRICS, IndexKind, Metric

Merge = Literal["auto", "memory", "disk"]  # how a sharded build merges its parts (`pipeline.index.shards`)
MERGES: tuple[str, ...] = get_args(Merge)


@dataclass(frozen=True)
class IndexConfig:
    kind: IndexKind = "auto"
    metric: Metric = "ip"
    target_recall: float = 0.95
    k: int = 10
    memory_budget: int = 4 << 30
    queries: int = 1000  # held-out queries for tuning and the recall/QPS report
    chunk_rows: int = 65_536
    num_shards: int = 1
    merge: Merge = "auto"  # auto: in memory while the parts fit memory_budget, else into an on-disk index.ivfdata
    gpu: bool = False
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
