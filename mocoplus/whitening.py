"""PCA whitening of embeddings, fitted on the memory set: the learned features' directions given equal weight.

Contrastive encoders spread their variance over few directions (the
"dimensional collapse" of Jing et al. 2022): a handful of principal
components carry most of the energy, so cosine similarity is decided by them
and the many low-variance directions that still separate classes count for
little. Whitening, ``x ↦ (x − μ) V Λ^(−p)`` with ``μ`` the mean, ``V`` the
eigenvectors and ``Λ`` the eigenvalues of the memory set's covariance,
rescales every principal direction to the same variance (``p = ½``) before
the cosine — the retrieval practice of Jégou & Chum 2012 ("Negative evidences
and co-occurrences in image retrieval: the benefit of PCA and whitening") and
of R-MAC descriptors. It uses no labels and only the memory (training) set,
never the queries.

Directions whose variance is below ``relative_floor`` times the largest (dead
ReLU channels, exact linear dependencies) are dropped rather than blown up, so
the output may have a few dimensions fewer than the input.

``dims`` keeps only the leading principal directions: PCA-whitening *with
reduction* (Jégou & Chum; Radenović et al. 2018, arXiv 1711.02512). The
trailing directions carry little of the retrieval and most of the noise, and
a vector of 256 numbers costs an eighth of 2,048 in every index and on every
wire. The output keeps the principal order, so its first coordinates are the
directions of largest variance (what a 2-D map reads).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class WhiteningConfig:
    power: float = 0.5  # eigenvalues^-power: 0.5 whitens, 0 only centres and rotates (distances kept)
    relative_floor: float = 1e-6  # drop directions with variance below this share of the largest
    dims: int | None = None  # keep the leading principal directions only (None: all above the floor)

    def __post_init__(self) -> None:
        if not 0 <= self.power <= 1 or not 0 < self.relative_floor < 1:
            raise ValueError(f"whitening needs 0 <= power <= 1 and 0 < relative_floor < 1; got {self}")
        if self.dims is not None and self.dims < 1:
            raise ValueError(f"whitening dims must be >= 1 (or None: all); got {self.dims}")


class CovarianceAccumulator:
    """Mean and covariance of feature batches in float64, one pass, constant memory in the number of rows.

    float64 throughout: whitening divides by eigenvalues down to 1e-6 of the
    largest, which float32 sums of 60,000 outer products cannot resolve.

    Sums are taken around the first batch's mean (a shift that keeps the
    one-pass formula free of the cancellation of raw second moments).
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: Tensor | None = None
        self.total: Tensor | None = None
        self.outer: Tensor | None = None
        self._eigen: tuple[Tensor, Tensor, Tensor] | None = None

    def add(self, features: Tensor) -> None:
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"whitening fits on non-empty [N, D] features; got shape {tuple(features.shape)}")
        rows = features.detach().to("cpu", torch.float64)
        if not torch.isfinite(rows).all():
            raise ValueError("whitening cannot fit features that hold NaN or infinity")
        if self.shift is None:
            self.shift = rows.mean(dim=0)
            self.total = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64)
        elif rows.shape[1] != len(self.shift):
            raise ValueError(f"feature width changed from {len(self.shift)} to {rows.shape[1]}")
        centred = rows - self.shift
        self.total += centred.sum(dim=0)
        self.outer += centred.T @ centred
        self.count += len(rows)
        self._eigen = None

    def mean_and_covariance(self) -> tuple[Tensor, Tensor]:
        if self.count < 2 or self.shift is None or self.total is None or self.outer is None:
            raise ValueError(f"whitening needs at least 2 feature rows; got {self.count}")
        offset = self.total / self.count
        covariance = self.outer / self.count - torch.outer(offset, offset)
        return self.shift + offset, covariance

    def eigen(self) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, eigenvalues (ascending) and eigenvectors of the covariance, decomposed once per set of rows:
        an int8 export fits whitenings of several widths from one pass, and the decomposition of a
        2,048-wide covariance is most of each fit."""
        if self._eigen is None:
            mean, covariance = self.mean_and_covariance()
            self._eigen = (mean, *torch.linalg.eigh(covariance))
        return self._eigen


class PcaWhitening(nn.Module):
    """``x ↦ (x − mean) @ projection``: a fixed linear map, exportable to TorchScript and ONNX as it stands."""

    def __init__(self, mean: Tensor, projection: Tensor) -> None:
        super().__init__()
        if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != len(mean):
            raise ValueError(f"mean [D] and projection [D, K] expected; got {tuple(mean.shape)}, {projection.shape}")
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("projection", projection.float().clone())

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[1])

    def forward(self, features: Tensor) -> Tensor:
        return (features.float() - self.mean) @ self.projection

    @classmethod
    def fit(cls, batches: Tensor | Iterable[Tensor], config: WhiteningConfig = WhiteningConfig()) -> PcaWhitening:
        """Fit on ``[N, D]`` features (or an iterable of such batches, streamed)."""
        accumulator = CovarianceAccumulator()
        for batch in [batches] if isinstance(batches, Tensor) else batches:
            accumulator.add(batch)
        return cls.from_accumulator(accumulator, config)

    @classmethod
    def from_accumulator(
        cls, accumulator: CovarianceAccumulator, config: WhiteningConfig = WhiteningConfig()
    ) -> PcaWhitening:
        """Fit on the statistics gathered by ``accumulator`` (for callers that stream features themselves)."""
        mean, eigenvalues, eigenvectors = accumulator.eigen()  # ascending
        keep = eigenvalues > config.relative_floor * eigenvalues[-1].clamp_min(torch.finfo(torch.float64).tiny)
        if not keep.any():
            raise ValueError("whitening cannot fit features without variance (all rows equal)")
        eigenvalues, eigenvectors = eigenvalues[keep].flip(0), eigenvectors[:, keep].flip(1)
        if config.dims is not None:  # largest first: the leading directions
            eigenvalues, eigenvectors = eigenvalues[: config.dims], eigenvectors[:, : config.dims]
        return cls(mean, eigenvectors * eigenvalues.pow(-config.power))
