"""PCA whitening against a naive float64 numpy reference, streamed and one-shot, on degenerate and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mocoplus.whitening import CovarianceAccumulator, PcaWhitening, WhiteningConfig


def correlated(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Features with a strongly anisotropic covariance (eigenvalues spanning four orders) and a large mean."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    return (torch.randn(rows, dim, generator=generator, dtype=torch.float64) * scales) @ mixing + 50.0


def naive_whiten(bank: np.ndarray, rows: np.ndarray, power: float) -> np.ndarray:
    mean = bank.mean(axis=0)
    covariance = np.cov(bank, rowvar=False, bias=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    return (rows - mean) @ eigenvectors @ np.diag(eigenvalues**-power)


@pytest.mark.parametrize("power", [0.0, 0.25, 0.5])
def test_matches_the_naive_reference_up_to_the_signs_of_the_eigenvectors(power):
    bank, queries = correlated(500, 12), correlated(40, 12, seed=1)
    whitening = PcaWhitening.fit(bank.float(), WhiteningConfig(power=power))
    ours = whitening(queries.float()).double().numpy()
    reference = naive_whiten(bank.numpy(), queries.numpy(), power)
    # eigenvector signs are arbitrary, so compare what retrieval sees: every inner product between rows
    np.testing.assert_allclose(ours @ ours.T, reference @ reference.T, rtol=2e-3, atol=2e-3 * np.abs(reference).max())


def test_the_whitened_memory_set_has_identity_covariance_and_zero_mean():
    bank = correlated(2000, 16)
    whitened = PcaWhitening.fit(bank)(bank.float()).double()
    assert whitened.mean(dim=0).abs().max() < 1e-3
    covariance = whitened.T @ whitened / len(whitened)
    torch.testing.assert_close(covariance, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)


def test_power_zero_keeps_distances():
    bank = correlated(300, 8)
    centred = PcaWhitening.fit(bank, WhiteningConfig(power=0.0))(bank.float()).double()
    torch.testing.assert_close(torch.cdist(centred, centred), torch.cdist(bank, bank), atol=1e-3, rtol=1e-5)


def test_a_stream_of_batches_fits_the_same_map_as_one_tensor():
    bank = correlated(1000, 10).float()
    whole = PcaWhitening.fit(bank)
    streamed = PcaWhitening.fit(iter(bank.split(97)))
    torch.testing.assert_close(streamed.mean, whole.mean)
    gram = lambda whitening: whitening(bank[:50]) @ whitening(bank[:50]).T  # noqa: E731
    torch.testing.assert_close(gram(streamed), gram(whole), atol=1e-2, rtol=1e-4)


def test_whitenings_of_several_widths_from_one_accumulator_decompose_once_and_follow_added_rows(monkeypatch):
    """An int8 export fits three widths from one pass: one eigendecomposition, until more rows come."""
    decompositions = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda matrix: decompositions.append(1) or eigh(matrix))
    bank, more, queries = correlated(400, 12), correlated(300, 12, seed=2), correlated(30, 12, seed=1)
    accumulator = CovarianceAccumulator()
    accumulator.add(bank)
    gram = lambda whitening: whitening(queries.float()) @ whitening(queries.float()).T  # noqa: E731
    for dims in (12, 6, 3):
        shared = PcaWhitening.from_accumulator(accumulator, WhiteningConfig(dims=dims))
        torch.testing.assert_close(gram(shared), gram(PcaWhitening.fit(bank, WhiteningConfig(dims=dims))))
    assert len(decompositions) == 1 + 3  # the shared one, and one for each fit of its own
    accumulator.add(more)
    grown = PcaWhitening.from_accumulator(accumulator, WhiteningConfig(dims=6))
    assert len(decompositions) == 5
    torch.testing.assert_close(gram(grown), gram(PcaWhitening.fit(torch.cat([bank, more]), WhiteningConfig(dims=6))))


def test_dead_and_duplicate_dimensions_are_dropped_not_blown_up():
    bank = correlated(400, 6)
    padded = torch.cat([bank, torch.zeros(400, 2, dtype=torch.float64), bank[:, :1] * 2], dim=1)  # 9 wide, rank 6
    whitening = PcaWhitening.fit(padded)
    assert (whitening.in_dim, whitening.out_dim) == (9, 6)
    output = whitening(torch.randn(5, 9))
    assert torch.isfinite(output).all()


def test_bad_input_is_refused_with_one_line():
    with pytest.raises(ValueError, match="at least 2"):
        PcaWhitening.fit(torch.ones(1, 4))
    with pytest.raises(ValueError, match="NaN or infinity"):
        PcaWhitening.fit(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="without variance"):
        PcaWhitening.fit(torch.ones(10, 3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        PcaWhitening.fit(torch.ones(10))
    with pytest.raises(ValueError, match="width changed"):
        PcaWhitening.fit(iter([torch.randn(4, 3), torch.randn(4, 2)]))
    with pytest.raises(ValueError, match="power"):
        WhiteningConfig(power=2.0)


def test_exports_to_torchscript_with_the_same_output():
    whitening = PcaWhitening.fit(correlated(100, 5)).eval()
    rows = torch.randn(3, 5)
    scripted = torch.jit.trace(whitening, rows)
    torch.testing.assert_close(scripted(rows), whitening(rows))


def test_dims_keeps_the_leading_principal_directions_of_the_naive_reference():
    """With reduction: the naive reference's eigenvectors of the largest eigenvalues only, largest first."""
    bank, queries = correlated(800, 12), correlated(30, 12, seed=1)
    whitening = PcaWhitening.fit(bank.float(), WhiteningConfig(dims=5))
    assert (whitening.in_dim, whitening.out_dim) == (12, 5)
    mean = bank.numpy().mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(bank.numpy(), rowvar=False, bias=True))
    leading = np.argsort(eigenvalues)[::-1][:5]
    reference = (queries.numpy() - mean) @ eigenvectors[:, leading] / np.sqrt(eigenvalues[leading])
    ours = whitening(queries.float()).double().numpy()
    np.testing.assert_allclose(np.abs(ours), np.abs(reference), rtol=5e-3, atol=5e-3 * np.abs(reference).max())
    whitened_bank = whitening(bank.float()).double()
    assert torch.all(whitened_bank.var(dim=0) > 0.99)  # each kept direction whitened to unit variance
    wider = PcaWhitening.fit(bank.float(), WhiteningConfig(dims=50))  # more than there are: all of them
    assert wider.out_dim == 12


def test_dims_must_be_positive():
    with pytest.raises(ValueError, match="dims must be >= 1"):
        WhiteningConfig(dims=0)
