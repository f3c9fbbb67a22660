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
from typing import Literal, get_args

import torch
from torch import Tensor

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
    """``topk``: the ``num_negatives`` most similar entries."""
    assert sampling.num_negatives is not None  # `requires`
    return scores.topk(min(sampling.num_negatives, scores.shape[1]), dim=1).indices, None


def band(scores: Tensor, sampling: NegativeSampling, scale: float) -> Selection:
    """``band``: sorted by similarity, drop the most similar (likely the anchor's class), keep the next ones."""
    queue_size = scores.shape[1]
    skip = sampling.skip_count(queue_size)
    keep = queue_size if sampling.num_negatives is None else sampling.num_negatives
    end = min(skip + keep, queue_size)
    return scores.topk(end, dim=1).indices[:, skip:], None


def below_threshold(scores: Tensor, sampling: NegativeSampling, scale: float) -> Selection:
    """``threshold``: entries above it are presumed false negatives; the ``num_negatives`` most similar of the rest."""
    assert sampling.negative_threshold is not None  # `requires`
    allowed = scores <= sampling.negative_threshold * scale
    if sampling.num_negatives is None:
        return None, allowed
    keep = min(sampling.num_negatives, scores.shape[1])
    values, indices = torch.where(allowed, scores, float("-inf")).topk(keep, dim=1)
    return indices, torch.isfinite(values)


NEGATIVE_MODES: dict[str, NegativeMode] = {
    "all": NegativeMode(whole_queue),
    "topk": NegativeMode(most_similar, ("num_negatives",), {"num_negatives": "the number of negatives to keep"}),
    "band": NegativeMode(band, ("num_negatives", "skip_negatives", "skip_negatives_fraction")),
    "threshold": NegativeMode(
        below_threshold, ("num_negatives", "negative_threshold"), {"negative_threshold": "a cosine similarity"}
    ),
    "debiased": NegativeMode(whole_queue, ("debias_prior",), concentration=lambda sampling: 0.0),
    "hard-weighted": NegativeMode(
        whole_queue, ("debias_prior", "hardness"), concentration=lambda sampling: sampling.hardness
    ),
}
NEGATIVES: tuple[str, ...] = tuple(NEGATIVE_MODES)

if set(get_args(Negatives)) != set(NEGATIVES):  # the type and the table must name the same modes
    raise ImportError(f"Negatives {get_args(Negatives)} and NEGATIVE_MODES {NEGATIVES} disagree")


@dataclass(frozen=True)
class NegativeSampling:
    """Which queue entries serve as negatives for each anchor (docs/architecture.md, "The method").

    Each field has the name it has in `mocoplus.config.MoCoConfig` (and so in
    config files and ``--set``): one name from the config file to the loss.

    ``negatives``: ``all`` (the whole queue, MoCo), ``topk`` (the
    ``num_negatives`` most similar), ``band`` (drop the ``skip_negatives`` most
    similar — or the most similar ``skip_negatives_fraction`` of the queue —
    likely false negatives, keep the next ``num_negatives``), ``threshold``
    (drop entries more similar than ``negative_threshold``, keep the
    ``num_negatives`` most similar of the rest; ``None`` keeps all of the rest).

    Two modes keep the whole queue but change how it counts (`mocoplus.losses`):
    ``debiased`` (Chuang et al. 2020) subtracts the expected share of same-class
    entries, a class prior τ⁺ = ``debias_prior``, from the negatives' sum;
    ``hard-weighted`` (Robinson et al. 2021) also weights each entry by
    e^{β·a·n/τ} (concentration β = ``hardness``; β = 0 is ``debiased``).
    """

    negatives: Negatives = "all"
    num_negatives: int | None = None
    skip_negatives: int = 0
    negative_threshold: float | None = None
    skip_negatives_fraction: float = 0.0
    debias_prior: float = 0.1
    hardness: float = 1.0

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}; got {self.negatives!r}")
        fraction = self.skip_negatives_fraction
        if not 0.0 <= fraction < 1.0 or (fraction and self.skip_negatives):
            raise ValueError(
                "skip_negatives_fraction must lie in [0, 1) and not be combined with skip_negatives; "
                f"got {fraction}, {self.skip_negatives}"
            )
        if not 0.0 <= self.debias_prior < 1.0 or not self.hardness >= 0.0:
            raise ValueError(
                f"debias_prior must lie in [0, 1) and hardness be >= 0; got {self.debias_prior}, {self.hardness}"
            )
        for name, meaning in NEGATIVE_MODES[self.negatives].requires.items():
            if getattr(self, name) is None:
                raise ValueError(f"negatives={self.negatives!r} needs {name} ({meaning})")
        if self.num_negatives is not None and self.num_negatives < 1:
            raise ValueError(f"num_negatives must be a positive number of negatives; got {self.num_negatives}")
        if self.skip_negatives < 0:
            raise ValueError(f"skip_negatives must be >= 0; got {self.skip_negatives}")

    def skip_count(self, queue_size: int) -> int:
        """How many of the most similar entries ``band`` drops from a queue of ``queue_size``."""
        return self.skip_negatives or round(self.skip_negatives_fraction * queue_size)

    @property
    def reweights(self) -> bool:
        """Whether the loss re-estimates the negatives' sum (``debiased``, ``hard-weighted``)."""
        return NEGATIVE_MODES[self.negatives].reweights


ALL_NEGATIVES = NegativeSampling()


def select_negatives(scores: Tensor, sampling: NegativeSampling, *, scale: float = 1.0) -> Selection:
    """Pick each anchor's negatives from its row of queue scores with the mode's selector (module docstring)."""
    with torch.no_grad():
        return NEGATIVE_MODES[sampling.negatives].select(scores, sampling, scale)
