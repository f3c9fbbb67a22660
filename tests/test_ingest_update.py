"""`mocoplus ingest --update`: a catalogue folder that grows, loses and re-shoots photos, day by day.

The folder holds real Fashion-MNIST images as PNG files in class folders; a
day adds 20 % new images, deletes 5 % and overwrites 2 % with other pixels.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from datasets import PhotoFolder
from PIL import Image
from test_killed_runs import hidden, killed, mocoplus

from artifacts.shard_set import MANIFEST_NAME, read_manifest, resolve_shards
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.verify import verify

FIRST, ADDED, REMOVED, OVERWRITTEN = range(200), range(200, 240), range(0, 200, 20), (5, 47, 93, 141)


def run(folder: PhotoFolder, out, **options):
    return ingest(str(folder.root), out, IngestConfig(**{"workers": 1, "shard_size": 64, **options}), progress=False)


def next_day(folder: PhotoFolder) -> None:
    folder.add(ADDED)
    folder.remove(REMOVED)
    folder.overwrite(OVERWRITTEN, [row + 300 for row in OVERWRITTEN])


@pytest.fixture
def folder(fashion_mnist_slice, tmp_path) -> PhotoFolder:
    photos = PhotoFolder(fashion_mnist_slice, tmp_path / "photos")
    photos.add(FIRST)
    return photos


def live_samples(out) -> dict[str, np.ndarray]:
    """What a reader gets from the set: every live sample's pixels by key (removed ones skipped)."""
    shards = resolve_shards(out)
    samples = {}
    for url in shards.urls:
        with tarfile.open(url) as archive:
            for member in archive:
                key, _, field = member.name.rpartition(".")
                if field == "png" and shards.keeps({"__key__": key, "__url__": url}):
                    assert key not in samples, f"{key} is live twice"
                    samples[key] = np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())))
    return samples


def files(out) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def test_an_update_adds_removes_and_replaces_without_rewriting_a_shard(folder, tmp_path):
    out = tmp_path / "shards"
    first = run(folder, out)
    day_one = files(out)
    next_day(folder)

    result = run(folder, out, update=True)

    manifest = result.manifest
    assert (result.added, result.removed) == (len(ADDED) + len(OVERWRITTEN), len(REMOVED) + len(OVERWRITTEN))
    assert manifest.live == len(folder.shown) == manifest.inputs
    assert [record.generation for record in manifest.generations] == [0, 1]
    replaced = {folder.key(number) for number in OVERWRITTEN}
    assert set(manifest.generations[1].removed) == {folder.key(number) for number in REMOVED} | replaced
    for name, data in day_one.items():  # existing shards never rewritten; only the manifest changes
        if name != MANIFEST_NAME:
            assert (out / name).read_bytes() == data
    assert all(shard.generation == 1 for shard in manifest.shards[len(first.manifest.shards) :])

    samples = live_samples(out)
    assert set(samples) == folder.live_keys()
    for number, row in folder.shown.items():  # a replaced photo reads as its new pixels, never the old
        np.testing.assert_array_equal(samples[folder.key(number)], folder.pixels[row])
    report = verify(out, progress=False)
    assert report.ok, report.problems


def test_a_rerun_with_nothing_new_writes_nothing_and_a_changed_source_names_update(folder, tmp_path):
    out = tmp_path / "shards"
    run(folder, out)
    next_day(folder)
    with pytest.raises(FileExistsError, match="--update"):
        run(folder, out)
    run(folder, out, update=True)
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}

    again = run(folder, out, update=True)

    assert again.up_to_date and len(again.manifest.generations) == 2
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before


def test_updates_chain_and_a_removed_then_restored_photo_comes_back(folder, tmp_path):
    out = tmp_path / "shards"
    run(folder, out)
    folder.remove([7])
    run(folder, out, update=True)
    folder.add([7])
    folder.overwrite([8], [380])
    third = run(folder, out, update=True)

    assert [len(record.removed) for record in third.manifest.generations] == [0, 1, 1]
    samples = live_samples(out)
    assert set(samples) == folder.live_keys()
    np.testing.assert_array_equal(samples[folder.key(8)], folder.pixels[380])
    assert verify(out, quick=True, progress=False).ok


def test_an_update_keeps_the_sets_options_and_classes(folder, tmp_path):
    out = tmp_path / "shards"
    run(folder, out)
    folder.add([250])
    with pytest.raises(FileExistsError, match="shard_size 64 → 32"):
        run(folder, out, update=True, shard_size=32)
    (folder.root / "new-class").mkdir()
    (folder.root / "new-class" / "a.png").write_bytes(folder.path(250).read_bytes())
    with pytest.raises(ValueError, match=r"\['new-class'\] added"):
        run(folder, out, update=True)


def test_a_skipped_input_stays_skipped_until_it_changes(folder, tmp_path):
    out = tmp_path / "shards"
    broken = folder.root / folder.classes[0] / "broken.png"
    broken.write_bytes(b"not a png")
    first = run(folder, out)
    assert [item.input for item in first.manifest.skipped] == [broken.relative_to(folder.root).as_posix()]
    folder.add([250])
    second = run(folder, out, update=True)
    assert second.added == 1 and len(second.manifest.skipped) == 1
    broken.write_bytes(folder.path(250).read_bytes())  # fixed: a good image now
    third = run(folder, out, update=True)
    assert third.added == 1 and not third.manifest.skipped
    assert third.manifest.live == third.manifest.inputs == len(folder.shown) + 1


@pytest.mark.parametrize("nth", [1, 2])
def test_a_killed_update_rerun_gives_the_uninterrupted_bytes(folder, tmp_path, nth):
    out, reference = tmp_path / "killed", tmp_path / "reference"
    for target in (out, reference):
        run(folder, target, shard_size=16)
    next_day(folder)
    args = ["ingest", str(folder.root), "--out", str(out), "--shard-size", "16", "--workers", "1", "--update"]
    run(folder, reference, update=True, shard_size=16)  # the same options: the update keeps the set's
    killed("pipeline.data.ingest", "_save_state", nth, *args, "--no-progress")
    assert not (out / "inputs-000001.json").exists()

    done = mocoplus(*args, "--no-progress")

    assert done.returncode == 0, done.stderr
    assert "generation 1: +44 added, −14 removed" in done.stdout
    assert hidden(out) == hidden(reference) == [".ingest.lock"]
    ours, theirs = files(out), files(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        if name != MANIFEST_NAME:
            assert ours[name] == theirs[name], name
    manifests = [json.loads(data[MANIFEST_NAME]) for data in (ours, theirs)]
    for manifest in manifests:
        for record in manifest["generations"]:
            record.pop("created")
    assert manifests[0]["generations"] == manifests[1]["generations"]
    assert manifests[0]["shards"] == manifests[1]["shards"]
    assert read_manifest(out).live == len(folder.shown)
