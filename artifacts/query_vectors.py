"""What makes a query vector searchable, shared by the search command and the service (no FAISS here).

Scores are float32: inner products, or squared L2 distances of about the
query's norm squared. Past sqrt(float32 max) ≈ 1.8e19 they overflow to
infinity and rank nothing (a 200 with ``"score": null`` in arbitrary order, or
``Infinity`` in JSON output). Embeddings have norm 1, so a bound far above
that refuses only vectors that could never mean anything.
"""

from __future__ import annotations

import numpy as np

MAX_QUERY_NORM = 1e18


class QueryVectorError(ValueError):
    """A query vector that cannot be searched: NaN, infinity, or so long that its scores overflow."""


def query_vector_problem(vector: np.ndarray) -> str | None:
    """Why ``vector`` cannot be searched, in a few words; None when it can."""
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(vector).all():
            return "contains NaN or infinity"
        norm = float(np.linalg.norm(np.asarray(vector, dtype=np.float64)))
    if norm > MAX_QUERY_NORM:
        return f"its norm {norm:.3g} exceeds {MAX_QUERY_NORM:.0e}: its scores would overflow float32"
    return None
