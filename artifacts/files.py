"""Reading a file someone else named: a regular file, read with a size bound, or a one-line error.

A path on a command line or in a folder can be anything: a FIFO (reading it
waits for a writer that never comes), ``/dev/zero`` (an endless stream), a
3 GB file named ``.png``. Every reader of user-named files goes through
`read_regular_file`, which opens without blocking, checks what the open file
*is* (``fstat`` of the descriptor, so a swap between the check and the read
cannot fool it) and reads at most ``max_bytes + 1`` bytes, so its memory is
bounded whatever the file claims.

`read_npy` applies the same rule to ``.npy`` files and checks the header's
shape against the bytes that follow before allocating anything: a 128-byte file
that claims a ``[10**12, 128]`` array is refused, not attempted.
"""

from __future__ import annotations

import io
import os
import stat

import numpy as np

MAX_FILE_BYTES = 256 << 20  # an image, a JSON file or a .npy of query vectors


class UnreadableFileError(ValueError):
    """The path is not a regular file, is too big, or cannot be read; ``str(error)`` is one line."""


class FileTooLargeError(UnreadableFileError):
    """The file holds more bytes than the reader's cap."""


def describe_size(size: int) -> str:
    """``268,435,456 bytes (256 MiB)``: exact for the record, rounded for the eye."""
    return f"{size:,} bytes ({size / 2**20:,.0f} MiB)" if size >= 2**20 else f"{size:,} bytes"


def _open_regular(path: str | os.PathLike[str], max_bytes: int) -> int:
    """A descriptor of the regular file at ``path`` of at most ``max_bytes`` (opened without blocking)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UnreadableFileError("no such file") from None
    except IsADirectoryError:
        raise UnreadableFileError("is a folder, not a file") from None
    except OSError as error:
        raise UnreadableFileError(f"unreadable ({error.strerror or error})") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_size > max_bytes:
        os.close(descriptor)
    if stat.S_ISDIR(status.st_mode):
        raise UnreadableFileError("is a folder, not a file")
    if not stat.S_ISREG(status.st_mode):
        raise UnreadableFileError(f"not a regular file (a {_kind(status.st_mode)})")
    if status.st_size > max_bytes:
        raise FileTooLargeError(
            f"file of {describe_size(status.st_size)} exceeds the cap of {describe_size(max_bytes)}"
        )
    return descriptor


def require_regular_file(path: str | os.PathLike[str]) -> None:
    """Refuse anything but a regular file before a reader that would block on a FIFO or stream a device
    (``np.load`` with ``mmap_mode``, which needs a path and maps the file rather than reading it)."""
    os.close(_open_regular(path, max_bytes=1 << 62))


def read_regular_file(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The whole content of the regular file at ``path``, if it holds at most ``max_bytes``."""
    descriptor = _open_regular(path, max_bytes)
    with os.fdopen(descriptor, "rb", buffering=0) as handle:
        os.set_blocking(descriptor, True)
        try:
            data = _read_at_most(handle, max_bytes + 1)
        except OSError as error:
            raise UnreadableFileError(f"unreadable ({error.strerror or error})") from None
    if len(data) > max_bytes:  # it grew since fstat
        raise FileTooLargeError(f"file grew past the cap of {describe_size(max_bytes)} while being read")
    return data


def _read_at_most(handle: io.RawIOBase, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = handle.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "special file")


def read_npy(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> np.ndarray:
    """A ``.npy`` array of numbers (no pickles, no object or structured dtypes), its header checked first."""
    data = read_regular_file(path, max_bytes)
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"format version {version[0]}.{version[1]} (this reads 1.0 and 2.0)")
        header = readers[version](stream, max_header_size=10_000)
    except (ValueError, SyntaxError, EOFError, TypeError) as error:
        raise UnreadableFileError(f"not a valid .npy file ({_first_line(error)})") from None
    shape, fortran_order, dtype = header
    if dtype.kind not in "fiu" or dtype.hasobject or dtype.fields is not None:
        raise UnreadableFileError(f"holds {dtype} values, not numbers")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    body = len(data) - stream.tell()
    if count * dtype.itemsize != body:
        raise UnreadableFileError(
            f"damaged .npy: the header says {list(shape)} of {dtype.itemsize}-byte values; the file has {body:,} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def map_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``.npy`` array of numbers, memory-mapped read-only: only its header is read now, its values when touched.

    For arrays too large to read whole (an index of tens of millions of ids). Refused with one line: anything but
    a regular file, a damaged header, values that are not numbers, a body shorter than the header says.
    """
    require_regular_file(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # a short body: "mmap length is greater than file size"
        raise UnreadableFileError(f"not a valid .npy file ({_first_line(error)})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.dtype.fields is not None:
        raise UnreadableFileError("does not hold an array of numbers")
    return array
