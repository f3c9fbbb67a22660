"""Fashion-MNIST from its IDX files, with no download and no torchvision dataset class.

Debian's ``dataset-fashion-mnist`` package installs the four gzip'd IDX files
in ``/usr/share/datasets/fashion-mnist``; the demo and (later) the ingest stage
read them from there, so nothing downloads at run or test time. IDX is a tiny
format (magic number, big-endian dimensions, raw bytes), which is why a
truncated or mislabelled file is checked here and reported as a `ValueError`
naming the file, rather than surfacing later as a reshape error.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "MOCOPLUS_FASHION_MNIST_DIR"
INSTALL_HINT = f"install it with `apt-get install -y dataset-fashion-mnist` or point {ENV_VAR} at a folder holding it"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

SplitName = Literal["train", "test"]
_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_UBYTE = 0x08  # the only element type Fashion-MNIST uses
IMAGE_SIZE = 28


@dataclass(frozen=True)
class FashionMNISTSplit:
    """Images ``[N, 28, 28]`` and labels ``[N]``, both uint8, of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def split_files(split: SplitName) -> tuple[str, str]:
    """The (images, labels) base names of ``split``, without the optional ``.gz``."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    prefix = _PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _open(path: Path) -> BinaryIO:
    """Open gzip'd or plain IDX transparently (by the gzip magic, not the suffix)."""
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else path.open("rb")  # type: ignore[return-value]


def _read_exactly(stream: BinaryIO, count: int, path: Path, what: str) -> bytes:
    """``count`` bytes or a `ValueError` saying the file is truncated or corrupt."""
    try:
        data = stream.read(count)
    except (EOFError, OSError, zlib.error) as error:  # truncated or damaged gzip stream
        raise ValueError(f"{path}: corrupt or truncated gzip data while reading {what} ({error})") from error
    if len(data) != count:
        raise ValueError(f"{path}: truncated, expected {count} bytes of {what}, found {len(data)}")
    return data


def _at_end(stream: BinaryIO, path: Path) -> bool:
    """Whether the stream is exhausted; reading to the end is what checks a gzip file's CRC and length."""
    try:
        return stream.read(1) == b""
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt or truncated gzip data at the end of the file ({error})") from error


def _read_header(stream: BinaryIO, path: Path) -> tuple[int, ...]:
    magic = _read_exactly(stream, 4, path, "the IDX magic number")
    if magic[:2] != b"\x00\x00" or magic[2] != _UBYTE or magic[3] == 0:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic number 0x{magic.hex()})")
    ndim = magic[3]
    return struct.unpack(f">{ndim}I", _read_exactly(stream, 4 * ndim, path, "the IDX dimensions"))


def read_idx_header(path: Path) -> tuple[int, ...]:
    """The dimensions an IDX file declares, reading only its first bytes."""
    path = Path(path)
    with _open(path) as stream:
        return _read_header(stream, path)


def read_idx(path: Path, *, ndim: int, limit: int | None = None) -> np.ndarray:
    """A uint8 IDX file of ``ndim`` dimensions as an array; ``limit`` reads only the first items.

    Without ``limit`` the file must hold exactly what its header declares, no
    more and no less; with it, at least ``limit`` items must be readable.
    """
    path = Path(path)
    with _open(path) as stream:
        shape = _read_header(stream, path)
        if len(shape) != ndim:
            raise ValueError(f"{path}: expected {ndim} dimensions, the header declares {len(shape)} {shape}")
        count = shape[0] if limit is None else min(max(limit, 0), shape[0])
        item_size = int(np.prod(shape[1:], dtype=np.int64))
        data = _read_exactly(stream, count * item_size, path, f"{count} items of {item_size} bytes")
        if limit is None and not _at_end(stream, path):
            raise ValueError(f"{path}: trailing bytes after the {count} items its header declares")
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *shape[1:])  # writable, unlike bytes


def find_fashion_mnist(directory: Path | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (each ``.gz`` or plain).

    Looks at ``directory`` if given, else ``$MOCOPLUS_FASHION_MNIST_DIR``, else
    the Debian package's location, and says how to install it when missing.
    """
    if directory is not None:
        source = "the given folder"
    elif environ.get(ENV_VAR):
        directory, source = Path(environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        directory, source = DEFAULT_DIR, "the default folder"
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found: {directory} ({source}) is not a folder; {INSTALL_HINT}")
    missing = [name for split in _PREFIX for name in split_files(split) if _resolve(directory, name) is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST incomplete in {directory} ({source}): missing {', '.join(missing)}; {INSTALL_HINT}"
        )
    return directory


def _resolve(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def split_paths(directory: Path, split: SplitName) -> tuple[Path, Path]:
    """Existing (images, labels) paths of ``split`` in ``directory``, preferring the ``.gz`` files."""
    paths = []
    for name in split_files(split):
        path = _resolve(Path(directory), name)
        if path is None:
            raise FileNotFoundError(f"{Path(directory) / name}[.gz] not found; {INSTALL_HINT}")
        paths.append(path)
    return paths[0], paths[1]


def _declared_count(images_path: Path, labels_path: Path) -> int:
    images, labels = read_idx_header(images_path)[0], read_idx_header(labels_path)[0]
    if images != labels:
        raise ValueError(f"{images_path} declares {images} images but {labels_path} declares {labels} labels")
    return images


def split_size(directory: Path, split: SplitName) -> int:
    """How many examples ``split`` holds, from the headers alone (checked to agree)."""
    return _declared_count(*split_paths(directory, split))


def load_split(directory: Path, split: SplitName, *, limit: int | None = None) -> FashionMNISTSplit:
    """The first ``limit`` (default all) images and labels of ``split``, validated.

    The two files must declare the same count (checked from the headers before
    megabytes are decompressed), images must be 28×28 and labels class indices
    below ``len(CLASS_NAMES)``.
    """
    images_path, labels_path = split_paths(directory, split)
    _declared_count(images_path, labels_path)
    images = read_idx(images_path, ndim=3, limit=limit)
    labels = read_idx(labels_path, ndim=1, limit=limit)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{images_path}: expected {IMAGE_SIZE}×{IMAGE_SIZE} images, found {images.shape[1:]}")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} is not a class index below {len(CLASS_NAMES)}")
    return FashionMNISTSplit(images=images, labels=labels)
