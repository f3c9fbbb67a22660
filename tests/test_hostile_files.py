"""Hostile and careless input to the CLI side: folders with link loops and unreadable parts, huge and
special files, shard manifests edited by hand, query files that lie about themselves.

Each case asserts what a user sees (the skipped input with its reason, the one-line error) and that
nothing is lost, duplicated, read without bound, or waited on for ever.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from datasets import write_image
from test_verify import edit_manifest
from typer.testing import CliRunner

from artifacts.files import FileTooLargeError, UnreadableFileError, read_npy, read_regular_file
from artifacts.shard_set import MANIFEST_NAME, read_manifest, resolve_shards
from flows.cli.main import app
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.sources.folder import folder_source
from pipeline.data.verify import verify


def labelled_tree(root: Path) -> Path:
    """Class folders A (a0, a1) and B (b0) with every kind of folder link a careless tree holds."""
    for name, seed in (("A/a0.png", 0), ("A/a1.png", 1), ("B/b0.png", 2)):
        write_image(root / name, seed=seed)
    write_image(root.parent / "outside" / "o.png", seed=3)
    (root / "A" / "up").symlink_to("..")  # a loop through the root
    (root / "B" / "up").symlink_to("..")  # a second loop: two of them never finished before
    (root / "B" / "to-a").symlink_to("../A")  # A's files again, under B's label
    (root / "A" / "extra").symlink_to("../../outside")  # outside the source: followed once
    (root / "B" / "extra-again").symlink_to("../../outside")  # the same outside folder a second time
    (root / "self").symlink_to(".")  # a top-level loop is not a class
    (root / "A" / "grand").symlink_to("../..")  # a loop through the folder that holds the source
    return root


def labels_by_key(out: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.name.endswith(".cls"):
                    key = member.name.removesuffix(".cls")
                    assert key not in found, f"{key} written twice"
                    found[key] = int(archive.extractfile(member).read())  # type: ignore[union-attr]
    return found


def test_link_loops_and_repeated_links_write_each_image_once_under_its_own_label(tmp_path):
    root = labelled_tree(tmp_path / "src")

    result = ingest(str(root), tmp_path / "out", IngestConfig(workers=1), progress=False)

    manifest = result.manifest
    assert manifest.class_names == ("A", "B")
    assert labels_by_key(tmp_path / "out") == {"A/a0": 0, "A/a1": 0, "A/extra/o": 0, "B/b0": 1}
    skipped = {item.input: item.reason for item in manifest.skipped}
    assert set(skipped) == {"A/up/", "B/up/", "B/to-a/", "B/extra-again/", "self/", "A/grand/"}
    assert "holds the source" in skipped["A/grand/"]
    assert "inside the source (its root)" in skipped["A/up/"]
    assert "inside the source (A/)" in skipped["B/to-a/"]
    assert "already ingested as A/extra/" in skipped["B/extra-again/"]
    assert manifest.inputs == manifest.written + len(manifest.skipped) == 10
    assert verify(tmp_path / "out", progress=False).ok


def test_a_folder_that_cannot_be_listed_is_a_skipped_input(tmp_path, monkeypatch):
    root = tmp_path / "src"
    write_image(root / "A" / "a0.png")
    write_image(root / "A" / "locked" / "a1.png", seed=1)
    locked = root / "A" / "locked"
    locked.chmod(0)
    if os.geteuid() == 0:  # root lists any folder: make this one fail as it does for everyone else
        listing = os.scandir

        def refusing(path):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return listing(path)

        monkeypatch.setattr(os, "scandir", refusing)
    try:
        source = folder_source(root)
    finally:
        locked.chmod(0o755)

    assert [item.origin for item in source.items] == ["A/a0.png"]
    assert [(item.input, item.reason) for item in source.rejected] == [
        ("A/locked/", "unreadable folder (Permission denied)")
    ]
    assert source.inputs == 2


def test_folders_nested_deeper_than_the_recursion_limit_are_walked(tmp_path):
    folders = [tmp_path / "src" / "d"]
    for _ in range(1100):  # one by one: pathlib's mkdir(parents=True) itself recurses
        folders.append(folders[-1] / "d")
    try:
        for folder in folders:
            folder.mkdir(parents=True)
        write_image(folders[-1] / "bottom.png")
        source = folder_source(tmp_path / "src")
        assert [item.label for item in source.items] == [0] and source.class_names == ("d",)
    finally:  # bottom up: shutil.rmtree (pytest's clean-up of tmp_path) recurses too
        (folders[-1] / "bottom.png").unlink(missing_ok=True)
        for folder in reversed(folders):
            if folder.exists():
                folder.rmdir()


def test_a_file_over_the_size_cap_is_skipped_before_it_is_read(tmp_path):
    root = tmp_path / "src"
    write_image(root / "good.png")
    with open(root / "huge.png", "wb") as handle:  # 3 GB, sparse: costs no disk, and no RAM unless read
        handle.truncate(3 << 30)

    result = ingest(str(root), tmp_path / "out", IngestConfig(workers=1), progress=False)

    assert result.manifest.written == 1
    (item,) = result.manifest.skipped
    assert item.input == "huge.png"
    assert item.reason == (
        "file of 3,221,225,472 bytes (3,072 MiB) exceeds the cap of 268,435,456 bytes (256 MiB) (--max-file-bytes)"
    )


def test_the_file_size_cap_is_a_cli_option(tmp_path):
    root = tmp_path / "src"
    write_image(root / "big.png", size=(64, 64))
    write_image(root / "small.png", size=(8, 8))
    small = str(os.path.getsize(root / "big.png") - 1)

    result = CliRunner().invoke(
        app, ["ingest", str(root), "--out", str(tmp_path / "out"), "--max-file-bytes", small, "--no-progress"]
    )

    assert result.exit_code == 0, result.output
    (skipped,) = read_manifest(tmp_path / "out").skipped
    assert skipped.input == "big.png" and skipped.reason.endswith("(--max-file-bytes)")


# --- shard sets edited by hand ------------------------------------------------------------------------


@pytest.fixture
def shard_set(tmp_path: Path) -> Path:
    for index in range(6):
        write_image(tmp_path / "src" / ("a" if index < 3 else "b") / f"{index}.png", seed=index)
    ingest(str(tmp_path / "src"), tmp_path / "shards", IngestConfig(workers=1, shard_size=2), progress=False)
    return tmp_path / "shards"


def test_verify_fails_on_tars_the_manifest_does_not_list(shard_set):
    def forget_last_shard(data: dict) -> None:
        dropped = data["shards"].pop()
        data["counts"]["written"] -= dropped["count"]
        data["counts"]["inputs"] -= dropped["count"]
        data["source"]["inputs"] -= dropped["count"]
        data["generations"][0]["added"] -= dropped["count"]

    edit_manifest(shard_set, forget_last_shard)

    report = verify(shard_set, progress=False)
    assert [str(problem) for problem in report.problems] == [
        "shard-000002.tar: a tar file the manifest does not list (removed from it, or left by another ingest)",
        "generation 0: its input list names 6 keys, its shards hold 4: they differ",  # the dropped shard's two samples
    ]


def test_verify_fails_when_the_counts_disagree_with_the_source(shard_set):
    def drop_every_shard(data: dict) -> None:
        data["shards"], data["counts"] = [], {"inputs": 0, "written": 0, "skipped": 0}

    edit_manifest(shard_set, drop_every_shard)

    result = CliRunner().invoke(app, ["verify", str(shard_set), "--no-progress"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {shard_set / MANIFEST_NAME}: counts disagree with the source: it had 6 inputs, the counts say 0"
    ]


@pytest.mark.parametrize("name", ["/etc/passwd", "../shard-000000.tar", "sub/shard.tar", ".", "..", "a\x00b.tar"])
def test_shard_names_that_leave_the_folder_are_refused_by_verify_and_streams(shard_set, name):
    edit_manifest(shard_set, lambda data: data["shards"][0].update(name=name))

    with pytest.raises(ValueError, match="is not a plain file name"):
        verify(shard_set, progress=False)
    with pytest.raises(ValueError, match="is not a plain file name"):
        resolve_shards(shard_set)


# --- files a reader is pointed at -----------------------------------------------------------------------


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "queries.npy"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: _capture(outcome, read_npy, fifo), daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert str(outcome[0]) == "not a regular file (a FIFO)"


def _capture(outcome: list[BaseException], read, path: Path) -> None:
    try:
        read(path)
    except UnreadableFileError as error:
        outcome.append(error)


def test_a_device_is_refused_not_read_until_memory_runs_out():
    with pytest.raises(UnreadableFileError, match=r"^not a regular file \(a character device\)$"):
        read_regular_file("/dev/zero")


def test_a_folder_is_refused_as_a_folder(tmp_path):
    with pytest.raises(UnreadableFileError, match=r"^is a folder, not a file$"):
        read_regular_file(tmp_path)


def test_the_size_cap_holds_for_a_file_that_lies_about_nothing(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(1001))
    assert len(read_regular_file(path, 1001)) == 1001
    with pytest.raises(FileTooLargeError, match="exceeds the cap of 1,000 bytes"):
        read_regular_file(path, 1000)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_npy_round_trip_and_fortran_order(tmp_path):
    array = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    (tmp_path / "a.npy").write_bytes(npy_bytes(array))
    np.testing.assert_array_equal(read_npy(tmp_path / "a.npy"), array)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (npy_bytes(np.zeros((2, 4), np.float32))[:-8], "damaged .npy: the header says [2, 4] of 4-byte values"),
        (npy_bytes(np.array([{"x": 1}], dtype=object)), "holds object values, not numbers"),
        (b"\x93NUMPY\x01\x00\xff\xff{'descr'", "not a valid .npy file"),
        (b"PK\x03\x04 a zip file", "not a valid .npy file"),
        (b"", "not a valid .npy file"),
    ],
    ids=["truncated", "pickle", "header-overrun", "zip", "empty"],
)
def test_corrupt_npy_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "q.npy"
    path.write_bytes(content)
    with pytest.raises(UnreadableFileError) as caught:
        read_npy(path)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_a_huge_shape_claim_is_refused_by_arithmetic_not_allocation(tmp_path):
    data = npy_bytes(np.zeros((2, 4), np.float32))
    header_end = data.index(b"\n") + 1
    header = data[10:header_end].decode("latin1").replace("(2, 4)", "(1000000000000, 128)")
    header = header.rstrip("\n").ljust(header_end - 10 - 1) + "\n"
    path = tmp_path / "q.npy"
    path.write_bytes(data[:10] + header.encode("latin1") + data[header_end:])
    with pytest.raises(UnreadableFileError, match=r"the header says \[1000000000000, 128\]"):
        read_npy(path)


# --- `mocoplus search` on such files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_index(bundle, fashion_shards, tmp_path_factory) -> Path:
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.embed import embed
    from pipeline.index.build import build_index
    from pipeline.index.config import IndexConfig

    folder = tmp_path_factory.mktemp("hostile-search")
    embed(bundle, str(fashion_shards), folder / "emb", EmbedConfig(workers=0), progress=False)
    build_index(folder / "emb", folder / "index", IndexConfig(kind="flat"), progress=False)
    return folder / "index"


def test_search_reports_each_bad_query_file_on_one_line_and_answers_the_good_ones(flat_index, bundle, tmp_path):
    os.mkfifo(tmp_path / "pipe.npy")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "pickle.npy").write_bytes(npy_bytes(np.array([None], dtype=object)))
    dim = json.loads((flat_index / "current" / "index.json").read_text())["dim"]
    (tmp_path / "good.npy").write_bytes(npy_bytes(np.ones(dim, np.float32)))
    queries = ["pipe.npy", "pipe.png", "/dev/zero", "pickle.npy", "good.npy"]

    result = CliRunner().invoke(
        app,
        [
            "search",
            str(flat_index),
            "--model",
            str(bundle),
            *[q if q[0] == "/" else str(tmp_path / q) for q in queries],
        ],
    )

    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {tmp_path / 'pipe.npy'}: not a regular file (a FIFO)",
        f"error: {tmp_path / 'pipe.png'}: not a regular file (a FIFO)",
        "error: /dev/zero: not a regular file (a character device)",
        f"error: {tmp_path / 'pickle.npy'}: holds object values, not numbers",
    ]
    assert "good.npy" in result.stdout


def test_search_refuses_an_index_json_that_is_a_fifo(flat_index, bundle, tmp_path):
    copy = Path(shutil.copytree(flat_index, tmp_path / "index"))
    (copy / "current" / "index.json").unlink()
    os.mkfifo(copy / "current" / "index.json")

    result = CliRunner().invoke(app, ["search", str(copy), "--model", str(bundle), "key:x"])

    assert result.exit_code == 1
    assert result.output.strip() == f"error: {copy / 'current' / 'index.json'}: not a regular file (a FIFO)"
