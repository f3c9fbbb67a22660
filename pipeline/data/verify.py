"""`mocoplus verify`: is a shard set exactly what its manifest says, and does every sample decode?

Checks, per shard listed in ``manifest.json``: the file exists, its size and
sha256 match, it is a readable tar whose members group into exactly the
listed number of samples, every sample has one image and (in a labelled set)
an integer label among the classes, keys are unique across the set, and,
unless ``quick``, every image decodes under the same rules ingest applied.
The folder must hold no tar the manifest does not list (a shard dropped from
the manifest would otherwise pass as "ok" while its samples sit unread).
In a set that grew by updates, every generation is checked too: its input
list matches its sha256 and names exactly the keys its shards hold, and every
key it removes is a live sample of an earlier generation; a key may come back
only after it was removed (a changed file keeps its key).
Problems are collected, not raised: the report names every bad shard and
sample, and the command exits non-zero when there is any.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from artifacts.atomic import sha256_file
from artifacts.images import InvalidImageError, decode_image
from artifacts.shard_set import IMAGE_EXTENSIONS, ShardRecord, ShardSetManifest, read_manifest
from pipeline.data.generations import read_inputs
from pipeline.progress import stage_progress


@dataclass(frozen=True)
class Problem:
    """Something wrong with a shard (``key`` None) or one of its samples."""

    shard: str
    key: str | None
    reason: str

    def __str__(self) -> str:
        where = self.shard if self.key is None else f"{self.shard}: sample {self.key}"
        return f"{where}: {self.reason}"


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    decoded: int = 0
    generations: int = 0
    live: int = 0  # samples not removed by a later generation
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(folder: Path, *, quick: bool = False, progress: bool = True) -> VerifyReport:
    """Check the shard set in ``folder`` against its manifest (``quick``: hashes and counts, no decoding)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    report = VerifyReport(generations=len(manifest.generations), live=manifest.live)
    seen_keys: dict[str, tuple[str, int]] = {}  # key → (shard, generation) of its latest sample
    held: dict[int, set[str]] = {}  # generation → the keys its shards hold
    listed = {record.name for record in manifest.shards}
    report.problems.extend(
        Problem(path.name, None, "a tar file the manifest does not list (removed from it, or left by another ingest)")
        for path in sorted(folder.glob("*.tar"))
        if path.name not in listed
    )
    with stage_progress(progress) as bar:
        task = bar.task("verify", total=manifest.written, unit="samples")
        for record in manifest.shards:
            report.shards += 1
            keys = held.setdefault(record.generation, set())
            report.problems.extend(_check_shard(folder, record, manifest, quick, seen_keys, keys, report))
            bar.update(task, completed=report.samples, status=f"{len(report.problems)} problems")
    damaged = {shard.generation for shard in manifest.shards if any(p.shard == shard.name for p in report.problems)}
    report.problems.extend(_check_generations(folder, manifest, held, damaged))
    return report


def _check_generations(
    folder: Path, manifest: ShardSetManifest, by_generation: dict[int, set[str]], damaged: set[int]
) -> list[Problem]:
    """Each generation's input list and removals against the keys its shards hold (where those shards are sound:
    a damaged shard's keys are its problem, already reported)."""
    problems: list[Problem] = []
    live: set[str] = set()
    for record in manifest.generations:
        where = f"generation {record.generation}"
        for key in record.removed:
            if key not in live:
                problems.append(Problem(where, key, "removed, but no earlier generation holds it live"))
        live -= set(record.removed)
        if record.inputs_file is None:
            live |= by_generation.get(record.generation, set())
            continue
        try:
            inputs = read_inputs(folder, record.inputs_file, record.inputs_sha256)
        except (OSError, ValueError) as error:
            problems.append(Problem(where, None, f"input list unreadable: {error}"))
            continue
        listed = {item.key for item in inputs if item.key is not None}
        held = by_generation.get(record.generation, set())
        if listed != held and record.generation not in damaged:
            problems.append(
                Problem(
                    where,
                    None,
                    f"its input list names {len(listed):,} keys, its shards hold {len(held):,}: they differ",
                )
            )
        live |= held
    return problems


def _check_shard(
    folder: Path,
    record: ShardRecord,
    manifest: ShardSetManifest,
    quick: bool,
    seen_keys: dict[str, tuple[str, int]],
    held: set[str],
    report: VerifyReport,
) -> list[Problem]:
    path = folder / record.name
    if not path.is_file():
        return [Problem(record.name, None, "missing")]
    problems: list[Problem] = []
    size = path.stat().st_size
    if size != record.bytes:
        problems.append(Problem(record.name, None, f"size {size:,} bytes, the manifest says {record.bytes:,}"))
    elif sha256_file(path) != record.sha256:
        problems.append(Problem(record.name, None, "sha256 differs from the manifest's (corrupted or modified)"))
    try:
        samples = _read_samples(path)
    except (tarfile.TarError, OSError, EOFError) as error:
        return [*problems, Problem(record.name, None, f"not a readable tar file ({error})")]
    if len(samples) != record.count:
        problems.append(Problem(record.name, None, f"holds {len(samples)} samples, the manifest says {record.count}"))
    for key, fields in samples:
        report.samples += 1
        if key in seen_keys and not _removed_between(manifest, key, seen_keys[key][1], record.generation):
            problems.append(Problem(record.name, key, f"duplicate key (also in {seen_keys[key][0]})"))
        seen_keys[key] = (record.name, record.generation)
        held.add(key)
        problems.extend(_check_sample(record.name, key, fields, manifest, quick, report))
    return problems


def _removed_between(manifest: ShardSetManifest, key: str, earlier: int, later: int) -> bool:
    """Whether ``key`` of generation ``earlier`` was removed by the time generation ``later`` wrote it again."""
    return any(key in record.removed for record in manifest.generations[earlier + 1 : later + 1])


def _read_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Tar members grouped into samples as WebDataset groups them: consecutive members sharing a key.

    A key whose members are not adjacent therefore comes back as two samples
    (and is reported as a duplicate key), which is what a training stream would see.
    """
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = base_plus_ext(member.name)
            handle = archive.extractfile(member)
            if key is None or handle is None:
                key, extension = member.name, "?"
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][extension] = handle.read() if handle is not None else b""
    return samples


def _check_sample(
    shard: str, key: str, fields: dict[str, bytes], manifest: ShardSetManifest, quick: bool, report: VerifyReport
) -> list[Problem]:
    images = [extension for extension in fields if extension in IMAGE_EXTENSIONS]
    if len(images) != 1:
        return [Problem(shard, key, f"expected one image field, found {sorted(fields)}")]
    problems: list[Problem] = []
    if manifest.labelled:
        problems.extend(_check_label(shard, key, fields.get("cls"), manifest))
    if not quick:
        try:
            decode_image(fields[images[0]], max_pixels=int(manifest.options.get("max_pixels") or 2**62))
            report.decoded += 1
        except InvalidImageError as error:
            problems.append(Problem(shard, key, f"image does not decode: {error}"))
    return problems


def _check_label(shard: str, key: str, label: bytes | None, manifest: ShardSetManifest) -> list[Problem]:
    if label is None:
        return []  # a labelled list may leave rows without a label
    text = label.decode("ascii", "replace").strip()
    if not text.isdigit():
        return [Problem(shard, key, f"label {text!r} is not a non-negative integer")]
    if manifest.class_names is not None and int(text) >= len(manifest.class_names):
        return [Problem(shard, key, f"label {text} is not one of the {len(manifest.class_names)} classes")]
    return []
