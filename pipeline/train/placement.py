"""Where this process trains: its rank, world size and device, joined to a process group under torchrun."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import distributed as dist

from pipeline.precision import Precision, resolve_precision


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cuda_device_for(local_rank: int, device_count: int) -> torch.device:
    """``cuda:LOCAL_RANK``, or a clear error when torchrun started more processes on this node than it has GPUs."""
    if not 0 <= local_rank < device_count:
        raise ValueError(
            f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but {device_count} CUDA device(s) are visible: start at "
            "most that many processes per node (torchrun --nproc_per_node), or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to train on the CPU with gloo"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def distributed_placement(timeout_s: float = 3600.0) -> Iterator[Placement]:
    """This process's rank and device; joins (and leaves) a process group when started by torchrun.

    ``timeout_s`` bounds every collective. It must cover the longest time one
    rank works alone while the others wait at a barrier: the kNN monitor runs
    on rank 0 only, and NCCL's default of 10 minutes would kill the job during
    an ImageNet-size pass (``train.collective_timeout``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = cuda_device_for(local_rank, torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
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
