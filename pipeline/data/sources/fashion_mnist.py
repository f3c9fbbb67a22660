"""Fashion-MNIST (``fashion-mnist[:train|:test]``) as a source: its IDX images as an in-memory array."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.fashion_mnist import CLASS_NAMES, find_fashion_mnist, load_split, split_paths
from pipeline.data.sources.base import ArrayRow, Source, SourceItem, file_signature, fingerprint

FASHION_MNIST = "fashion-mnist"


def claims(spec: str) -> bool:
    return spec == FASHION_MNIST or spec.startswith(f"{FASHION_MNIST}:")


def fashion_mnist_source(spec: str, directory: Path | None = None) -> Source:
    """``fashion-mnist`` (both splits, train first), ``fashion-mnist:train`` or ``fashion-mnist:test``.

    Keys are ``train_00017`` / ``test_00017``, labels Fashion-MNIST's ten
    classes. Read from Debian's IDX files (or ``$MOCOPLUS_FASHION_MNIST_DIR``),
    else from torchvision's download cache, fetching it there if the network
    allows.
    """
    _, _, split = spec.partition(":")
    splits = ("train", "test") if not split else (split,)
    if any(name not in ("train", "test") for name in splits):
        raise ValueError(f"unknown Fashion-MNIST split in {spec!r}: use fashion-mnist, fashion-mnist:train or :test")
    folder = _locate_fashion_mnist(directory)
    items, signatures = [], []
    for name in splits:
        data = load_split(folder, name)  # type: ignore[arg-type]
        files = [f"{path.name}\t{file_signature(path)}" for path in split_paths(folder, name)]  # type: ignore[arg-type]
        signature = fingerprint(files)[:16]  # a row changes only with its split's files
        for index, label in enumerate(data.labels.tolist()):
            origin = f"{name}[{index}]"
            row = ArrayRow(origin, data.images[index])
            items.append(SourceItem(f"{name}_{index:05d}", int(label), origin, row, signature))
        signatures.extend(files)
    return Source(FASHION_MNIST, spec, items, CLASS_NAMES, fingerprint(signatures), chunk_size=512)


def _download_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mocoplus" / "fashion-mnist"


def _locate_fashion_mnist(directory: Path | None) -> Path:
    """The IDX folder: the given or default one, else torchvision's download (cached), else a clear error."""
    try:
        return find_fashion_mnist(directory)
    except FileNotFoundError as missing:
        if directory is not None:
            raise
        raw = _download_dir() / "FashionMNIST" / "raw"
        try:
            return find_fashion_mnist(raw)
        except FileNotFoundError:
            pass
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(_download_dir()), train=True, download=True)
            FashionMNIST(str(_download_dir()), train=False, download=True)
            return find_fashion_mnist(raw)
        except Exception as error:  # no network, a proxy, a mirror down: all say the same to the user
            raise FileNotFoundError(
                f"{missing}; torchvision's download into {_download_dir()} failed too ({error})"
            ) from None
