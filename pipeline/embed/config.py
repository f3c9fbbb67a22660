"""How `mocoplus embed` runs: torch-free, so the command line reads its defaults and choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from artifacts.images import DEFAULT_MAX_PIXELS
from artifacts.model_bundle import Provider
from artifacts.settings import Help


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: Annotated[int, Help("Images per ONNX Runtime call.")] = 256
    workers: Annotated[int, Help("Decoding worker processes (0: decode in this process).")] = 2
    provider: Annotated[Provider, Help("cpu or cuda (a hard error if CUDA is unavailable).")] = "cpu"
    threads: Annotated[int, Help("ONNX Runtime intra-op threads (0: its default).")] = 0
    fp16: Annotated[bool, Help("Store float16 vectors (half the disk).")] = False
    shard_index: int = 0
    num_shards: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0 or self.threads < 0:
            raise ValueError("need batch_size >= 1, workers >= 0 and threads >= 0")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"need 0 <= shard_index < num_shards; got {self.shard_index}, {self.num_shards}")
