"""What `mocoplus ingest --update` has to do: a finished shard set's inputs against its source now.

Each generation of a set lists its inputs in ``inputs-NNNNNN.json`` (see
`artifacts.shard_set`): every sample it wrote (the input's name, its change
signature, its key) and every input skipped so far (with the reason). Replaying
the generations gives what the set holds now; comparing that with the source
gives the update:

- an input not in the set yet, or one skipped before whose file changed since
  (it may decode now), goes into the new generation's shards;
- an input gone from the source is removed, by key;
- an input whose signature changed (same name, other content) is a removal of
  its old sample plus a new one under the same key;
- an unchanged input stays where it is, and an unchanged skipped one stays
  skipped (it is not read again).

An input is named by its file path (a list's line may move without the image
changing), or by its origin where it has no file (a row of an array source).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from artifacts.atomic import write_json_atomic
from artifacts.files import read_regular_file
from artifacts.jsonfile import MAX_JSON_BYTES
from artifacts.shard_set import ShardSetManifest, SkippedInput
from pipeline.data.sources.base import Source, SourceItem, make_key

INPUTS_FORMAT = "mocoplus.inputs"


def inputs_file_name(generation: int) -> str:
    return f"inputs-{generation:06d}.json"


@dataclass(frozen=True)
class InputRecord:
    """One input as a generation saw it: a sample (``key``) or a skipped input (``reason``)."""

    name: str
    signature: str
    origin: str
    key: str | None = None
    reason: str | None = None

    def skipped(self) -> SkippedInput:
        return SkippedInput(self.origin, self.reason or "skipped")


def input_name(item: SourceItem) -> str:
    return item.input.name


def records_of(items: list[SourceItem], skipped: list[SkippedInput]) -> list[InputRecord]:
    """The records of ``items`` once ingested in order, ``skipped`` (by origin) being those that gave no sample."""
    reasons = {entry.input: entry.reason for entry in skipped}
    return [
        InputRecord(input_name(item), item.signature, item.origin, reason=reasons[item.origin])
        if item.origin in reasons
        else InputRecord(input_name(item), item.signature, item.origin, key=item.key)
        for item in items
    ]


def write_inputs(out_dir: Path, generation: int, records: list[InputRecord]) -> tuple[str, str]:
    """A generation's input list (written once, atomically); its file name and sha256."""
    name = inputs_file_name(generation)
    write_json_atomic(out_dir / name, {"format": INPUTS_FORMAT, "generation": generation,
                                       "inputs": [asdict(record) for record in records]})  # fmt: skip
    return name, hashlib.sha256((out_dir / name).read_bytes()).hexdigest()


def read_inputs(out_dir: Path, name: str, sha256: str | None) -> list[InputRecord]:
    """A generation's input list, refused unless it is the file its manifest recorded."""
    data = read_regular_file(out_dir / name, MAX_JSON_BYTES)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{out_dir / name}: its sha256 differs from the manifest's (modified after the ingest)")
    try:
        return [InputRecord(**record) for record in json.loads(data)["inputs"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{out_dir / name}: malformed input list ({type(error).__name__})") from None


@dataclass
class SetContents:
    """What a shard set holds now: live samples and skipped inputs, each by input name."""

    live: dict[str, InputRecord]
    skipped: dict[str, InputRecord]


def replay(out_dir: Path, manifest: ShardSetManifest) -> SetContents:
    """Apply the generations in order: each removes keys of earlier ones, adds its samples, restates its skips."""
    live: dict[str, InputRecord] = {}
    skipped: dict[str, InputRecord] = {}
    for generation in manifest.generations:
        if generation.inputs_file is None:
            raise ValueError(
                f"{out_dir} was ingested before sets could be updated (no input list): "
                "re-ingest it once with --overwrite, later updates then work"
            )
        records = read_inputs(out_dir, generation.inputs_file, generation.inputs_sha256)
        removed = set(generation.removed)
        live = {name: record for name, record in live.items() if record.key not in removed}
        live.update((record.name, record) for record in records if record.key is not None)
        skipped = {record.name: record for record in records if record.key is None}
    return SetContents(live, skipped)


@dataclass(frozen=True)
class UpdatePlan:
    """The next generation: inputs to ingest (keys assigned), keys to remove, skipped inputs carried over."""

    new: list[SourceItem]
    removed: tuple[str, ...]
    carried: list[InputRecord]
    unchanged: int

    @property
    def changes_samples(self) -> bool:
        return bool(self.new or self.removed)


def plan_update(contents: SetContents, source: Source) -> UpdatePlan:
    """Compare the set's contents with the source now (see the module docstring)."""
    current = {input_name(item): item for item in source.items}
    removed = sorted(
        record.key  # type: ignore[misc]
        for name, record in contents.live.items()
        if name not in current or current[name].signature != record.signature
    )
    gone = set(removed)
    kept = {name for name, record in contents.live.items() if record.key not in gone}
    carried = [
        record
        for name, record in contents.skipped.items()
        if name in current and current[name].signature == record.signature
    ]
    settled = kept | {record.name for record in carried}
    used = {contents.live[name].key for name in kept}  # a changed input's old key is free again: it is removed
    new = [replace(item, key=make_key(item.key, used)) for item in source.items if input_name(item) not in settled]
    return UpdatePlan(new, tuple(removed), carried, len(kept))
