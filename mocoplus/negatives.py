"""Hard-negative selection as one table: negatives mode name → how it picks (or re-weights) an anchor's negatives.

Adding a mode is one entry here (and its name in `Negatives`, checked against
the table at import): `NegativeSampling` validates against the table, the loss
dispatches through it, the run config's choices and the objective benchmark
iterate it.

A selector gets each anchor's row of queue scores (similarities a·n times a
positive ``scale``, the logits a·n/τ with ``scale=1/τ``: ordering does not
change, and thresholds are scaled to match) and returns ``(indices, valid)``,
both ``[B, M]``: queue columns and whether the slot holds a real negative
(False marks padding); ``(None, None)`` means "the whole queue", ``(None,
valid)`` the whole queue masked. Selectors run under no_grad; the loss
gathers the chosen logits with gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mocoplus.config import NegativeSampling

Negatives = Literal["all", "topk", "band", "threshold", "debiased", "hard-weighted"]
Selection = tuple[Tensor | None, Tensor | None]
Selector = Callable[[Tensor, "NegativeSampling", float], Selection]


@dataclass(frozen=True)
class NegativeMode:
    """One mode: its selector, the `NegativeSampling` fields it reads, and how the loss counts its negatives.

    ``requires`` maps a field that must be set to what it means (the error
    names both); ``concentration``, when given, makes the loss re-estimate
    the negatives' sum (debiased / hard-weighted) with weights e^{β·a·n/τ},
    β = ``concentration(sampling)``.
    """

    select: Selector
    parameters: tuple[str, ...] = ()
    requires: dict[str, str] = field(default_factory=dict)
    concentration: Callable[[NegativeSampling], float] | None = None

    @property
    def reweights(self) -> bool:
        return self.concentration is not None


def whole_queue(scores: Tensor, sampling: NegativeSampling, scale: float) -> Selection:
    return None, None


def most_similar(scores: Tensor, sampling: NegativeSampling, scale: float) -> Selection:
    """``topk``: the ``k`` most similar entries."""
    assert sampling.k is not None  # `requires`
    return scores.topk(min(sampling.k, scores.shape[1]), dim=1).indices, None


def band(scores: Tensor, sampling: NegativeSampling, scale: float) -> Selection:
    """``band``: sorted by similarity, drop the most similar (likely the anchor's class), keep the next ``k``."""
    queue_size = scores.shape[1]
    skip = sampling.skip_count(queue_size)
    keep = queue_size if sampling.k is None else sampling.k
    end = min(skip + keep, queue_size)
    return scores.topk(end, dim=1).indices[:, skip:], None


def below_threshold(scores: Tensor, sampling: NegativeSampling, scale: float) -> Selection:
    """``threshold``: entries above it are presumed false negatives; the ``k`` most similar of the rest."""
    assert sampling.threshold is not None  # `requires`
    allowed = scores <= sampling.threshold * scale
    if sampling.k is None:
        return None, allowed
    values, indices = torch.where(allowed, scores, float("-inf")).topk(min(sampling.k, scores.shape[1]), dim=1)
    return indices, torch.isfinite(values)


NEGATIVE_MODES: dict[str, NegativeMode] = {
    "all": NegativeMode(whole_queue),
    "topk": NegativeMode(most_similar, ("k",), {"k": "the number of negatives to keep"}),
    "band": NegativeMode(band, ("k", "skip", "skip_fraction")),
    "threshold": NegativeMode(below_threshold, ("k", "threshold"), {"threshold": "a cosine similarity"}),
    "debiased": NegativeMode(whole_queue, ("tau_plus",), concentration=lambda sampling: 0.0),
    "hard-weighted": NegativeMode(whole_queue, ("tau_plus", "beta"), concentration=lambda sampling: sampling.beta),
}
NEGATIVES: tuple[str, ...] = tuple(NEGATIVE_MODES)

if set(get_args(Negatives)) != set(NEGATIVES):  # the type and the table must name the same modes
    raise ImportError(f"Negatives {get_args(Negatives)} and NEGATIVE_MODES {NEGATIVES} disagree")


def select_negatives(scores: Tensor, sampling: NegativeSampling, *, scale: float = 1.0) -> Selection:
    """Pick each anchor's negatives from its row of queue scores with the mode's selector (module docstring)."""
    with torch.no_grad():
        return NEGATIVE_MODES[sampling.mode].select(scores, sampling, scale)
