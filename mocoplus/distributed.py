"""The few collectives MoCo needs, each a no-op in a single process.

Keys are all-gathered before they enter the queue, so every rank holds the
same queue; shuffle-BN permutes the key batch across ranks so that a rank's
key BN statistics come from other samples than its query BN statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch import distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order (no gradient).

    Requires the same shape on every rank, which the fixed-size training
    batches guarantee.
    """
    if world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def shuffle_across_ranks(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle the global batch across ranks; return this rank's part and the undo index.

    Rank 0 draws the permutation and broadcasts it, so all ranks agree.
    """
    gathered = concat_all_gather(x)
    local = x.shape[0]
    permutation = torch.randperm(gathered.shape[0], device=x.device)
    if world_size() > 1:
        dist.broadcast(permutation, src=0)
    restore = torch.argsort(permutation)
    mine = permutation.view(world_size(), local)[rank()]
    return gathered[mine], restore


@torch.no_grad()
def unshuffle_across_ranks(x: Tensor, restore: Tensor) -> Tensor:
    """Invert `shuffle_across_ranks`: this rank's outputs for its own original samples."""
    gathered = concat_all_gather(x)
    local = x.shape[0]
    mine = restore.view(world_size(), local)[rank()]
    return gathered[mine]
