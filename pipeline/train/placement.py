"""Where this process trains: its rank, world size and device, joined to a process group under torchrun."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import distributed as dist

from pipeline.train.precision import Precision, resolve_precision


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed_placement() -> Iterator[Placement]:
    """This process's rank and device; joins (and leaves) a process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        yield Placement(rank, dist.get_world_size() if dist.is_initialized() else 1, device)
    finally:
        if joined:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def resolve_training_precision(name: str, device: torch.device) -> Precision:
    """``fp16`` (GPU only, with a grad scaler) on top of `resolve_precision`'s auto/bf16/fp32."""
    if name != "fp16":
        return resolve_precision(name, device)
    if device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU (it relies on a grad scaler); use bf16 or auto on the CPU")
    return Precision(device.type, torch.float16, channels_last=True)
