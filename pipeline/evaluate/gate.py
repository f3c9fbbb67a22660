"""The quality gate: is a newly trained model fit to replace the published one?

A scheduled ``pretrain`` run that diverged, or a recipe change that hurts,
must not reach users. The gate compares the candidate's retrieval suite (on
the served vectors, `pipeline.evaluate.embedded`) with

- **raw pixels** on the same samples: a model that does not beat them on the
  suite's headline score (weighted kNN-200) has learned nothing worth serving;
- **the published model** on the same samples, when there is one: on each of
  the main scores the candidate may trail it by at most ``tolerance`` (a run of
  another seed moves them by a few tenths of a point).

Scores that are not finite (a diverged model's vectors) never pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.evaluate.retrieval import SCORE_LABELS, RetrievalScores

MAIN_SCORES = ("weighted_knn200", "nn1", "precision_at_10")
HEADLINE = "weighted_knn200"


@dataclass(frozen=True)
class GateConfig:
    tolerance: float = 0.01  # the largest drop from the published model allowed on a main score (1 point)
    scores: tuple[str, ...] = MAIN_SCORES

    def __post_init__(self) -> None:
        if not 0 <= self.tolerance < 1 or not self.scores or set(self.scores) - set(SCORE_LABELS):
            raise ValueError(f"gate needs 0 <= tolerance < 1 and scores among {', '.join(SCORE_LABELS)}; got {self}")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]  # why it failed (empty when it passed)

    def summary(self) -> str:
        return "passed" if self.passed else "refused: " + "; ".join(self.reasons)


def quality_gate(
    candidate: RetrievalScores,
    pixels: RetrievalScores,
    published: RetrievalScores | None = None,
    config: GateConfig = GateConfig(),
) -> GateDecision:
    """Pass or refuse ``candidate`` against raw ``pixels`` and the ``published`` model (None: the first model)."""
    new, raw = candidate.as_dict(), pixels.as_dict()
    reasons = [
        f"{SCORE_LABELS[name]} is {new[name]} (not a number)" for name in config.scores if not math.isfinite(new[name])
    ]
    if not reasons and not new[HEADLINE] > raw[HEADLINE]:
        reasons.append(f"{SCORE_LABELS[HEADLINE]} {new[HEADLINE]:.2%} does not beat raw pixels ({raw[HEADLINE]:.2%})")
    if not reasons and published is not None:
        old = published.as_dict()
        reasons += [
            f"{SCORE_LABELS[name]} {new[name]:.2%} is {old[name] - new[name]:.2%} below the published model's "
            f"{old[name]:.2%} (tolerance {config.tolerance:.2%})"
            for name in config.scores
            if new[name] < old[name] - config.tolerance
        ]
    return GateDecision(not reasons, tuple(reasons))
