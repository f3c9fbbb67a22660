"""The shard set artifact: WebDataset tars plus ``manifest.json``, and shard URLs.

See docs/architecture.md, "The contracts".

A shard set is a folder of ``NAME-000000.tar`` files, each holding samples
``KEY.png|jpg|webp`` (the image), ``KEY.cls`` (integer label, when labelled)
and ``KEY.json`` (where the sample came from), and a ``manifest.json`` that
lists every shard with its sample count, size and sha256, the class names,
the input counts (``inputs = written + skipped``) and each skipped input with
its reason. The manifest is written last, so a folder without one is an
unfinished ingest.

A set grows in **generations** (`mocoplus ingest --update`): generation 0 is
the first ingest, each update adds new shards (never rewriting old ones) and
records the keys it removes — inputs gone from the source, and the old sample
of a file whose content changed. A removal in generation g applies to the
samples of earlier generations only, so a changed file keeps its key: the old
sample is dead, the new one (in a shard of generation g) is live. Every
generation's inputs (origin, change signature, key or skip reason) are listed
in ``inputs-NNNNNN.json``, written once: what the next update compares the
source with. Readers (`resolve_shards`) hand each shard's dead keys along, so
training, evaluation and embedding never see a removed sample.

Readers name shards by any of:

- a shard set folder, or its ``manifest.json`` (the manifest gives the shards
  and the sample count, which sizes a training epoch);
- one ``.tar`` path, or a brace pattern ``shards-{000000..000099}.tar``;
- a WebDataset ``pipe:`` URL, e.g. ``pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -``
  (or ``pipe:gsutil cat gs://...``, ``pipe:curl -s -L https://...``), brace
  patterns expanded;
- several of these joined with ``::``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from artifacts.jsonfile import read_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mocoplus.shards"
MANIFEST_VERSION = 2  # 2: generations; version 1 (one generation, no input list) is still read
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # sample fields that hold the image, in order of preference


@dataclass(frozen=True)
class SkippedInput:
    """An input that produced no sample, and why (listed in the manifest: nothing accepted is lost silently)."""

    input: str
    reason: str


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard: file name (relative to the set's folder), samples, bytes, sha256."""

    name: str
    count: int
    bytes: int
    sha256: str
    generation: int = 0

    def __post_init__(self) -> None:
        if not is_plain_file_name(self.name):
            raise ValueError(f"shard name {self.name[:80]!r} is not a plain file name in the set's folder")
        if self.count < 0 or self.bytes < 0:
            raise ValueError(f"shard {self.name}: negative count or size ({self.count}, {self.bytes})")


def is_plain_file_name(name: object) -> bool:
    """A name that stays inside its folder: no separators, not ``.``/``..``, not absolute, no NUL."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(character in name for character in "/\\\0")
        and Path(name).name == name
    )


@dataclass(frozen=True)
class GenerationRecord:
    """One ingest or update of a set: when, what the source was, the keys it removed, its input list's file."""

    generation: int
    created: str
    source: dict[str, Any]
    added: int  # samples in this generation's shards
    removed: tuple[str, ...]  # keys of earlier generations' samples that are dead from this generation on
    inputs_file: str | None  # None: a set made before generations (it cannot be updated)
    inputs_sha256: str | None

    def __post_init__(self) -> None:
        if self.inputs_file is not None and not is_plain_file_name(self.inputs_file):
            raise ValueError(f"inputs file {self.inputs_file[:80]!r} is not a plain file name in the set's folder")
        if len(set(self.removed)) != len(self.removed):
            raise ValueError(f"generation {self.generation} removes a key twice")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "removed": list(self.removed)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationRecord:
        return cls(
            generation=int(data["generation"]),
            created=str(data.get("created", "")),
            source=dict(data.get("source") or {}),
            added=int(data["added"]),
            removed=tuple(str(key) for key in data.get("removed", [])),
            inputs_file=data.get("inputs_file"),
            inputs_sha256=data.get("inputs_sha256"),
        )


@dataclass(frozen=True)
class ShardSetManifest:
    """``manifest.json`` of a shard set; `read_manifest` validates it, `to_json` writes it."""

    shards: tuple[ShardRecord, ...]
    inputs: int
    written: int
    skipped: tuple[SkippedInput, ...]
    class_names: tuple[str, ...] | None
    labelled: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    mocoplus_version: str = "unknown"
    created: str = ""
    generations: tuple[GenerationRecord, ...] = ()

    def __post_init__(self) -> None:
        if self.inputs != self.live + len(self.skipped):
            removed = f" − {self.removed} removed" if self.removed else ""
            raise ValueError(
                f"counts do not reconcile: {self.inputs} inputs != {self.written} written{removed} "
                f"+ {len(self.skipped)} skipped"
            )
        if self.written != sum(shard.count for shard in self.shards):
            raise ValueError(f"{self.written} samples written but the shards hold {sum(s.count for s in self.shards)}")
        declared = self.source.get("inputs")
        if declared is not None and declared != self.inputs:
            raise ValueError(f"counts disagree with the source: it had {declared} inputs, the counts say {self.inputs}")
        names = [shard.name for shard in self.shards]
        if len(set(names)) != len(names):
            raise ValueError("a shard is listed twice")
        numbers = [record.generation for record in self.generations]
        if numbers != list(range(len(numbers))):
            raise ValueError(f"generations must be numbered 0, 1, ... in order; got {numbers[:10]}")
        for shard in self.shards:
            if self.generations and not 0 <= shard.generation < len(self.generations):
                raise ValueError(f"shard {shard.name} belongs to generation {shard.generation}, which is not listed")
        for record in self.generations:
            in_shards = sum(shard.count for shard in self.shards if shard.generation == record.generation)
            if in_shards != record.added:
                raise ValueError(
                    f"generation {record.generation} added {record.added} samples, its shards hold {in_shards}"
                )

    @property
    def removed(self) -> int:
        """Samples stored in the shards but removed by a later generation."""
        return sum(len(record.removed) for record in self.generations)

    @property
    def live(self) -> int:
        """Samples a reader gets: those written minus those removed since."""
        return self.written - self.removed

    def dead_keys(self, generation: int) -> frozenset[str]:
        """Keys removed after ``generation``: the samples of its shards that readers skip."""
        return frozenset(key for record in self.generations[generation + 1 :] for key in record.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "mocoplus_version": self.mocoplus_version,
            "created": self.created,
            "source": self.source,
            "options": self.options,
            "labelled": self.labelled,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "counts": {
                "inputs": self.inputs, "written": self.written, "removed": self.removed, "live": self.live,
                "skipped": len(self.skipped),
            },
            "generations": [record.to_json() for record in self.generations],
            "shards": [asdict(shard) for shard in self.shards],
            "skipped": [asdict(item) for item in self.skipped],
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardSetManifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a mocoplus shard manifest (format {data.get('format')!r})")
        if data.get("version") not in (1, MANIFEST_VERSION):
            raise ValueError(
                f"unsupported shard manifest version {data.get('version')!r} (this reads 1 to {MANIFEST_VERSION})"
            )
        counts = data["counts"]
        class_names = data.get("class_names")
        return cls(
            shards=tuple(ShardRecord(**shard) for shard in data["shards"]),
            inputs=int(counts["inputs"]),
            written=int(counts["written"]),
            skipped=tuple(SkippedInput(**item) for item in data["skipped"]),
            class_names=tuple(class_names) if class_names is not None else None,
            labelled=bool(data.get("labelled", False)),
            source=dict(data.get("source") or {}),
            options=dict(data.get("options") or {}),
            mocoplus_version=str(data.get("mocoplus_version", "unknown")),
            created=str(data.get("created", "")),
            generations=tuple(GenerationRecord.from_json(record) for record in data.get("generations", [])),
        )


def read_manifest(folder: Path) -> ShardSetManifest:
    """The validated manifest of the shard set in ``folder``, or a `ValueError`/`FileNotFoundError` that says why."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST_NAME}: not a shard set, or its ingest did not finish (rerun `mocoplus ingest`)"
        )
    data = read_json(path, ValueError, f"{path}: missing")  # its errors name the file already
    try:
        return ShardSetManifest.from_json(data)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: malformed shard manifest ({type(error).__name__}: {error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


@dataclass(frozen=True)
class ShardList:
    """Shard URLs to read, and the sample count when a manifest gives it (None for bare URLs)."""

    urls: tuple[str, ...]
    samples: int | None
    class_names: tuple[str, ...] | None = None
    dead: dict[str, frozenset[str]] = field(default_factory=dict)  # url → keys removed since its shard was written

    def keeps(self, sample: dict[str, Any]) -> bool:
        """Whether a sample read from these shards is live (a WebDataset ``select`` predicate)."""
        return not self.dead or sample.get("__key__") not in self.dead.get(str(sample.get("__url__")), ())


def resolve_shards(spec: str | Path) -> ShardList:
    """Expand a shard spec (folder, manifest, ``.tar``, brace pattern, ``pipe:`` URL, ``::``-joined) to URLs."""
    text = str(spec)
    if not text.strip():
        raise ValueError("no shards given")
    parts = [part for part in text.split("::") if part]
    lists = [_resolve_one(part) for part in parts]
    urls = tuple(url for shard_list in lists for url in shard_list.urls)
    if not urls:
        raise ValueError(f"{text!r} names no shards")
    counts = [shard_list.samples for shard_list in lists]
    samples = sum(counts) if all(count is not None for count in counts) else None  # type: ignore[misc]
    names = {shard_list.class_names for shard_list in lists}
    dead = {url: keys for shard_list in lists for url, keys in shard_list.dead.items()}
    return ShardList(urls, samples, names.pop() if len(names) == 1 else None, dead)


def _resolve_one(part: str) -> ShardList:
    import braceexpand  # here, not at the top: the service reads manifests (corpus images) and its image lacks it

    if part.startswith("pipe:") or "://" in part:
        return ShardList(tuple(braceexpand.braceexpand(part)), None)
    path = Path(part)
    if path.name == MANIFEST_NAME and path.is_file():
        path = path.parent
    if path.is_dir():
        manifest = read_manifest(path)
        dead_of = {record.generation: manifest.dead_keys(record.generation) for record in manifest.generations}
        dead = {str(path / shard.name): dead_of[shard.generation] for shard in manifest.shards}
        return ShardList(
            tuple(str(path / shard.name) for shard in manifest.shards),
            manifest.live,
            manifest.class_names,
            {url: keys for url, keys in dead.items() if keys},
        )
    urls = tuple(braceexpand.braceexpand(part))
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    return ShardList(urls, None)
