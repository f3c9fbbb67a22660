"""Shared fixtures."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import write_fashion_mnist_slice

from pipeline.data.config import IngestConfig
from pipeline.data.fashion_mnist import DEFAULT_DIR, ENV_VAR, find_fashion_mnist
from pipeline.data.ingest import ingest
from pipeline.embed.config import EmbedConfig
from pipeline.embed.embed import embed
from pipeline.export.config import ExportConfig
from pipeline.export.export import export
from pipeline.index.config import IndexConfig
from pipeline.train.trainer import train

SMALL_EXPORT = ExportConfig(parity_images=64)  # parity on 64 images: enough to catch a mismatch, quick


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers) each worker, and every process its tests start,
    gets its share of the cores for torch's thread pool (``OMP_NUM_THREADS``): two workers each running a
    pool as wide as the machine oversubscribe it, and OpenMP threads that wait on a descheduled partner made
    small-batch forward passes 10-20 times slower, measured on 2 cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


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


def _ingest_slice(spec: str, slice_dir: Path, out: Path, shard_size: int) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_VAR, str(slice_dir))
        ingest(spec, out, IngestConfig(shard_size=shard_size, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def fashion_shards(fashion_mnist_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 600-image real train slice as 3 shards (250, 250, 100): fewer shards than 2 ranks × 2 workers."""
    return _ingest_slice("fashion-mnist:train", fashion_mnist_slice, tmp_path_factory.mktemp("fashion-train"), 250)


@pytest.fixture(scope="session")
def fashion_test_shards(fashion_mnist_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 200-image real test slice as one shard: held-out queries for kNN."""
    return _ingest_slice("fashion-mnist:test", fashion_mnist_slice, tmp_path_factory.mktemp("fashion-test"), 250)


@pytest.fixture(scope="session")
def trained_run(fashion_shards: Path, fashion_test_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of four real training steps on the train slice: a real checkpoint, not a useful model."""
    from test_train import tiny_config

    run = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(fashion_shards, "train.max_steps=4", eval_shards=fashion_test_shards), run, progress=False)
    return run


@pytest.fixture(scope="session")
def bundle(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run exported as a model bundle (tests that damage a bundle copy it first)."""
    out = tmp_path_factory.mktemp("bundles") / "model"
    export(trained_run, out, SMALL_EXPORT)
    return out


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway Prefect home and API for this module's flow runs."""
    home = tmp_path_factory.mktemp("prefect-home")
    saved = {name: os.environ.get(name) for name in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def corpus(bundle, fashion_test_shards, tmp_path_factory) -> dict:
    """The 200 test images: their PNG bytes by key, their offline embeddings, and an IVF index of them."""
    from pipeline.index.build import build_index  # FAISS only where an index is built

    root = tmp_path_factory.mktemp("service")
    embed(bundle, str(fashion_test_shards), root / "emb", EmbedConfig(workers=0), progress=False)
    build_index(root / "emb", root / "index", IndexConfig(kind="ivf", queries=20), progress=False)
    record = json.loads((root / "emb" / "part-000000.json").read_text())
    vectors = dict(zip(record["keys"], np.load(root / "emb" / "part-000000.npy"), strict=True))
    images = {}
    for shard in sorted(Path(fashion_test_shards).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    images[member.name.removesuffix(".png")] = tar.extractfile(member).read()
    return {"index": root / "index", "vectors": vectors, "images": images, "keys": record["keys"]}


def copy_corpus(corpus: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the corpus's embedding set and index, the index pointing at the copy."""
    source = json.loads((Path(corpus["index"]) / "current" / "index.json").read_text())["embeddings"]["path"]
    embeddings = tmp_path / "emb"
    shutil.copytree(source, embeddings)
    copied = tmp_path / "index"
    shutil.copytree(corpus["index"], copied)
    info = json.loads((copied / "current" / "index.json").read_text())
    info["embeddings"]["path"] = str(embeddings)
    (copied / "current" / "index.json").write_text(json.dumps(info))
    return embeddings, copied
