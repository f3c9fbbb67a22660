"""The Fashion-MNIST IDX reader: the real files, and hand-made good and broken ones."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from datasets import idx_bytes, write, write_split

from pipeline.data.fashion_mnist import (
    CLASS_NAMES,
    DEFAULT_DIR,
    ENV_VAR,
    find_fashion_mnist,
    load_split,
    read_idx,
    read_idx_header,
    split_size,
)


def random_split(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.uint8)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def dataset_dir(tmp_path: Path, rng: np.random.Generator) -> Path:
    """A complete, valid, tiny Fashion-MNIST folder (train 6, test 4)."""
    write_split(tmp_path, "train", *random_split(rng, 6))
    write_split(tmp_path, "test", *random_split(rng, 4))
    return tmp_path


@pytest.fixture
def real_dir() -> Path:
    try:
        return find_fashion_mnist(DEFAULT_DIR)
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_real_split_sizes_from_headers(real_dir):
    assert split_size(real_dir, "train") == 60_000
    assert split_size(real_dir, "test") == 10_000


def test_real_slice_shapes_dtypes_and_labels(real_dir):
    train = load_split(real_dir, "train", limit=1000)
    assert train.images.shape == (1000, 28, 28)
    assert train.labels.shape == (1000,)
    assert train.images.dtype == np.uint8
    assert train.labels.dtype == np.uint8
    assert set(np.unique(train.labels)) == set(range(len(CLASS_NAMES)))  # all ten classes in the first thousand
    assert 0.2 < train.images.mean() / 255 < 0.4  # garments on a black background, not noise or zeros
    assert train.images.flags.writeable


def test_real_test_split_reads_whole(real_dir):
    test = load_split(real_dir, "test")
    assert len(test) == 10_000
    assert test.images.shape == (10_000, 28, 28)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_round_trip(tmp_path, rng, gz):
    images, labels = random_split(rng, 5)
    write_split(tmp_path, "train", images, labels, gz=gz)
    write_split(tmp_path, "test", images[:2], labels[:2], gz=gz)
    split = load_split(find_fashion_mnist(tmp_path), "train")
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(load_split(tmp_path, "train", limit=3).images, images[:3])


def test_header_only_read(tmp_path, rng):
    path = write(tmp_path / "x-idx3-ubyte", idx_bytes(random_split(rng, 7)[0]))
    assert read_idx_header(path) == (7, 28, 28)


def test_truncated_gzip_names_the_file(tmp_path, rng):
    data = gzip.compress(idx_bytes(random_split(rng, 20)[0]))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*(corrupt|truncated)"):
        read_idx(path, ndim=3)


def test_gzip_missing_its_trailer_is_corrupt(tmp_path, rng):
    data = gzip.compress(idx_bytes(random_split(rng, 3)[0]))
    path = tmp_path / "images.gz"
    path.write_bytes(data[:-4])  # all pixels present, the length field of the trailer gone
    with pytest.raises(ValueError, match=r"images\.gz.*(corrupt|truncated)"):
        read_idx(path, ndim=3)


def test_truncated_plain_file(tmp_path, rng):
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(random_split(rng, 4)[0])[:-100])
    with pytest.raises(ValueError, match=r"images: truncated, expected 3136 bytes"):
        read_idx(path, ndim=3)


def test_truncated_header(tmp_path):
    path = write(tmp_path / "labels", b"\x00\x00\x08\x01\x00", gz=False)
    with pytest.raises(ValueError, match=r"truncated.*dimensions"):
        read_idx_header(path)


@pytest.mark.parametrize(
    "magic",
    [b"\x00\x00\x0d\x03", b"\x50\x4b\x03\x04", b"\x00\x00\x08\x00"],
    ids=["float-idx", "zip-file", "zero-dims"],
)
def test_wrong_magic(tmp_path, rng, magic):
    path = write(tmp_path / "images", idx_bytes(random_split(rng, 2)[0], magic=magic))
    with pytest.raises(ValueError, match=r"images\.gz: not an unsigned-byte IDX file \(magic number 0x"):
        read_idx(path, ndim=3)


def test_wrong_number_of_dimensions(tmp_path, rng):
    path = write(tmp_path / "labels", idx_bytes(random_split(rng, 3)[1]))
    with pytest.raises(ValueError, match="expected 3 dimensions, the header declares 1"):
        read_idx(path, ndim=3)


def test_trailing_bytes(tmp_path, rng):
    path = write(tmp_path / "labels", idx_bytes(random_split(rng, 3)[1]) + b"junk")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(path, ndim=1)


def test_mismatched_image_and_label_counts(dataset_dir, rng):
    images, labels = random_split(rng, 5)
    write_split(dataset_dir, "train", images, labels[:4])
    with pytest.raises(ValueError, match=r"declares 5 images but .*declares 4 labels"):
        load_split(dataset_dir, "train")
    with pytest.raises(ValueError, match="declares 5 images"):
        split_size(dataset_dir, "train")


def test_wrong_image_size(dataset_dir, rng):
    write_split(dataset_dir, "test", rng.integers(0, 256, (3, 32, 32), dtype=np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="expected 28×28 images"):
        load_split(dataset_dir, "test")


def test_label_out_of_range(dataset_dir, rng):
    write_split(dataset_dir, "test", random_split(rng, 3)[0], np.array([0, 10, 2], np.uint8))
    with pytest.raises(ValueError, match="label 10 is not a class index"):
        load_split(dataset_dir, "test")


def test_env_override_is_used(dataset_dir):
    assert find_fashion_mnist(environ={ENV_VAR: str(dataset_dir)}) == dataset_dir


def test_missing_folder_from_env_tells_how_to_install(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"nowhere \(\${ENV_VAR}\) is not a folder.*apt-get install -y"):
        find_fashion_mnist(environ={ENV_VAR: str(missing)})


def test_missing_folder_from_real_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        find_fashion_mnist()


def test_incomplete_folder_names_the_missing_files(dataset_dir):
    (dataset_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte; install"):
        find_fashion_mnist(dataset_dir)


def test_bad_split_name(dataset_dir):
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_split(dataset_dir, "validation")  # type: ignore[arg-type]
