"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import write_fashion_mnist_slice

from pipeline.fashion_mnist import DEFAULT_DIR, ENV_VAR, find_fashion_mnist


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def fashion_mnist_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Fashion-MNIST slice: the first 600 train and 200 test images, as an IDX folder."""
    try:
        source = find_fashion_mnist(DEFAULT_DIR)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return write_fashion_mnist_slice(source, tmp_path_factory.mktemp("fashion-mnist"), train=600, test=200)


@pytest.fixture
def fashion_mnist_env(fashion_mnist_slice: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``fashion-mnist`` sources read the slice (``$MOCOPLUS_FASHION_MNIST_DIR`` points at it)."""
    monkeypatch.setenv(ENV_VAR, str(fashion_mnist_slice))
    return fashion_mnist_slice
