"""The quality gate: is a newly trained model fit to replace the published one?

A scheduled ``pretrain`` run that diverged, or a recipe change that hurts,
must not reach users. The gate compares the candidate's retrieval suite (on
the served vectors, `pipeline.evaluate.embedded`) with

- **raw pixels** on the same samples: a model that does not beat them on the
  suite's headline score (weighted kNN-200) has learned nothing worth serving;
- **the published model** on the same samples, when there is one: on each of
  the main scores the candidate may trail it by at most ``tolerance`` (a run of
  another seed moves them by a few tenths of a point).

Without labels (`pipeline.evaluate.views`) the same two rules apply to recall
of the originals from altered views: the candidate must beat raw pixels on
recall@10 and may trail the published model by at most ``tolerance`` on
recall@1 and recall@10 (`view_gate`).

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
    return _decide(
        candidate.as_dict(), pixels.as_dict(), published.as_dict() if published is not None else None,
        headline=HEADLINE, scores=config.scores, labels=SCORE_LABELS, tolerance=config.tolerance,
    )  # fmt: skip


VIEW_HEADLINE = "recall@10"


def view_gate(
    candidate: dict[str, float],
    pixels: dict[str, float],
    published: dict[str, float] | None = None,
    tolerance: float = GateConfig.tolerance,
) -> GateDecision:
    """The gate on label-free scores (``{"recall@1": ..., "recall@10": ...}``, as `ViewRecall.as_dict`)."""
    GateConfig(tolerance=tolerance)  # the same bounds on the tolerance
    if VIEW_HEADLINE not in candidate:
        raise ValueError(f"the label-free gate needs {VIEW_HEADLINE}; got {', '.join(candidate)}")
    return _decide(
        candidate, pixels, published,
        headline=VIEW_HEADLINE, scores=tuple(candidate), labels={name: name for name in candidate},
        tolerance=tolerance,
    )  # fmt: skip


def _decide(
    new: dict[str, float],
    raw: dict[str, float],
    old: dict[str, float] | None,
    *,
    headline: str,
    scores: tuple[str, ...],
    labels: dict[str, str],
    tolerance: float,
) -> GateDecision:
    reasons = [f"{labels[name]} is {new[name]} (not a number)" for name in scores if not math.isfinite(new[name])]
    if not reasons and not new[headline] > raw[headline]:
        reasons.append(f"{labels[headline]} {new[headline]:.2%} does not beat raw pixels ({raw[headline]:.2%})")
    if not reasons and old is not None:
        reasons += [
            f"{labels[name]} {new[name]:.2%} is {old[name] - new[name]:.2%} below the published model's "
            f"{old[name]:.2%} (tolerance {tolerance:.2%})"
            for name in scores
            if new[name] < old[name] - tolerance
        ]
    return GateDecision(not reasons, tuple(reasons))
