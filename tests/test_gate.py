"""The quality gate's rule: beat raw pixels, and stay within the tolerance of the published model."""

from __future__ import annotations

import math

import pytest

from pipeline.evaluate.gate import GateConfig, quality_gate
from pipeline.evaluate.retrieval import RetrievalScores


def scores(knn: float, nn1: float | None = None, p10: float | None = None) -> RetrievalScores:
    return RetrievalScores(knn, knn if nn1 is None else nn1, knn, knn, knn if p10 is None else p10)


PIXELS = scores(0.826, 0.856, 0.817)


def test_the_first_model_is_published_when_it_beats_raw_pixels_and_refused_when_not():
    assert quality_gate(scores(0.88), PIXELS).passed
    refused = quality_gate(scores(0.46), PIXELS)  # a model that has not learned (one step)
    assert not refused.passed and "does not beat raw pixels" in refused.summary()


def test_a_candidate_within_the_tolerance_of_the_published_model_passes_one_below_it_is_refused():
    published = scores(0.90, 0.88, 0.85)
    assert quality_gate(scores(0.895, 0.875, 0.845), PIXELS, published).passed  # half a point down: noise
    worse = quality_gate(scores(0.90, 0.86, 0.85), PIXELS, published)  # 1-NN two points down
    assert not worse.passed and len(worse.reasons) == 1 and "1-NN" in worse.reasons[0]
    assert quality_gate(scores(0.90, 0.86, 0.85), PIXELS, published, GateConfig(tolerance=0.03)).passed


def test_a_diverged_model_never_passes():
    nan = scores(math.nan)
    decision = quality_gate(nan, PIXELS, None)
    assert not decision.passed and "not a number" in decision.summary()
    assert not quality_gate(nan, PIXELS, scores(0.5)).passed


def test_the_gate_refuses_a_bad_configuration():
    with pytest.raises(ValueError, match="tolerance"):
        GateConfig(tolerance=-0.1)
    with pytest.raises(ValueError, match="scores among"):
        GateConfig(scores=("accuracy",))
