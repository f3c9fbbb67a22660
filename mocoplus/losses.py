"""The contrastive objective: InfoNCE over a queue, hard-negative selection and
the dual-view modes (docs/architecture.md, "The method"); the selection itself is `mocoplus.negatives`.

    l(a, p, N) = -log( e^{a·p/τ} / (e^{a·p/τ} + Σ_{n∈N} e^{a·n/τ}) )

Logits against the whole queue are computed once with gradient; the selection
(top-k, band, threshold) runs on them detached and the chosen logits are
gathered from the differentiable matrix, so selection costs one top-k and a
gather, and backward is the same matmul as plain MoCo. Rows left with
fewer than ``k`` candidates are padded with masked (−inf) logits: the positive
is always present, so log-sum-exp stays finite and nothing turns NaN.

Everything here runs in at least float32 with autocast off: bf16 logits over a
65k queue lose the differences that hard-negative mining is about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mocoplus.config import DUAL_VIEWS
from mocoplus.negatives import ALL_NEGATIVES, NEGATIVE_MODES, NegativeSampling, select_negatives


@dataclass(frozen=True)
class ContrastiveResult:
    """The loss and the similarity statistics a trainer logs (all detached but ``loss``)."""

    loss: Tensor
    positive_similarity: Tensor
    negative_similarity: Tensor
    selected_negative_similarity: Tensor


def _log_negative_sum(negatives: Tensor, positive: Tensor, sampling: NegativeSampling, temperature: float) -> Tensor:
    """log of the denominator's negative term per row: log Σ e^{a·n/τ}, or the debiased estimate of it.

    ``debiased`` / ``hard-weighted`` replace the sum over M queue entries by

        N_g = max( (M · Σ w·e^{a·n/τ} / Σ w  −  τ⁺·M·e^{a·p/τ}) / (1 − τ⁺),  M·e^{−1/τ} )

    with w = e^{β·a·n/τ} (β = 0 for ``debiased``): the importance-weighted mean
    of the negatives with the expected same-class share (prior τ⁺) removed,
    floored at its theoretical minimum. Gradients flow through the weights, as
    in the authors' code. Computed relative to a per-row shift so e^{1/τ}
    never overflows.
    """
    if not sampling.reweights:
        return torch.logsumexp(negatives, dim=1)
    count = negatives.shape[1]
    concentration = NEGATIVE_MODES[sampling.negatives].concentration
    beta = concentration(sampling) if concentration is not None else 0.0
    log_weighted_sum = (
        torch.logsumexp((1.0 + beta) * negatives, dim=1) - torch.logsumexp(beta * negatives, dim=1) + math.log(count)
    )
    shift = torch.maximum(log_weighted_sum, positive).detach()
    prior = sampling.debias_prior
    estimate = (torch.exp(log_weighted_sum - shift) - prior * count * torch.exp(positive - shift)) / (1.0 - prior)
    floor = count * math.exp(-1.0 / temperature) * torch.exp(-shift)
    return torch.log(torch.maximum(estimate, floor)) + shift


def contrastive_loss(
    anchors: Tensor,
    positives: Tensor,
    queue: Tensor,
    *,
    temperature: float,
    sampling: NegativeSampling = ALL_NEGATIVES,
) -> ContrastiveResult:
    """Mean over the batch of l(a, p, N(a)); see the module docstring."""
    if anchors.ndim != 2 or anchors.shape != positives.shape:
        raise ValueError(
            f"anchors and positives must both be [B, d]; got {tuple(anchors.shape)} and {tuple(positives.shape)}"
        )
    if queue.ndim != 2 or queue.shape[1] != anchors.shape[1]:
        raise ValueError(f"queue must be [K, {anchors.shape[1]}]; got {tuple(queue.shape)}")
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        scaled = anchors.to(dtype) / temperature  # scale B×d, not the B×K logits
        positive = (scaled * positives.to(dtype)).sum(dim=1)
        logits = scaled @ queue.to(dtype).T
        indices, valid = select_negatives(logits.detach(), sampling, scale=1.0 / temperature)
        negatives = logits if indices is None else logits.gather(1, indices)
        if valid is not None:
            negatives = negatives.masked_fill(~valid, float("-inf"))
        # log(e^pos + Σ e^neg) − pos, without concatenating a [B, 1+M] copy
        loss = (
            torch.logaddexp(positive, _log_negative_sum(negatives, positive, sampling, temperature)) - positive
        ).mean()
    with torch.no_grad():
        negative_similarity = logits.mean() * temperature
        if indices is None and valid is None:
            selected_similarity = negative_similarity
        else:
            kept = negatives if valid is None else negatives.where(valid, 0.0)
            count = max(kept.numel(), 1) if valid is None else valid.sum().clamp(min=1)  # no host sync on GPU
            selected_similarity = kept.sum() * temperature / count
    return ContrastiveResult(
        loss=loss,
        positive_similarity=positive.detach().mean() * temperature,
        negative_similarity=negative_similarity,
        selected_negative_similarity=selected_similarity,
    )


def info_nce(
    anchors: Tensor,
    positives: Tensor,
    queue: Tensor,
    *,
    temperature: float,
    negatives: str = "all",
    num_negatives: int | None = None,
    skip_negatives: int = 0,
    negative_threshold: float | None = None,
    skip_negatives_fraction: float = 0.0,
    debias_prior: float = 0.1,
    hardness: float = 1.0,
) -> Tensor:
    """InfoNCE of L2-normalised ``anchors`` [B,d] vs ``positives`` [B,d] and a ``queue`` [K,d].

    ``negatives`` selects, per anchor, which queue entries enter the
    denominator, with the settings of the same names as in the config
    (`mocoplus.negatives.NegativeSampling`): ``all``, ``topk``
    (``num_negatives`` most similar), ``band`` (skip the ``skip_negatives``
    most similar, keep the next ``num_negatives``), ``threshold`` (drop those
    with similarity > ``negative_threshold``, keep the ``num_negatives`` most
    similar of the rest), ``debiased`` (class prior ``debias_prior``) or
    ``hard-weighted`` (also ``hardness``). Gradients flow to anchors and
    positives, never through the selection.
    """
    sampling = NegativeSampling(
        negatives=negatives,  # type: ignore[arg-type]
        num_negatives=num_negatives,
        skip_negatives=skip_negatives,
        negative_threshold=negative_threshold,
        skip_negatives_fraction=skip_negatives_fraction,
        debias_prior=debias_prior,
        hardness=hardness,
    )
    return contrastive_loss(anchors, positives, queue, temperature=temperature, sampling=sampling).loss


def dual_view_loss(
    q1: Tensor,
    k2: Tensor,
    queue: Tensor,
    *,
    mode: str,
    temperature: float,
    sampling: NegativeSampling = ALL_NEGATIVES,
    q2: Tensor | None = None,
    k1: Tensor | None = None,
    key_anchor_weight: float = 1.0,
) -> ContrastiveResult:
    """The objective for one batch of two views (q = query, k = key embeddings).

    - ``none``: l(q1, k2, N(q1)) — MoCo v2.
    - ``symmetric``: ½[l(q1, k2, N(q1)) + l(q2, k1, N(q2))] — both views anchor.
    - ``key-anchor``: l(q1, k2, N(q1)) + λ·l(k2, q1, N(k2)) — the key embedding
      anchors too, its positive the query; gradient reaches q1 from both terms.
    """
    if mode not in DUAL_VIEWS:
        raise ValueError(f"dual_view must be one of {', '.join(DUAL_VIEWS)}; got {mode!r}")
    terms = [contrastive_loss(q1, k2, queue, temperature=temperature, sampling=sampling)]
    weights = [1.0]
    if mode == "symmetric":
        if q2 is None or k1 is None:
            raise ValueError("dual_view='symmetric' needs q2 and k1")
        terms.append(contrastive_loss(q2, k1, queue, temperature=temperature, sampling=sampling))
        weights = [0.5, 0.5]
    elif mode == "key-anchor":
        terms.append(contrastive_loss(k2.detach(), q1, queue, temperature=temperature, sampling=sampling))
        weights = [1.0, key_anchor_weight]
    if len(terms) == 1:
        return terms[0]

    def mean_of(field: str) -> Tensor:
        return torch.stack([getattr(t, field) for t in terms]).mean()

    return ContrastiveResult(
        loss=sum(w * t.loss for w, t in zip(weights, terms, strict=True)),
        positive_similarity=mean_of("positive_similarity"),
        negative_similarity=mean_of("negative_similarity"),
        selected_negative_similarity=mean_of("selected_negative_similarity"),
    )
