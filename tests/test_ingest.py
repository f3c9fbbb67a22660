"""`mocoplus ingest` end to end on small generated sources: labels, hostile inputs, determinism, resume, reruns."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from datasets import noise_image, write_image
from PIL import Image

import pipeline.data.ingest
from artifacts.shard_set import MANIFEST_NAME, read_manifest, resolve_shards
from pipeline.data.config import IngestConfig
from pipeline.data.fashion_mnist import CLASS_NAMES, load_split
from pipeline.data.ingest import STATE_NAME, ingest
from pipeline.data.sources import resolve_source


def run(source: Path | str, out: Path, **options):
    return ingest(str(source), out, IngestConfig(**{"workers": 1, **options}), progress=False)


def tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of the shard set in ``out``, read with plain tarfile: key → {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(out).shards:
        with tarfile.open(out / shard.name) as archive:
            for member in archive.getmembers():
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return samples


def wds_samples(out: Path) -> list[dict]:
    urls = list(resolve_shards(out).urls)
    return list(wds.WebDataset(urls, shardshuffle=False))


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def decoded_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


def skipped_reasons(result) -> dict[str, str]:
    return {item.input: item.reason for item in result.manifest.skipped}


@pytest.fixture
def labelled_folder(tmp_path: Path) -> Path:
    """Two classes × five images, PNG and JPEG, assorted sizes and modes."""
    root = tmp_path / "labelled"
    for class_index, name in enumerate(["shoe", "bag"]):
        for index in range(5):
            suffix = "png" if index % 2 == 0 else "jpg"
            mode = "L" if index == 4 else "RGB"
            write_image(
                root / name / f"img{index}.{suffix}",
                size=(20 + index, 16 + 3 * index),
                mode=mode,
                seed=10 * class_index + index,
            )
    return root


# --- folders --------------------------------------------------------------------------------


def test_labelled_folder(labelled_folder, tmp_path):
    out = tmp_path / "out"
    result = run(labelled_folder, out)
    manifest = result.manifest
    assert not result.up_to_date and result.resumed_inputs == 0
    assert manifest.class_names == ("bag", "shoe")
    assert manifest.labelled
    assert (manifest.inputs, manifest.written, manifest.skipped) == (10, 10, ())
    assert read_manifest(out) == manifest
    assert json.loads((out / MANIFEST_NAME).read_text())["counts"] == {
        "inputs": 10,
        "written": 10,
        "removed": 0,
        "live": 10,
        "skipped": 0,
    }

    expected_keys = [f"{name}/img{index}" for name in ("bag", "shoe") for index in range(5)]
    samples = tar_samples(out)
    assert sorted(samples) == expected_keys
    for key, sample in samples.items():
        name, file_name = key.split("/")
        assert sample["cls"] == str(manifest.class_names.index(name)).encode()
        record = json.loads(sample["json"])
        assert record["label_name"] == name
        assert set(sample) == {"png", "cls", "json"}
        source_path = next((labelled_folder / name).glob(f"{file_name}.*"))
        assert record["source"] == source_path.relative_to(labelled_folder).as_posix()
        assert record["size"] == list(Image.open(source_path).size)
        if source_path.suffix == ".png":
            np.testing.assert_array_equal(decoded_pixels(sample["png"]), np.asarray(Image.open(source_path)))

    streamed = wds_samples(out)
    assert [sample["__key__"] for sample in streamed] == expected_keys  # input order, readable by plain webdataset
    for sample in streamed:
        assert sample["cls"] == samples[sample["__key__"]]["cls"]
        assert sample["png"] == samples[sample["__key__"]]["png"]


def test_tar_members_have_fixed_headers(labelled_folder, tmp_path):
    run(labelled_folder, tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as archive:
        members = archive.getmembers()
    assert members and all(member.isfile() for member in members)
    assert {(member.mtime, member.uname, member.gname, member.mode) for member in members} == {
        (0, "mocoplus", "mocoplus", 0o444)
    }


def test_flat_folder_has_no_labels(tmp_path):
    for index in range(3):
        write_image(tmp_path / "flat" / f"photo {index}.png", seed=index)
    result = run(tmp_path / "flat", tmp_path / "out")
    assert result.manifest.class_names is None
    assert not result.manifest.labelled
    assert result.manifest.written == 3
    samples = tar_samples(tmp_path / "out")
    assert sorted(samples) == ["photo_0", "photo_1", "photo_2"]  # spaces are not tar-key safe
    assert all(set(sample) == {"png", "json"} for sample in samples.values())
    assert all("label_name" not in json.loads(sample["json"]) for sample in samples.values())
    assert all("cls" not in sample for sample in wds_samples(tmp_path / "out"))


def test_file_outside_class_folders_is_skipped_and_hidden_files_are_ignored(labelled_folder, tmp_path):
    write_image(labelled_folder / "stray.png")
    write_image(labelled_folder / ".hidden.png")
    write_image(labelled_folder / "bag" / ".also-hidden.png")
    write_image(labelled_folder / ".ipynb_checkpoints" / "img0.png")
    (labelled_folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    result = run(labelled_folder, tmp_path / "out")
    assert result.manifest.class_names == ("bag", "shoe")  # a hidden folder is not a class
    assert result.manifest.inputs == 11
    assert result.manifest.written == 10
    assert "outside any class folder" in skipped_reasons(result)["stray.png"]
    assert not any("hidden" in key or "ipynb" in key for key in tar_samples(tmp_path / "out"))


def test_keys_are_tar_safe_and_unique(tmp_path):
    """WebDataset splits a member name at the first dot, so a dotted file name must not leak into the key."""
    root = tmp_path / "src"
    write_image(root / "a.png", seed=1)
    write_image(root / "a.jpg", seed=2)
    write_image(root / "img.v2.final.png", seed=3)
    write_image(root / "é ü.png", seed=4)
    run(root, tmp_path / "out")
    keys = [sample["__key__"] for sample in wds_samples(tmp_path / "out")]
    assert keys == ["a", "a_2", "img_v2_final", "___"]
    assert all(set(sample) >= {"png", "json"} for sample in wds_samples(tmp_path / "out"))


def test_named_pipe_in_a_folder_is_not_an_input(tmp_path):
    root = tmp_path / "src"
    write_image(root / "a.png")
    os.mkfifo(root / "pipe.png")
    source = resolve_source(str(root))
    assert [item.origin for item in source.items] == ["a.png"]  # resolving only: an ingest would hang here


# --- hostile inputs -------------------------------------------------------------------------


def hostile_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    write_image(root / "good.png", seed=1)
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a JPEG, it is a note\n")
    png, jpg = encoded(noise_image((64, 64), seed=2), "PNG"), encoded(noise_image((64, 64), seed=3), "JPEG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    Image.new("L", (3000, 3000)).save(root / "bomb.png")  # 9 million pixels in a few KB
    write_image(root / "cmyk.jpg", mode="CMYK", seed=4)
    Image.fromarray(np.random.default_rng(5).integers(1024, 65536, (20, 24)).astype(np.uint16)).save(root / "deep.png")
    noise_image(seed=6).quantize(8).save(root / "palette.png")
    write_image(root / "alpha.png", mode="RGBA", seed=7)
    (root / "notes.txt").write_text("not an image\n")
    (root / "dangling.png").symlink_to(root / "no-such-file.png")
    return root


def test_hostile_folder(tmp_path):
    root = hostile_folder(tmp_path / "hostile")
    out = tmp_path / "out"
    result = run(root, out, max_pixels=1_000_000)
    manifest = result.manifest
    reasons = skipped_reasons(result)

    assert manifest.inputs == manifest.written + len(manifest.skipped)
    assert manifest.inputs == 12
    assert set(reasons) == {
        "empty.png",
        "text.jpg",
        "truncated.png",
        "truncated.jpg",
        "bomb.png",
        "notes.txt",
        "dangling.png",
    }
    assert "empty" in reasons["empty.png"]
    assert "not a recognised image" in reasons["text.jpg"]
    assert "truncated" in reasons["truncated.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "cap" in reasons["bomb.png"]
    assert "not an image file name" in reasons["notes.txt"]
    assert "unreadable" in reasons["dangling.png"]
    written = json.loads((out / MANIFEST_NAME).read_text())
    assert {item["input"] for item in written["skipped"]} == set(reasons)
    assert all(item["reason"] for item in written["skipped"])

    samples = tar_samples(out)
    assert sorted(samples) == ["alpha", "cmyk", "deep", "good", "palette"]
    records = {key: json.loads(sample["json"]) for key, sample in samples.items()}
    assert "CMYK→RGB" in records["cmyk"]["conversion"]
    assert "I;16→L" in records["deep"]["conversion"]
    assert "P→RGB" in records["palette"]["conversion"]
    assert "RGBA→RGB" in records["alpha"]["conversion"]
    assert records["deep"]["original"]["mode"] == "I;16" and records["deep"]["mode"] == "L"
    assert records["cmyk"]["original"]["format"] == "JPEG" and records["cmyk"]["mode"] == "RGB"
    for key, mode in [("alpha", "RGB"), ("cmyk", "RGB"), ("deep", "L"), ("palette", "RGB"), ("good", "RGB")]:
        assert Image.open(io.BytesIO(samples[key]["png"])).mode == mode


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file_is_skipped(tmp_path):
    root = tmp_path / "src"
    write_image(root / "good.png")
    locked = write_image(root / "locked.png", seed=1)
    locked.chmod(0)
    try:
        result = run(root, tmp_path / "out")
    finally:
        locked.chmod(0o644)
    assert result.manifest.written == 1
    assert "unreadable" in skipped_reasons(result)["locked.png"]


def test_nothing_usable_still_gives_a_manifest(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    (root / "b.jpg").write_text("text")
    (root / "c.txt").write_text("text")
    result = run(root, tmp_path / "out")
    assert result.manifest.written == 0
    assert result.manifest.shards == ()
    assert {item.input for item in result.manifest.skipped} == {"a.png", "b.jpg", "c.txt"}
    assert read_manifest(tmp_path / "out").inputs == 3
    assert not list((tmp_path / "out").glob("*.tar"))
    assert not (tmp_path / "out" / STATE_NAME).exists()


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(ValueError, match="no inputs"):
        run(tmp_path / "empty", tmp_path / "out")


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "nowhere", tmp_path / "out")


def test_output_path_that_is_a_file_is_an_error(labelled_folder, tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(NotADirectoryError):
        run(labelled_folder, target)
    assert target.read_text() == "precious"


# --- lists ----------------------------------------------------------------------------------


def test_text_list_with_named_labels(tmp_path):
    write_image(tmp_path / "images" / "x.png", seed=1)
    write_image(tmp_path / "images" / "y.jpg", seed=2)
    write_image(tmp_path / "other" / "z.png", seed=3)
    absolute = write_image(tmp_path / "elsewhere" / "w.png", seed=4)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# path<TAB>label\n"
        "../images/x.png\tzebra\n"
        "\n"
        "../images/y.jpg\tant\n"
        "../other/z.png\tzebra\n"
        "../images/missing.png\tant\n"
        f"{absolute}\tmoth\n"
    )
    result = run(listing, tmp_path / "out")
    manifest = result.manifest
    assert manifest.class_names == ("ant", "moth", "zebra")
    assert manifest.labelled
    assert (manifest.inputs, manifest.written) == (5, 4)
    assert [(item.input, item.reason) for item in manifest.skipped] == [
        ("../images/missing.png (train.txt:6)", "file not found")
    ]
    labels = {
        json.loads(sample["json"])["source"]: int(sample["cls"]) for sample in tar_samples(tmp_path / "out").values()
    }
    assert labels == {
        "../images/x.png (train.txt:2)": 2,
        "../images/y.jpg (train.txt:4)": 0,
        "../other/z.png (train.txt:5)": 2,
        f"{absolute} (train.txt:7)": 1,
    }


def test_csv_list_with_integer_labels(tmp_path):
    for index in range(3):
        write_image(tmp_path / f"img{index}.png", seed=index)
    listing = tmp_path / "list.csv"
    listing.write_text("path,label,comment\nimg0.png,7,a\nimg1.png,3,b\nimg2.png,7,c\nnot-there.png,1,d\n")
    result = run(listing, tmp_path / "out")
    manifest = result.manifest
    assert manifest.class_names is None  # integers are used as they are, no names invented
    assert manifest.labelled
    assert (manifest.inputs, manifest.written, len(manifest.skipped)) == (4, 3, 1)
    assert manifest.skipped[0].input.startswith("not-there.png")
    assert manifest.skipped[0].reason == "file not found"
    streamed = wds_samples(tmp_path / "out")
    assert [(sample["__key__"], sample["cls"]) for sample in streamed] == [
        ("img0", b"7"),
        ("img1", b"3"),
        ("img2", b"7"),
    ]


def test_csv_list_without_a_path_column_is_an_error(tmp_path):
    write_image(tmp_path / "img.png")
    listing = tmp_path / "list.csv"
    listing.write_text("file,label\nimg.png,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        run(listing, tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_empty_list_is_an_error(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="names no images"):
        run(listing, tmp_path / "out")


# --- Fashion-MNIST --------------------------------------------------------------------------


def test_fashion_mnist_train(fashion_mnist_env, tmp_path):
    out = tmp_path / "out"
    result = run("fashion-mnist:train", out, shard_size=250)
    manifest = result.manifest
    assert (manifest.inputs, manifest.written, manifest.skipped) == (600, 600, ())
    assert manifest.class_names == CLASS_NAMES
    assert [(shard.name, shard.count) for shard in manifest.shards] == [
        ("shard-000000.tar", 250),
        ("shard-000001.tar", 250),
        ("shard-000002.tar", 100),
    ]
    for shard in manifest.shards:
        assert (out / shard.name).stat().st_size == shard.bytes

    split = load_split(fashion_mnist_env, "train")
    streamed = wds_samples(out)
    assert [sample["__key__"] for sample in streamed] == [f"train_{index:05d}" for index in range(600)]
    assert [int(sample["cls"]) for sample in streamed] == split.labels.tolist()
    for index in (0, 1, 299, 599):
        np.testing.assert_array_equal(decoded_pixels(streamed[index]["png"]), split.images[index])
    assert all("json" not in sample for sample in streamed)  # array rows carry no file provenance


# --- determinism ----------------------------------------------------------------------------


def test_same_source_gives_identical_shards(labelled_folder, tmp_path):
    run(labelled_folder, tmp_path / "one", shard_size=3)
    run(labelled_folder, tmp_path / "two", shard_size=3)
    first = shard_bytes(tmp_path / "one")
    assert len(first) == 4
    assert first == shard_bytes(tmp_path / "two")
    assert read_manifest(tmp_path / "one").shards == read_manifest(tmp_path / "two").shards


def test_worker_count_does_not_change_the_bytes(labelled_folder, tmp_path):
    (labelled_folder / "bag" / "broken.png").write_bytes(b"junk")
    run(labelled_folder, tmp_path / "one", shard_size=4)
    parallel = run(labelled_folder, tmp_path / "two", shard_size=4, workers=2)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert read_manifest(tmp_path / "one").skipped == parallel.manifest.skipped


# --- shard limits and formats ---------------------------------------------------------------


def member_bytes(data: bytes) -> int:
    """What one file takes in a tar: a 512-byte header and the data padded to 512 bytes."""
    return 512 + -(-len(data) // 512) * 512


@pytest.fixture
def uniform_folder(tmp_path: Path) -> Path:
    for index in range(12):
        write_image(tmp_path / "uniform" / f"img{index:02d}.png", size=(40, 30), seed=index)
    return tmp_path / "uniform"


def test_shard_bytes_cap_makes_more_shards(uniform_folder, tmp_path):
    whole = run(uniform_folder, tmp_path / "whole")
    assert len(whole.manifest.shards) == 1
    cap = 12_000
    capped = run(uniform_folder, tmp_path / "capped", shard_bytes=cap)
    assert len(capped.manifest.shards) > 1
    assert capped.manifest.written == 12
    assert tar_samples(tmp_path / "capped") == tar_samples(tmp_path / "whole")
    largest = max(sum(map(member_bytes, sample.values())) for sample in tar_samples(tmp_path / "whole").values())
    trailer = tarfile.RECORDSIZE  # end-of-archive blocks and padding to a whole tar record
    for shard in capped.manifest.shards:
        assert shard.count == 1 or shard.bytes <= cap + largest + trailer


def test_shard_bytes_cap_is_exceeded_by_at_most_one_sample(uniform_folder, tmp_path):
    cap = 12_000
    capped = run(uniform_folder, tmp_path / "capped", shard_bytes=cap)
    samples = tar_samples(tmp_path / "capped")
    largest = max(sum(map(member_bytes, sample.values())) for sample in samples.values())
    assert all(shard.count == 1 or shard.bytes <= cap + largest for shard in capped.manifest.shards)


def test_sample_larger_than_the_byte_cap_gets_a_shard_of_its_own(uniform_folder, tmp_path):
    result = run(uniform_folder, tmp_path / "out", shard_bytes=1)
    assert [shard.count for shard in result.manifest.shards] == [1] * 12


@pytest.mark.parametrize(("image_format", "pil_format"), [("jpg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats(labelled_folder, tmp_path, image_format, pil_format):
    run(labelled_folder, tmp_path / "out", image_format=image_format)
    samples = tar_samples(tmp_path / "out")
    assert len(samples) == 10
    for sample in samples.values():
        assert set(sample) == {image_format, "cls", "json"}
        image = Image.open(io.BytesIO(sample[image_format]))
        assert image.format == pil_format
        assert list(image.size) == json.loads(sample["json"])["size"]


@pytest.fixture
def keep_folder(tmp_path: Path) -> Path:
    root = tmp_path / "keep"
    write_image(root / "a_png.png", seed=1)
    write_image(root / "b_jpg.jpg", seed=2, quality=70)
    write_image(root / "c_cmyk.jpg", mode="CMYK", seed=3)
    write_image(root / "d_bmp.bmp", seed=4)
    return root


def test_keep_reencodes_converted_and_unsupported_inputs_as_png(keep_folder, tmp_path):
    run(keep_folder, tmp_path / "out", image_format="keep")
    samples = tar_samples(tmp_path / "out")
    assert set(samples["c_cmyk"]) == {"png", "json"}
    assert Image.open(io.BytesIO(samples["c_cmyk"]["png"])).mode == "RGB"
    assert set(samples["d_bmp"]) == {"png", "json"}  # BMP is not a format shards store
    np.testing.assert_array_equal(
        decoded_pixels(samples["d_bmp"]["png"]), np.asarray(Image.open(keep_folder / "d_bmp.bmp"))
    )
    assert {extension for sample in samples.values() for extension in sample} <= {"png", "jpg", "json"}


def test_keep_stores_the_original_bytes_of_unchanged_inputs(keep_folder, tmp_path):
    run(keep_folder, tmp_path / "out", image_format="keep")
    samples = tar_samples(tmp_path / "out")
    assert samples["a_png"]["png"] == (keep_folder / "a_png.png").read_bytes()
    assert samples["b_jpg"]["jpg"] == (keep_folder / "b_jpg.jpg").read_bytes()


def test_unchanged_input_records_no_conversion(keep_folder, tmp_path):
    run(keep_folder, tmp_path / "out")
    assert "conversion" not in json.loads(tar_samples(tmp_path / "out")["a_png"]["json"])


def test_max_side(tmp_path):
    write_image(tmp_path / "src" / "wide.png", size=(100, 50))
    write_image(tmp_path / "src" / "small.png", size=(30, 20), seed=1)
    run(tmp_path / "src", tmp_path / "out", max_side=40)
    samples = tar_samples(tmp_path / "out")
    assert Image.open(io.BytesIO(samples["wide"]["png"])).size == (40, 20)
    record = json.loads(samples["wide"]["json"])
    assert (record["original"]["size"], record["size"]) == ([100, 50], [40, 20])
    np.testing.assert_array_equal(  # never enlarged
        decoded_pixels(samples["small"]["png"]), np.asarray(Image.open(tmp_path / "src" / "small.png"))
    )


@pytest.mark.parametrize(
    "options",
    [
        {"shard_size": 0},
        {"shard_bytes": 0},
        {"image_format": "gif"},
        {"max_side": 0},
        {"max_pixels": 0},
        {"workers": 0},
        {"name": "a.b"},
        {"name": "../x"},
    ],
)
def test_config_rejects_bad_options(options):
    with pytest.raises(ValueError, match=r"must|may"):
        IngestConfig(**options)


# --- reruns and resume ----------------------------------------------------------------------


def stats(out: Path) -> dict[str, tuple[int, bytes]]:
    """The shard set's visible files (shards and manifest) with their modification times and bytes."""
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(out.glob("[!.]*"))}


def test_rerun_of_the_same_ingest_is_up_to_date(labelled_folder, tmp_path):
    out = tmp_path / "out"
    first = run(labelled_folder, out, shard_size=4)
    before = stats(out)
    again = run(labelled_folder, out, shard_size=4, workers=2)  # workers do not change the output
    assert again.up_to_date
    assert again.manifest == first.manifest
    assert stats(out) == before


def test_other_input_into_a_finished_folder_needs_overwrite(labelled_folder, tmp_path):
    out = tmp_path / "out"
    run(labelled_folder, out, shard_size=4)
    before = stats(out)
    write_image(tmp_path / "other" / "only.png")
    with pytest.raises(FileExistsError, match="overwrite"):
        run(tmp_path / "other", out)
    with pytest.raises(FileExistsError):
        run(labelled_folder, out, shard_size=5)  # other options count as other output too
    assert stats(out) == before

    replaced = run(tmp_path / "other", out, overwrite=True)
    assert not replaced.up_to_date
    assert replaced.manifest.written == 1
    assert sorted(stats(out)) == ["inputs-000000.json", MANIFEST_NAME, "shard-000000.tar"]
    assert list(tar_samples(out)) == ["only"]


def test_changed_input_file_is_not_up_to_date(labelled_folder, tmp_path):
    out = tmp_path / "out"
    run(labelled_folder, out)
    write_image(labelled_folder / "bag" / "img0.png", seed=99)
    os.utime(labelled_folder / "bag" / "img0.png", ns=(1, 1))
    with pytest.raises(FileExistsError):
        run(labelled_folder, out)
    assert not run(labelled_folder, out, overwrite=True).up_to_date


def interrupt_on_commit(monkeypatch, call: int, *, after: bool) -> None:
    """Make the ``call``-th `ShardFile.commit` raise KeyboardInterrupt, before or after its rename."""
    original = pipeline.data.ingest.ShardFile.commit
    calls = {"count": 0}

    def commit(self):
        calls["count"] += 1
        if calls["count"] == call and not after:
            raise KeyboardInterrupt
        record = original(self)
        if calls["count"] == call:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(pipeline.data.ingest.ShardFile, "commit", commit)


@pytest.mark.parametrize("after", [False, True], ids=["before-rename", "after-rename"])
def test_interrupted_ingest_resumes_to_the_same_bytes(labelled_folder, tmp_path, monkeypatch, after):
    (labelled_folder / "bag" / "img9.png").write_bytes(b"broken")  # a skipped input before the interruption
    out = tmp_path / "out"
    interrupt_on_commit(monkeypatch, 2, after=after)
    with pytest.raises(KeyboardInterrupt):
        run(labelled_folder, out, shard_size=3)
    monkeypatch.undo()

    names = sorted(path.name for path in out.iterdir())
    assert MANIFEST_NAME not in names  # nothing claims to be finished
    assert STATE_NAME in names
    assert "shard-000000.tar" in names
    assert ("shard-000001.tar" in names) == after  # renamed only when complete
    assert all(name.startswith(".") for name in names if not name.endswith(".tar"))
    state = json.loads((out / STATE_NAME).read_text())
    assert [shard["name"] for shard in state["shards"]] == ["shard-000000.tar"]

    resumed = run(labelled_folder, out, shard_size=3)
    clean = run(labelled_folder, tmp_path / "clean", shard_size=3)
    assert resumed.resumed_inputs > 0
    assert clean.resumed_inputs == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert resumed.manifest.shards == clean.manifest.shards
    assert resumed.manifest.skipped == clean.manifest.skipped
    assert (resumed.manifest.inputs, resumed.manifest.written) == (11, 10)
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in (tmp_path / "clean").iterdir())
    assert not (out / STATE_NAME).exists()


def interrupted_run(folder, out, monkeypatch):
    """An ingest (3 samples a shard) stopped by Ctrl-C while finishing its second shard."""
    interrupt_on_commit(monkeypatch, 2, after=False)
    with pytest.raises(KeyboardInterrupt):
        run(folder, out, shard_size=3)
    monkeypatch.undo()
    return out


def test_interrupted_ingest_with_other_options_starts_over(labelled_folder, tmp_path, monkeypatch):
    out = interrupted_run(labelled_folder, tmp_path / "out", monkeypatch)

    restarted = run(labelled_folder, out, shard_size=4)
    run(labelled_folder, tmp_path / "clean", shard_size=4)
    assert restarted.resumed_inputs == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert not (out / STATE_NAME).exists()


def test_damaged_finished_shard_is_not_trusted_on_resume(labelled_folder, tmp_path, monkeypatch):
    out = interrupted_run(labelled_folder, tmp_path / "out", monkeypatch)
    shard = out / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))

    restarted = run(labelled_folder, out, shard_size=3)
    run(labelled_folder, tmp_path / "clean", shard_size=3)
    assert restarted.resumed_inputs == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")


class InlineImage:
    """An `ItemInput` of a kind ingest has never seen: bytes held here, as a URL source would fetch them."""

    def __init__(self, name: str, data: bytes | None) -> None:
        self.name, self.data = name, data

    def open(self, max_bytes: int) -> bytes:
        if self.data is None:  # what a fetch that fails raises
            raise ConnectionRefusedError(111, "Connection refused")
        if len(self.data) > max_bytes:
            from artifacts.files import FileTooLargeError

            raise FileTooLargeError(f"{self.name} is {len(self.data):,} bytes, over {max_bytes:,}")
        return self.data


def test_a_new_kind_of_source_is_one_module_and_its_registry_entry(tmp_path, monkeypatch):
    """A source kind registered in SOURCE_KINDS whose items open their own bytes: ingested like files (decoded,
    checked, provenance recorded); its own size refusal and a failed fetch skip the input with the reason, and
    the ingest goes on, losing nothing."""
    import pipeline.data.sources as sources
    from pipeline.data.sources.base import Source, SourceItem

    images = [noise_image((20, 12), seed=seed) for seed in range(3)]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    encoded.append(b"\x89PNG" + bytes(5000))  # over the cap below: refused by the input itself
    encoded.append(None)  # unreachable

    def resolve(spec: str) -> Source:
        items = [
            SourceItem(f"inline/{n}", n % 2, f"inline://{n}", InlineImage(f"inline://{n}", data), str(n))
            for n, data in enumerate(encoded)
        ]
        return Source("inline", spec, items, ("even", "odd"), "fingerprint")

    kind = sources.SourceKind("inline", lambda spec: spec.startswith("inline:"), resolve)
    monkeypatch.setattr(sources, "SOURCE_KINDS", (kind, *sources.SOURCE_KINDS))
    result = ingest("inline:demo", tmp_path / "out", IngestConfig(workers=1, max_file_bytes=4096), progress=False)

    assert (result.manifest.inputs, result.manifest.written) == (5, 3)
    assert [entry.input for entry in result.manifest.skipped] == ["inline://3", "inline://4"]
    assert "over 4,096" in result.manifest.skipped[0].reason
    assert result.manifest.skipped[1].reason == "cannot read it: Connection refused"
    samples = tar_samples(tmp_path / "out")
    for n, image in enumerate(images):
        sample = samples[f"inline/{n}"]
        np.testing.assert_array_equal(decoded_pixels(sample["png"]), np.asarray(image))
        assert json.loads(sample["json"])["source"] == f"inline://{n}" and sample["cls"] == str(n % 2).encode()
