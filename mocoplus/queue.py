"""The FIFO queue of past keys: any size K, any number of keys per step."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class KeyQueue(nn.Module):
    """K embeddings of past keys, oldest overwritten first, held as buffers.

    As buffers the keys and the write pointer are saved in the state dict and
    move with ``.to(device)``. Starts with random unit vectors, as MoCo does.
    Any batch size works with any K: writes wrap around, and a batch larger
    than K keeps only its last K keys.
    """

    keys: Tensor
    pointer: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        count = keys.shape[0]
        start = int(self.pointer)
        if count > self.size:  # only the newest K survive; they land where the FIFO puts them
            start = (start + count - self.size) % self.size
            keys = keys[-self.size :]
        slots = (start + torch.arange(keys.shape[0], device=self.keys.device)) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.pointer.fill_((start + keys.shape[0]) % self.size)
