"""`verify`: a shard set checked against its manifest, each kind of damage reported by shard and sample.

Also `resolve_shards`, the way readers name shard sets (folder, manifest, .tar, brace pattern, pipe: URL, ``::``).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from datasets import write_image

from artifacts.atomic import sha256_file
from artifacts.shard_set import MANIFEST_NAME, read_manifest, resolve_shards
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.verify import Problem, verify

SHARDS = ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar")
# 12 images in class folders a (img00..img05) and b (img06..img11), 5 per shard, in sorted order
SHARD_KEYS = (
    ["a/img00", "a/img01", "a/img02", "a/img03", "a/img04"],
    ["a/img05", "b/img06", "b/img07", "b/img08", "b/img09"],
    ["b/img10", "b/img11"],
)

Change = Callable[[str, bytes], "tuple[str, bytes] | None"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 12-sample, 3-shard labelled set, built once; tests work on copies."""
    root = tmp_path_factory.mktemp("verify")
    for index in range(12):
        write_image(root / "src" / ("a" if index < 6 else "b") / f"img{index:02d}.png", seed=index)
    ingest(str(root / "src"), root / "shards", IngestConfig(workers=1, shard_size=5), progress=False)
    return root / "shards"


@pytest.fixture
def shard_set(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}  # type: ignore[union-attr]


def rewrite_shard(path: Path, change: Change) -> None:
    """Rebuild the tar at ``path`` as a valid tar, each member through ``change`` (None drops it)."""
    rebuilt = io.BytesIO()
    with tarfile.open(path) as source, tarfile.open(fileobj=rebuilt, mode="w") as target:
        for member in source:
            data = source.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            changed = change(member.name, data)
            if changed is None:
                continue
            member.name, data = changed
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    path.write_bytes(rebuilt.getvalue())


def replace_member(name: str, data: bytes) -> Change:
    return lambda member, old: (member, data) if member == name else (member, old)


def edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def refresh_manifest(folder: Path) -> None:
    """Record the shards' current sizes and hashes, so only the checks past sha256 can catch a change."""

    def update(manifest: dict) -> None:
        for shard in manifest["shards"]:
            shard["bytes"] = (folder / shard["name"]).stat().st_size
            shard["sha256"] = sha256_file(folder / shard["name"])

    edit_manifest(folder, update)


def flip_byte_in_member(path: Path, member_name: str, at: int = 0) -> None:
    """Flip one byte of a member's data in place: the tar stays readable, its hash changes."""
    with tarfile.open(path) as archive:
        offset = archive.getmember(member_name).offset_data + at
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- a clean set --------------------------------------------------------------------------------


def test_clean_set_verifies_and_every_sample_decodes(shard_set: Path) -> None:
    report = verify(shard_set, progress=False)

    assert report.problems == []
    assert report.ok
    assert (report.shards, report.samples, report.decoded) == (3, 12, 12)


def test_quick_mode_checks_counts_but_decodes_nothing(shard_set: Path) -> None:
    report = verify(shard_set, quick=True, progress=False)

    assert report.ok
    assert (report.shards, report.samples, report.decoded) == (3, 12, 0)


def test_shard_contents_are_what_the_key_table_here_assumes(shard_set: Path) -> None:
    for name, keys in zip(SHARDS, SHARD_KEYS, strict=True):
        assert sorted(members(shard_set / name)) == sorted(
            f"{key}.{ext}" for key in keys for ext in ("cls", "json", "png")
        )


# --- damage, each named by shard (and sample) ------------------------------------------------------


def test_undecodable_image_with_matching_hash_is_caught_only_by_decoding(shard_set: Path) -> None:
    shard = shard_set / SHARDS[1]
    png = members(shard)["b/img07.png"]
    rewrite_shard(shard, replace_member("b/img07.png", b"\x5a" * len(png)))  # garbage, same length
    refresh_manifest(shard_set)

    quick = verify(shard_set, quick=True, progress=False)
    full = verify(shard_set, progress=False)

    assert quick.ok, quick.problems
    assert len(full.problems) == 1
    problem = full.problems[0]
    assert (problem.shard, problem.key) == (SHARDS[1], "b/img07")
    assert problem.reason.startswith("image does not decode")
    assert str(problem).startswith(f"{SHARDS[1]}: sample b/img07: image does not decode")
    assert (full.samples, full.decoded) == (12, 11)


def test_truncated_png_data_with_matching_hash_is_caught_by_decoding(shard_set: Path) -> None:
    shard = shard_set / SHARDS[0]
    png = members(shard)["a/img02.png"]
    rewrite_shard(shard, replace_member("a/img02.png", png[: len(png) // 2]))
    refresh_manifest(shard_set)

    assert verify(shard_set, quick=True, progress=False).ok
    [problem] = verify(shard_set, progress=False).problems
    assert (problem.shard, problem.key) == (SHARDS[0], "a/img02")
    assert "does not decode" in problem.reason


@pytest.mark.parametrize("quick", [True, False])
def test_flipped_byte_without_manifest_update_is_a_sha256_problem(shard_set: Path, quick: bool) -> None:
    flip_byte_in_member(shard_set / SHARDS[2], "b/img11.json", at=3)  # still a valid tar and a decodable image

    report = verify(shard_set, quick=quick, progress=False)

    assert len(report.problems) == 1
    problem = report.problems[0]
    assert (problem.shard, problem.key) == (SHARDS[2], None)
    assert "sha256" in problem.reason
    assert report.samples == 12


def test_flipped_image_byte_is_reported_as_sha256_problem(shard_set: Path) -> None:
    flip_byte_in_member(shard_set / SHARDS[0], "a/img01.png", at=40)

    problems = verify(shard_set, quick=True, progress=False).problems

    assert [(p.shard, p.key) for p in problems] == [(SHARDS[0], None)]
    assert "sha256" in problems[0].reason


@pytest.mark.parametrize("keep_bytes", [0, 700, 10_000])
def test_truncated_shard_is_a_size_problem_and_never_raises(shard_set: Path, keep_bytes: int) -> None:
    shard = shard_set / SHARDS[1]
    shard.write_bytes(shard.read_bytes()[:keep_bytes])

    report = verify(shard_set, progress=False)

    assert not report.ok
    assert {problem.shard for problem in report.problems} == {SHARDS[1]}
    reasons = [problem.reason for problem in report.problems]
    assert f"size {keep_bytes:,} bytes, the manifest says" in reasons[0]
    # what could be read of it is either unreadable or short of samples
    assert any("not a readable tar" in reason or "the manifest says 5" in reason for reason in reasons[1:])


def test_empty_shard_file_is_unreadable(shard_set: Path) -> None:
    (shard_set / SHARDS[2]).write_bytes(b"")

    problems = verify(shard_set, progress=False).problems

    assert [(p.shard, p.key) for p in problems] == [(SHARDS[2], None), (SHARDS[2], None)]
    assert problems[0].reason.startswith("size 0 bytes")
    assert problems[1].reason.startswith("not a readable tar file")


def test_deleted_shard_is_missing_and_the_others_still_checked(shard_set: Path) -> None:
    (shard_set / SHARDS[2]).unlink()

    report = verify(shard_set, progress=False)

    assert report.problems == [Problem(SHARDS[2], None, "missing")]
    assert (report.shards, report.samples, report.decoded) == (3, 10, 10)


def test_inconsistent_manifest_count_is_a_clear_value_error(shard_set: Path) -> None:
    edit_manifest(shard_set, lambda manifest: manifest["shards"][0].update(count=4))

    with pytest.raises(ValueError, match=r"manifest\.json: 12 samples written but the shards hold 11"):
        read_manifest(shard_set)
    with pytest.raises(ValueError, match=r"manifest\.json"):
        verify(shard_set, progress=False)


def test_wrong_but_consistent_manifest_count_is_a_count_problem(shard_set: Path) -> None:
    def undercount(manifest: dict) -> None:
        manifest["shards"][0]["count"] = 4
        manifest["counts"].update(inputs=11, written=11)
        manifest["source"]["inputs"] = 11
        manifest["generations"][0]["added"] = 11

    edit_manifest(shard_set, undercount)

    report = verify(shard_set, quick=True, progress=False)

    assert report.problems == [Problem(SHARDS[0], None, "holds 5 samples, the manifest says 4")]


def test_label_out_of_range_is_named_by_sample(shard_set: Path) -> None:
    rewrite_shard(shard_set / SHARDS[2], replace_member("b/img10.cls", b"7"))
    refresh_manifest(shard_set)

    report = verify(shard_set, quick=True, progress=False)

    assert report.problems == [Problem(SHARDS[2], "b/img10", "label 7 is not one of the 2 classes")]


@pytest.mark.parametrize("label", [b"-1", b"one", b"1.0", b"\xff"])
def test_label_that_is_not_a_non_negative_integer_is_named_by_sample(shard_set: Path, label: bytes) -> None:
    rewrite_shard(shard_set / SHARDS[0], replace_member("a/img03.cls", label))
    refresh_manifest(shard_set)

    [problem] = verify(shard_set, quick=True, progress=False).problems

    assert (problem.shard, problem.key) == (SHARDS[0], "a/img03")
    assert "is not a non-negative integer" in problem.reason


def test_duplicate_key_across_shards_names_both(shard_set: Path) -> None:
    def rename(member: str, data: bytes) -> tuple[str, bytes]:
        return (member.replace("a/img05", "a/img00"), data)

    rewrite_shard(shard_set / SHARDS[1], rename)
    refresh_manifest(shard_set)

    report = verify(shard_set, progress=False)

    assert report.problems == [Problem(SHARDS[1], "a/img00", f"duplicate key (also in {SHARDS[0]})")]


def test_sample_without_its_image_is_named(shard_set: Path) -> None:
    rewrite_shard(shard_set / SHARDS[1], lambda member, data: None if member == "b/img08.png" else (member, data))
    refresh_manifest(shard_set)

    [problem] = verify(shard_set, quick=True, progress=False).problems

    assert (problem.shard, problem.key) == (SHARDS[1], "b/img08")
    assert "expected one image field" in problem.reason


def test_every_problem_of_a_badly_damaged_set_is_reported(shard_set: Path) -> None:
    (shard_set / SHARDS[0]).unlink()
    flip_byte_in_member(shard_set / SHARDS[2], "b/img10.json")

    report = verify(shard_set, progress=False)

    assert [(p.shard, p.key) for p in report.problems] == [(SHARDS[0], None), (SHARDS[2], None)]
    assert report.problems[0].reason == "missing"
    assert "sha256" in report.problems[1].reason


# --- no manifest, or not one ------------------------------------------------------------------------


def test_folder_without_manifest_is_an_unfinished_ingest(shard_set: Path) -> None:
    (shard_set / MANIFEST_NAME).unlink()

    with pytest.raises(FileNotFoundError, match="ingest did not finish"):
        verify(shard_set, progress=False)


def test_missing_folder_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        verify(tmp_path / "nowhere", progress=False)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not valid JSON .Expecting property name"),
        ("", "not valid JSON .Expecting value"),
        ("[1, 2]", "not a JSON object"),
        ("[" * 100_000, "not valid JSON .nested too deeply"),
        ('{"format": "something.else", "version": 1}', "not a mocoplus shard manifest"),
        ('{"format": "mocoplus.shards", "version": 99}', "unsupported shard manifest version 99"),
        ('{"format": "mocoplus.shards", "version": 1}', "malformed shard manifest"),
    ],
)
def test_manifest_that_is_not_one_is_a_value_error_naming_the_file(shard_set: Path, text: str, says: str) -> None:
    (shard_set / MANIFEST_NAME).write_text(text)

    with pytest.raises(ValueError, match=says) as caught:
        verify(shard_set, progress=False)

    assert str(shard_set / MANIFEST_NAME) in str(caught.value)


def test_manifest_that_is_not_utf8_is_a_value_error_naming_the_file(shard_set: Path) -> None:
    (shard_set / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00garbage")

    with pytest.raises(ValueError, match="not valid JSON") as caught:
        read_manifest(shard_set)

    assert str(shard_set / MANIFEST_NAME) in str(caught.value)


def test_manifest_with_malformed_shard_records_is_a_value_error(shard_set: Path) -> None:
    edit_manifest(shard_set, lambda manifest: manifest["shards"][1].update(extra="field"))

    with pytest.raises(ValueError, match=r"manifest\.json: malformed shard manifest"):
        verify(shard_set, progress=False)


# --- resolve_shards: how readers name shard sets ---------------------------------------------------


def test_resolve_folder_gives_manifest_shards_count_and_classes(shard_set: Path) -> None:
    shards = resolve_shards(shard_set)

    assert shards.urls == tuple(str(shard_set / name) for name in SHARDS)
    assert shards.samples == 12
    assert shards.class_names == ("a", "b")


def test_resolve_manifest_path_is_the_same_as_its_folder(shard_set: Path) -> None:
    assert resolve_shards(shard_set / MANIFEST_NAME) == resolve_shards(shard_set)
    assert resolve_shards(str(shard_set / MANIFEST_NAME)) == resolve_shards(str(shard_set))


def test_resolve_single_tar_has_no_count(shard_set: Path) -> None:
    shards = resolve_shards(shard_set / SHARDS[1])

    assert shards.urls == (str(shard_set / SHARDS[1]),)
    assert shards.samples is None
    assert shards.class_names is None


def test_resolve_brace_pattern_expands_in_order(shard_set: Path) -> None:
    shards = resolve_shards(f"{shard_set}/shard-{{000000..000002}}.tar")

    assert shards.urls == tuple(str(shard_set / name) for name in SHARDS)
    assert shards.samples is None


def test_resolve_joined_specs_concatenate(shard_set: Path, pristine: Path) -> None:
    both = resolve_shards(f"{shard_set}::{pristine}")
    mixed = resolve_shards(f"{shard_set}::{shard_set / SHARDS[0]}")
    tars = resolve_shards(f"{shard_set / SHARDS[2]}::{shard_set / SHARDS[0]}")

    assert both.urls == tuple(str(folder / name) for folder in (shard_set, pristine) for name in SHARDS)
    assert (both.samples, both.class_names) == (24, ("a", "b"))
    assert mixed.urls == (*(str(shard_set / name) for name in SHARDS), str(shard_set / SHARDS[0]))
    assert mixed.samples is None  # a bare .tar has no count, so the whole has none
    assert tars.urls == (str(shard_set / SHARDS[2]), str(shard_set / SHARDS[0]))


def test_resolve_brace_pattern_with_a_missing_shard_names_it(shard_set: Path) -> None:
    (shard_set / SHARDS[1]).unlink()

    with pytest.raises(FileNotFoundError, match=r"shard-000001\.tar"):
        resolve_shards(f"{shard_set}/shard-{{000000..000002}}.tar")
    with pytest.raises(FileNotFoundError, match=r"shard-000001\.tar \(and 2 more\)"):
        resolve_shards(f"{shard_set}/shard-{{000000..000004}}.tar")


def test_resolve_missing_tar_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="shard not found"):
        resolve_shards(tmp_path / "nope.tar")


def test_resolve_folder_without_manifest_is_file_not_found(shard_set: Path) -> None:
    (shard_set / MANIFEST_NAME).unlink()

    with pytest.raises(FileNotFoundError, match="ingest did not finish"):
        resolve_shards(shard_set)


def test_resolve_pipe_url_expands_braces_without_touching_files() -> None:
    shards = resolve_shards("pipe:cat /path/x-{000000..000001}.tar")

    assert shards.urls == ("pipe:cat /path/x-000000.tar", "pipe:cat /path/x-000001.tar")
    assert shards.samples is None


def test_resolve_remote_url_is_passed_through() -> None:
    shards = resolve_shards("https://example.com/train-{0..2}.tar")

    assert shards.urls == tuple(f"https://example.com/train-{i}.tar" for i in range(3))
    assert shards.samples is None


@pytest.mark.parametrize("spec", ["", "   ", "::"])
def test_resolve_empty_spec_is_a_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match="no shards"):
        resolve_shards(spec)


def test_sample_split_across_non_adjacent_members_is_a_problem(shard_set: Path) -> None:
    shard = shard_set / SHARDS[2]
    with tarfile.open(shard) as archive:
        entries = [(member, archive.extractfile(member).read()) for member in archive]  # type: ignore[union-attr]
    images_first = sorted(entries, key=lambda entry: not entry[0].name.endswith(".png"))  # stable: png, png, rest
    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=rebuilt, mode="w") as archive:
        for member, data in images_first:
            archive.addfile(member, io.BytesIO(data))
    shard.write_bytes(rebuilt.getvalue())
    refresh_manifest(shard_set)
    assert [m.name for m, _ in images_first][:3] == ["b/img10.png", "b/img11.png", "b/img10.cls"]

    report = verify(shard_set, progress=False)

    assert not report.ok
    assert {problem.shard for problem in report.problems} == {SHARDS[2]}
