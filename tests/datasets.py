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


class PhotoFolder:
    """A catalogue folder of real images that changes like a user's: Fashion-MNIST rows as PNGs in class folders.

    Image ``i`` of the slice's train split is ``ROOT/<class>/img<i>.png``; `add`,
    `remove` and `overwrite` change the folder as a day of new, deleted and
    re-shot photos would (an overwrite puts another image's pixels at the same path).
    """

    def __init__(self, slice_dir: Path, root: Path) -> None:
        from pipeline.data.fashion_mnist import CLASS_NAMES

        data = load_split(slice_dir, "train")
        self.pixels, self.labels, self.root = data.images, data.labels, root
        self.classes = [name.replace("/", "-").replace(" ", "_") for name in CLASS_NAMES]
        self.shown: dict[int, int] = {}  # image number → the slice row its file shows now

    def path(self, number: int) -> Path:
        return self.root / self.classes[int(self.labels[number])] / f"img{number:04d}.png"

    def key(self, number: int) -> str:
        return f"{self.classes[int(self.labels[number])]}/img{number:04d}"

    def add(self, numbers) -> None:
        for number in numbers:
            self._write(number, number)

    def remove(self, numbers) -> None:
        for number in numbers:
            self.path(number).unlink()
            del self.shown[number]

    def overwrite(self, numbers, rows) -> None:
        for number, row in zip(numbers, rows, strict=True):
            self._write(number, row)

    def _write(self, number: int, row: int) -> None:
        path = self.path(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.pixels[row]).save(path)
        self.shown[number] = row

    def live_keys(self) -> set[str]:
        return {self.key(number) for number in self.shown}
