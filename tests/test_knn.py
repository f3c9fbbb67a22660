"""Weighted kNN against a naive per-query loop, and feature extraction in eval mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.knn import extract_features, knn_predict, knn_top1
from pipeline.precision import resolve_precision


def naive_knn(bank, bank_labels, queries, num_classes, k, temperature):
    """One query at a time, in float64, straight from the definition."""
    predictions = []
    for query in queries.double():
        similarities = [
            (float(query @ b) / (query.norm().item() * b.norm().item()), int(label))
            for b, label in zip(bank.double(), bank_labels, strict=True)
        ]
        similarities.sort(key=lambda pair: pair[0], reverse=True)
        scores = [0.0] * num_classes
        for similarity, label in similarities[:k]:
            scores[label] += math.exp(similarity / temperature)
        predictions.append(max(range(num_classes), key=scores.__getitem__))
    return torch.tensor(predictions)


@pytest.mark.parametrize(("k", "chunk_size"), [(1, 4), (5, 7), (16, 100), (500, 3)], ids=["1nn", "k5", "k16", "k>bank"])
def test_matches_naive_loop(generator, k, chunk_size):
    bank, queries = torch.randn(60, 8, generator=generator), torch.randn(23, 8, generator=generator)
    labels = torch.randint(0, 4, (60,), generator=generator)
    got = knn_predict(bank, labels, queries, num_classes=4, k=k, temperature=0.1, chunk_size=chunk_size)
    torch.testing.assert_close(got, naive_knn(bank, labels, queries, 4, min(k, 60), 0.1))


def test_separable_clusters_give_full_accuracy(generator):
    centres = torch.eye(5, 16) * 10
    bank_labels = torch.arange(5).repeat(40)
    query_labels = torch.arange(5).repeat(9)
    bank = centres[bank_labels] + torch.randn(200, 16, generator=generator)
    queries = centres[query_labels] + torch.randn(45, 16, generator=generator)
    assert knn_top1(bank, bank_labels, queries, query_labels, num_classes=5, k=200, chunk_size=8) == 1.0


def test_accuracy_is_the_fraction_right(generator):
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0], [0.2, 1.0]])
    accuracy = knn_top1(bank, torch.tensor([0, 1]), queries, torch.tensor([0, 1, 1, 1]), num_classes=2, k=1)
    assert accuracy == pytest.approx(0.75)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="features must be"):
        knn_predict(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 5), num_classes=2)
    with pytest.raises(ValueError, match="one label per bank feature"):
        knn_predict(torch.randn(4, 3), torch.zeros(3), torch.randn(2, 3), num_classes=2)


def tiny_backbone() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_extract_features_in_eval_mode_and_restores_mode(generator):
    torch.manual_seed(0)
    backbone = tiny_backbone().train()
    images = torch.randint(0, 256, (10, 1, 9, 9), generator=generator, dtype=torch.uint8)
    transform = lambda batch: batch.float() / 255  # noqa: E731
    whole = extract_features(backbone, images, batch_size=10, transform=transform)
    one_by_one = extract_features(backbone, images, batch_size=1, transform=transform)
    assert whole.shape == (10, 4)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(whole, one_by_one)  # batch norm used running statistics, not the batch's
    assert backbone.training
    assert not any(p.grad is not None for p in backbone.parameters())


def test_extract_features_bf16_autocast_returns_float32(generator):
    images = torch.randint(0, 256, (6, 1, 9, 9), generator=generator, dtype=torch.uint8)
    features = extract_features(
        tiny_backbone(), images, batch_size=4, transform=lambda b: b.float() / 255, precision=resolve_precision("bf16")
    )
    assert features.shape == (6, 4)
    assert features.dtype == torch.float32
