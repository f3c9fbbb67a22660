"""Test data made on the spot: IDX files, a real Fashion-MNIST slice, generated images."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.fashion_mnist import load_split


def idx_bytes(array: np.ndarray, *, dims: tuple[int, ...] | None = None, magic: bytes | None = None) -> bytes:
    """An unsigned-byte IDX file; ``dims``/``magic`` override the header to make broken ones."""
    dims = array.shape if dims is None else dims
    magic = bytes([0, 0, 0x08, len(dims)]) if magic is None else magic
    return magic + struct.pack(f">{len(dims)}I", *dims) + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, *, gz: bool = True) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_split(
    directory: Path, split: str, images: np.ndarray, labels: np.ndarray, *, gz: bool = True
) -> tuple[Path, Path]:
    prefix = "train" if split == "train" else "t10k"
    return (
        write(directory / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz=gz),
        write(directory / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz=gz),
    )


def write_fashion_mnist_slice(source: Path, target: Path, *, train: int, test: int) -> Path:
    """The first ``train``/``test`` real images of each split as a complete IDX folder at ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        data = load_split(source, split, limit=count)  # type: ignore[arg-type]
        write_split(target, split, data.images, data.labels)
    return target


def noise_image(size: tuple[int, int] = (24, 20), mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels, ``size`` = (width, height), in any 8-bit PIL mode (L, RGB, RGBA, CMYK, LA, ...)."""
    bands = Image.getmodebands(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.frombytes(mode, size, pixels.tobytes())


def write_image(path: Path, *, size: tuple[int, int] = (24, 20), mode: str = "RGB", seed: int = 0, **save) -> Path:
    """`noise_image` saved at ``path`` in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(size, mode, seed).save(path, **save)
    return path
