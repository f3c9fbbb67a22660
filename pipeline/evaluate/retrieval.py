"""The retrieval suite: how well do a feature's nearest neighbours share a query's label?

One protocol for the encoder and for its label-free baselines (raw pixels,
HOG), so that a comparison is like with like: cosine similarity, the training
set as memory, the held-out set as queries, and five scores from one top-200
search per query:

- **weighted kNN-200** (τ 0.1): the k = 200 nearest vote with weight
  exp(sim / τ) (InstDisc, MoCo's CIFAR monitor; `pipeline.knn.knn_predict`);
- **1-, 5- and 20-NN**: plain majority vote of the k nearest; a tie goes to
  the tied class that appears first in the ranking (so 1-NN is the nearest
  neighbour's label and ties never depend on class numbering);
- **precision@10**: the share of the 10 nearest that carry the query's label
  (what a search user sees on the first page).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

MAJORITY_KS = (1, 5, 20)
PRECISION_AT = 10
WEIGHTED_K = 200
WEIGHTED_TEMPERATURE = 0.1


@dataclass(frozen=True)
class RetrievalScores:
    """The suite's five scores, each a fraction in [0, 1]."""

    weighted_knn200: float
    nn1: float
    nn5: float
    nn20: float
    precision_at_10: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


SCORE_LABELS = {
    "weighted_knn200": "weighted kNN-200",
    "nn1": "1-NN",
    "nn5": "5-NN",
    "nn20": "20-NN",
    "precision_at_10": "precision@10",
}
# column headers where many feature sets share one 80-column table
SCORE_HEADERS = {"weighted_knn200": "kNN-200", "nn1": "1-NN", "nn5": "5-NN", "nn20": "20-NN", "precision_at_10": "P@10"}


def majority_vote(neighbour_labels: Tensor, num_classes: int) -> Tensor:
    """Majority label of each row of ``neighbour_labels`` [M, k] (ranked nearest first), ties to the earliest.

    A class's score is its count times (k + 1) plus how early it first appears,
    so counts decide and, among equal counts, the better-ranked class wins.
    """
    rows, k = neighbour_labels.shape
    counts = torch.zeros(rows, num_classes, dtype=torch.long, device=neighbour_labels.device)
    counts.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))
    earliness = torch.zeros(rows, num_classes, dtype=torch.long, device=neighbour_labels.device)
    rank_bonus = torch.arange(k, 0, -1, device=neighbour_labels.device).expand(rows, k)  # k for the nearest
    earliness.scatter_reduce_(1, neighbour_labels, rank_bonus, reduce="amax")
    return (counts * (k + 1) + earliness).argmax(dim=1)


@torch.no_grad()
def retrieval_scores(
    bank_features: Tensor,
    bank_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    *,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> RetrievalScores:
    """The suite for features ``[N, D]`` (memory) and ``[M, D]`` (queries); need not be normalised."""
    if bank_features.ndim != 2 or query_features.ndim != 2 or bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"features must be [N, D] and [M, D]; got {tuple(bank_features.shape)}, {tuple(query_features.shape)}"
        )
    if len(bank_labels) != len(bank_features) or len(query_labels) != len(query_features) or not len(query_labels):
        raise ValueError("need one label per feature and at least one query")
    k = min(WEIGHTED_K, len(bank_features))
    if k < max(*MAJORITY_KS, PRECISION_AT):
        raise ValueError(f"the memory needs at least {max(*MAJORITY_KS, PRECISION_AT)} features; got {k}")
    bank_labels, query_labels = bank_labels.long(), query_labels.long()
    classes = num_classes or int(max(bank_labels.max(), query_labels.max())) + 1
    bank = F.normalize(bank_features.float(), dim=1)
    correct = dict.fromkeys(SCORE_LABELS, 0.0)
    for queries, truth in zip(
        F.normalize(query_features.float(), dim=1).split(chunk_size), query_labels.split(chunk_size), strict=True
    ):
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)
        labels = bank_labels[neighbours]
        weighted = torch.zeros(len(queries), classes).scatter_add_(1, labels, (similarity / WEIGHTED_TEMPERATURE).exp())
        correct["weighted_knn200"] += (weighted.argmax(dim=1) == truth).sum().item()
        for majority_k in MAJORITY_KS:
            predicted = majority_vote(labels[:, :majority_k], classes)
            correct[f"nn{majority_k}"] += (predicted == truth).sum().item()
        correct["precision_at_10"] += (labels[:, :PRECISION_AT] == truth[:, None]).float().mean(dim=1).sum().item()
    return RetrievalScores(**{name: total / len(query_labels) for name, total in correct.items()})
