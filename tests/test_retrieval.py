"""The retrieval suite against a naive per-query loop, and the label-free baselines."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.evaluate.baselines import BASELINES, baseline_features, hog_features, standardise
from pipeline.evaluate.retrieval import RetrievalScores, majority_vote, retrieval_scores


def naive_scores(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> dict:
    """The suite's definitions, one query at a time in float64 (stable sort: ties keep the bank order)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    totals = Counter()
    for query, truth in zip(queries, labels, strict=True):
        similarity = bank @ query
        order = np.argsort(-similarity, kind="stable")[: min(200, len(bank))]
        votes = Counter()
        for index in order:
            votes[bank_labels[index]] += math.exp(similarity[index] / 0.1)
        totals["weighted_knn200"] += max(votes, key=votes.get) == truth
        for k in (1, 5, 20):
            ranked = [bank_labels[i] for i in order[:k]]
            counts = Counter(ranked)
            best = max(counts.values())
            winner = next(label for label in ranked if counts[label] == best)  # the earliest of the tied
            totals[f"nn{k}"] += winner == truth
        totals["precision_at_10"] += np.mean([bank_labels[i] == truth for i in order[:10]])
    return {name: value / len(labels) for name, value in totals.items()}


def clustered(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    return centres[labels] + noise * rng.normal(size=(n, dim)), labels


@pytest.mark.parametrize("noise", [0.3, 1.5])  # well separated, and overlapping (every score strictly between)
def test_suite_matches_the_naive_reference(noise):
    bank, bank_labels = clustered(400, 6, 16, noise, seed=0)
    queries, labels = clustered(120, 6, 16, noise, seed=1)
    scores = retrieval_scores(
        torch.from_numpy(bank).float(),
        torch.from_numpy(bank_labels),
        torch.from_numpy(queries).float(),
        torch.from_numpy(labels),
        chunk_size=7,
    )
    expected = naive_scores(bank.astype(np.float32), bank_labels, queries.astype(np.float32), labels)
    for name, value in scores.as_dict().items():
        assert value == pytest.approx(expected[name], abs=1e-6), name
    if noise > 1:
        assert 0.2 < scores.nn1 < 0.95 and scores.nn1 != scores.nn20


def test_majority_vote_counts_first_then_breaks_ties_by_rank():
    ranked = torch.tensor([[3, 1, 1, 3, 2], [0, 2, 2, 0, 0], [4, 4, 1, 1, 1]])
    assert majority_vote(ranked, num_classes=5).tolist() == [3, 0, 1]
    assert majority_vote(ranked[:, :1], num_classes=5).tolist() == [3, 0, 4]


def test_a_perfect_feature_scores_one_and_a_small_memory_is_refused():
    labels = torch.arange(50) % 5
    features = torch.nn.functional.one_hot(labels, 5).float() + 0.01 * torch.randn(50, 5)
    scores = retrieval_scores(features, labels, features[:10], labels[:10])
    assert scores == RetrievalScores(1.0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least 20"):
        retrieval_scores(features[:19], labels[:19], features[:2], labels[:2])
    with pytest.raises(ValueError, match="one label per feature"):
        retrieval_scores(features, labels[:3], features[:2], labels[:2])


def test_pixel_baseline_is_standardised_with_the_memory_statistics():
    bank = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    queries = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    bank_features, query_features = baseline_features("pixels", bank, queries)
    assert bank_features.shape == (30, 64) and query_features.shape == (4, 64)
    assert bank_features.mean(dim=0).abs().max() < 1e-5 and (bank_features.std(dim=0) - 1).abs().max() < 1e-4
    raw = bank.reshape(30, -1).float() / 255
    expected = (queries.reshape(4, -1).float() / 255 - raw.mean(dim=0)) / raw.std(dim=0)
    assert torch.allclose(query_features, expected, atol=1e-5)
    same, _ = standardise(torch.ones(5, 3), torch.ones(2, 3))  # a constant pixel does not divide by zero
    assert torch.isfinite(same).all()


def test_hog_baseline_is_scikit_images_descriptor_and_sees_edges():
    from skimage.feature import hog

    images = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    images[1, :, :, 14:] = 255  # a vertical edge
    images[2, :, 14:, :] = 255  # a horizontal edge
    features = hog_features(images)
    expected = hog(images[1, 0].numpy(), 9, (4, 4), (2, 2), block_norm="L2-Hys")
    assert features.shape == (3, 6 * 6 * 2 * 2 * 9)
    assert np.allclose(features[1].numpy(), expected, atol=1e-6)
    assert features[0].abs().sum() == 0 and not torch.allclose(features[1], features[2])
    rgb = hog_features(torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8))
    assert rgb.shape == features[:2].shape


def test_unknown_baseline_is_a_clear_error():
    assert BASELINES == ("pixels", "hog")
    with pytest.raises(ValueError, match="unknown baseline 'sift'"):
        baseline_features(
            "sift", torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
        )


def test_the_suites_weighted_knn_is_the_monitors_knn_rule_so_evaluate_computes_it_once():
    from pipeline.knn import knn_top1

    generator = torch.Generator().manual_seed(7)
    bank, queries = torch.randn(900, 24, generator=generator), torch.randn(300, 24, generator=generator)
    bank_labels, query_labels = torch.randint(0, 5, (900,), generator=generator), torch.randint(0, 5, (300,))
    suite = retrieval_scores(bank, bank_labels, queries, query_labels, num_classes=5)
    monitor = knn_top1(bank, bank_labels, queries, query_labels, num_classes=5, k=200, temperature=0.1)
    assert round(suite.weighted_knn200 * 300) == round(monitor * 300)  # the same queries right, one by one
