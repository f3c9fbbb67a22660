"""The process state a checkpoint carries besides the weights: RNG states; and the fingerprint ranks compare.

RNG states are stored as tensors and plain data, so checkpoints stay
loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

from mocoplus import MoCoPlus


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (loadable with ``weights_only``)."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state`'s states, wherever the checkpoint was loaded to.

    A checkpoint loaded with ``map_location="cuda:N"`` carries its RNG states
    as CUDA tensors, and the setters take only CPU byte tensors (``TypeError:
    RNG state must be a torch.ByteTensor``), so each state comes back to the
    CPU first.
    """
    torch.set_rng_state(_cpu_bytes(state["torch"]))
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_cpu_bytes(state["cuda"]))


def _cpu_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.uint8)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(item) for item in value) if isinstance(value, list | tuple) else value


def state_fingerprint(model: MoCoPlus) -> str:
    """sha256 of every weight (query and key encoder) and the queue: what DDP ranks must agree on.

    Batch-norm running statistics are left out: each rank computes them on its
    own images (DDP re-broadcasts the query encoder's at the next forward).
    """
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(), *(("queue." + n, b) for n, b in model.queue.named_buffers())]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
