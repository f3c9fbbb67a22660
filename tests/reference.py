"""Naive, loop-based references for the objective, in float64.

See docs/architecture.md, "The method".

One anchor at a time, Python sorting for the selection: slow and obviously
right, which is the point.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_negatives(
    similarities: list[float], mode: str, k: int | None, skip: int, threshold: float | None, skip_fraction: float = 0.0
) -> list[int]:
    order = sorted(range(len(similarities)), key=lambda j: -similarities[j])
    skip = skip or round(skip_fraction * len(similarities))
    if mode in ("all", "debiased", "hard-weighted"):
        return list(range(len(similarities)))
    if mode == "topk":
        return order[:k]
    if mode == "band":
        return order[skip:] if k is None else order[skip : skip + k]
    if mode == "threshold":
        rest = [j for j in order if similarities[j] <= threshold]
        return rest if k is None else rest[:k]
    raise ValueError(mode)


def naive_info_nce(
    anchors: Tensor,
    positives: Tensor,
    queue: Tensor,
    temperature: float,
    negatives: str = "all",
    num_negatives: int | None = None,
    skip_negatives: int = 0,
    negative_threshold: float | None = None,
    skip_negatives_fraction: float = 0.0,
    debias_prior: float = 0.1,
    hardness: float = 1.0,
) -> Tensor:
    """Mean over anchors of −log(e^{a·p/τ} / (e^{a·p/τ} + Σ_{n∈N(a)} e^{a·n/τ})), or of its debiased form.

    ``debiased`` / ``hard-weighted`` (β = 0 / β) replace the sum with Chuang et al.'s and Robinson et al.'s
    estimate: max((M·Σ w·e^{a·n/τ} / Σ w − τ⁺·M·e^{a·p/τ}) / (1 − τ⁺), M·e^{−1/τ}), w = e^{β·a·n/τ}
    (τ⁺ = ``debias_prior``, β = ``hardness``: the settings' names in the config).
    """
    mode, tau_plus, beta = negatives, debias_prior, hardness
    losses = []
    for a, p in zip(anchors, positives, strict=True):
        similarities = [float(a.detach() @ n) for n in queue]
        chosen = naive_negatives(
            similarities, mode, num_negatives, skip_negatives, negative_threshold, skip_negatives_fraction
        )
        positive = torch.exp(a @ p / temperature)
        exps = [torch.exp(a @ queue[j] / temperature) for j in chosen]
        if mode in ("debiased", "hard-weighted"):
            weights = [
                torch.exp((beta if mode == "hard-weighted" else 0.0) * (a @ queue[j]) / temperature) for j in chosen
            ]
            count = len(chosen)
            weighted = count * sum(w * e for w, e in zip(weights, exps, strict=True)) / sum(weights)
            estimate = (weighted - tau_plus * count * positive) / (1 - tau_plus)
            negative_sum = torch.maximum(
                estimate, torch.tensor(count * math.exp(-1 / temperature), dtype=estimate.dtype)
            )
        else:
            negative_sum = sum(exps, torch.zeros((), dtype=positive.dtype))
        losses.append(-torch.log(positive / (positive + negative_sum)))
    return torch.stack(losses).mean()


def naive_dual_view(q1, q2, k1, k2, queue, dual_view: str, weight: float, temperature: float, **selection) -> Tensor:
    first = naive_info_nce(q1, k2, queue, temperature, **selection)
    if dual_view == "none":
        return first
    if dual_view == "symmetric":
        return 0.5 * (first + naive_info_nce(q2, k1, queue, temperature, **selection))
    if dual_view == "key-anchor":
        return first + weight * naive_info_nce(k2.detach(), q1, queue, temperature, **selection)
    raise ValueError(dual_view)


def unit_vectors(generator: torch.Generator, n: int, d: int, *, requires_grad: bool = False) -> Tensor:
    """``n`` random L2-normalised float64 vectors of dimension ``d``."""
    vectors = torch.nn.functional.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1)
    return vectors.requires_grad_(requires_grad)
