"""`mocoplus ingest`: a source of images → a WebDataset shard set.

See docs/architecture.md, "The contracts" and "Bad input".

Worker processes read, decode, validate, convert and re-encode the inputs; the
main process writes them in input order into shards of ``shard_size`` samples
(or ``shard_bytes``, whichever comes first). Because order, keys, encoder
settings and tar headers (fixed mtime, owner and mode) are all fixed, the same
input gives the same shards byte for byte, whatever the number of workers.

Nothing is lost and nothing half-done looks done:

- an input that is not a usable image is listed in the manifest with its
  reason, and ``inputs = written + skipped`` is checked before the manifest is
  written (`ShardSetManifest` refuses counts that do not reconcile);
- a shard is written under a hidden temp name and renamed when complete; after
  each one a small resume state (``.ingest-state.json``) records how far the
  input got, so a rerun after a crash or Ctrl-C continues from the last
  finished shard and produces the same bytes as an uninterrupted run;
- ``manifest.json`` comes last. A finished set whose source and options are
  unchanged is left as it is; one made from other input is replaced only with
  ``overwrite``, or brought up to date with ``update``.

An update (`pipeline.data.generations` says what it must do) writes the new
and changed inputs into new shards, numbered on from the set's last one —
existing shards are never rewritten — and records the removed keys and the
new generation in the manifest. It resumes like a first ingest: its state
names the manifest it updates, so a killed update rerun gives the same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import re
import signal
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from artifacts.atomic import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    commit_file,
    package_version,
    prepare_out_dir,
    sha256_file,
    sweep_stale_temps,
    temp_path_for,
    write_json_atomic,
)
from artifacts.files import read_regular_file
from artifacts.jsonfile import MAX_JSON_BYTES
from artifacts.shard_set import (
    MANIFEST_NAME,
    GenerationRecord,
    ShardRecord,
    ShardSetManifest,
    SkippedInput,
    read_manifest,
)
from pipeline.data.config import IngestConfig
from pipeline.data.generations import plan_update, records_of, replay, write_inputs
from pipeline.data.samples import PreparedSample, SampleOptions, prepare_chunk
from pipeline.data.sources import resolve_source
from pipeline.data.sources.base import Source, SourceItem
from pipeline.progress import stage_progress

STATE_NAME = ".ingest-state.json"
LOCK_NAME = ".ingest.lock"


@dataclass(frozen=True)
class IngestResult:
    manifest: ShardSetManifest
    out_dir: Path
    up_to_date: bool  # the folder already held this exact shard set; nothing was written
    resumed_inputs: int  # inputs taken over from an interrupted earlier run
    elapsed_s: float
    added: int = 0  # samples this run wrote (an update's new generation; all of a first ingest)
    removed: int = 0  # keys this run removed (an update)
    read: int | None = None  # inputs this run read (an update reads only the new and changed ones)

    @property
    def images_per_s(self) -> float:
        read = self.read if self.read is not None else self.manifest.inputs - self.resumed_inputs
        return read / max(self.elapsed_s, 1e-9)


# --- samples → shards (main process) --------------------------------------------------------


class ShardFile:
    """One shard being written under a temp name; `commit` ends the archive, renames it into place, describes it."""

    def __init__(self, path: Path, generation: int = 0) -> None:
        self.path, self.generation = path, generation
        self.temp = temp_path_for(path)
        self.count = 0
        self._handle: BinaryIO = open(self.temp, "wb")  # noqa: SIM115 - closed in commit/discard
        self._digest = hashlib.sha256()

    def size_with(self, sample: PreparedSample) -> int:
        """The finished file's size if ``sample`` were added (with the end-of-archive blocks and record padding)."""
        return _padded(self._handle.tell() + len(sample.members) + _END_OF_ARCHIVE)

    def write(self, sample: PreparedSample) -> None:
        self._append(sample.members)
        self.count += 1

    def commit(self) -> ShardRecord:
        """End the archive as tarfile does (two zero blocks, zeros up to a whole record) and rename it into place."""
        self._append(bytes(_padded(self._handle.tell() + _END_OF_ARCHIVE) - self._handle.tell()))
        self._handle.close()
        commit_file(self.temp, self.path)
        size = self.path.stat().st_size
        return ShardRecord(self.path.name, self.count, size, self._digest.hexdigest(), self.generation)

    def discard(self) -> None:
        self._handle.close()
        self.temp.unlink(missing_ok=True)

    def _append(self, data: bytes) -> None:
        self._handle.write(data)
        self._digest.update(data)


_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


def _padded(size: int) -> int:
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group; the parent alone handles it (and terminates the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunks(source: Source, start: int) -> Iterator[list[SourceItem]]:
    """Consecutive items, ``source.chunk_size`` at a time: what one worker round trip carries."""
    for first in range(start, len(source.items), source.chunk_size):
        yield source.items[first : first + source.chunk_size]


def _run_workers(
    source: Source, start: int, options: SampleOptions, workers: int
) -> Iterator[PreparedSample | SkippedInput]:
    """Prepared samples of ``source.items[start:]`` in input order, from ``workers`` processes."""
    work = partial(prepare_chunk, options=options)
    if workers == 1:
        results = map(work, _chunks(source, start))
        for chunk in results:
            yield from chunk
        return
    # spawn: a fresh interpreter per worker, safe whatever threads the parent runs (prefect, torch)
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_interrupts) as pool:
        for chunk in pool.imap(work, _chunks(source, start)):
            yield from chunk


# --- the stage ----------------------------------------------------------------------------------


def _identity(source: Source, config: IngestConfig) -> dict[str, Any]:
    """What the output depends on, in its JSON form (as the manifest and the resume state store it)."""
    return json.loads(json.dumps({"source": source.describe(), "options": config.output_options()}))


def _own_files(out_dir: Path, names: set[str]) -> list[Path]:
    """Files of an ingest here: shards of these ``names`` (prefixes), input lists, temp files, the resume state,
    the manifest.

    Other files are never touched, so a folder shared with other data is safe.
    """
    shard = re.compile(rf"({'|'.join(map(re.escape, sorted(names)))})-\d{{6}}\.tar|inputs-\d{{6}}\.json")
    temps = tuple(f"{TEMP_PREFIX}{name}" for name in (MANIFEST_NAME, STATE_NAME, "inputs-", *(f"{n}-" for n in names)))
    return [
        path
        for path in out_dir.iterdir()
        if shard.fullmatch(path.name)
        or path.name in (MANIFEST_NAME, STATE_NAME)
        or (path.name.startswith(temps) and path.name.endswith(TEMP_SUFFIX))
    ]


@dataclass
class _Progress:
    """Where an ingest stands: finished shards, skipped inputs and the first input not yet in a shard."""

    shards: list[ShardRecord] = field(default_factory=list)
    skipped: list[SkippedInput] = field(default_factory=list)
    next_input: int = 0


def _load_state(out_dir: Path, identity: dict[str, Any]) -> _Progress | None:
    """The progress of an interrupted run of this same ingest, if its finished shards are intact."""
    try:
        state = json.loads(read_regular_file(out_dir / STATE_NAME, MAX_JSON_BYTES))
        if state.get("identity") != identity:
            return None
        shards = [ShardRecord(**shard) for shard in state["shards"]]
        for shard in shards:
            path = out_dir / shard.name
            if not path.is_file() or path.stat().st_size != shard.bytes or sha256_file(path) != shard.sha256:
                return None
        skipped = [SkippedInput(**item) for item in state["skipped"]]
        return _Progress(shards, skipped, int(state["next_input"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_state(out_dir: Path, identity: dict[str, Any], progress: _Progress) -> None:
    """Record the finished shards and the first input not in them: where a rerun resumes."""
    state = {
        "identity": identity,
        "next_input": progress.next_input,
        "shards": [asdict(shard) for shard in progress.shards],
        "skipped": [asdict(item) for item in progress.skipped],
    }
    write_json_atomic(out_dir / STATE_NAME, state)


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """One ingest per folder at a time: a second one fails at once instead of interleaving shards."""
    with open(out_dir / LOCK_NAME, "a") as lock:  # "a": taking the lock writes nothing, not even a new mtime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another ingest is writing to {out_dir}") from None
        yield


def ingest(spec: str, out_dir: Path, config: IngestConfig | None = None, *, progress: bool = True) -> IngestResult:
    """Write the shard set of source ``spec`` into ``out_dir``; resumes an interrupted run of the same ingest.

    With ``config.update``, a finished set made from an earlier state of the
    source gets a new generation instead (`_update`); a folder without a set is
    ingested as usual.
    """
    config = config or IngestConfig()
    started = time.perf_counter()
    source = resolve_source(spec)
    if source.inputs == 0:
        raise ValueError(f"source {spec!r} holds no inputs")
    out_dir = prepare_out_dir(out_dir)
    identity = _identity(source, config)
    with _exclusive(out_dir):
        sweep_stale_temps(out_dir)  # what a killed ingest left (the lock says none is running here)
        existing = _existing_manifest(out_dir)
        if existing is not None and {"source": existing.source, "options": existing.options} == identity:
            (out_dir / STATE_NAME).unlink(missing_ok=True)  # an update killed after its manifest was written
            return IngestResult(existing, out_dir, True, existing.inputs, time.perf_counter() - started)
        if existing is not None and config.update and not config.overwrite:
            return _update(source, out_dir, config, identity, existing, progress, started)
        if (out_dir / MANIFEST_NAME).exists() and not config.overwrite:
            raise FileExistsError(
                f"{out_dir} already holds a shard set made from other input or options; pass --update to bring "
                "it up to date with this source, --overwrite to replace it, or choose another --out"
            )
        resumed = None if config.overwrite else _load_state(out_dir, identity)
        names = {config.name} | ({Path(s.name).stem.rsplit("-", 1)[0] for s in existing.shards} if existing else set())
        keep = {shard.name for shard in resumed.shards} | {STATE_NAME} if resumed else set()
        _remove_own_files(out_dir, names, keep)  # a replaced set, or what an interrupted run left after its last shard
        state = resumed or _Progress()
        start = state.next_input
        _write_shards(source, out_dir, config, identity, state, progress)
        inputs_file, inputs_sha256 = write_inputs(out_dir, 0, records_of(source.items, state.skipped))
        created = datetime.now(UTC).isoformat(timespec="seconds")
        written = sum(shard.count for shard in state.shards)
        manifest = ShardSetManifest(
            shards=tuple(state.shards),
            inputs=source.inputs,
            written=written,
            skipped=tuple(source.rejected) + tuple(state.skipped),
            class_names=source.class_names,
            labelled=any(item.label is not None for item in source.items),
            source=identity["source"],
            options=identity["options"],
            mocoplus_version=package_version(),
            created=created,
            generations=(GenerationRecord(0, created, identity["source"], written, (), inputs_file, inputs_sha256),),
        )  # refuses counts that do not reconcile, before anything is written
        write_json_atomic(out_dir / MANIFEST_NAME, manifest.to_json())
        (out_dir / STATE_NAME).unlink(missing_ok=True)
    return IngestResult(manifest, out_dir, False, start, time.perf_counter() - started, added=written)


def _update(
    source: Source,
    out_dir: Path,
    config: IngestConfig,
    identity: dict[str, Any],
    existing: ShardSetManifest,
    progress: bool,
    started: float,
) -> IngestResult:
    """Add the next generation to the finished set ``existing``: new and changed inputs, removed keys."""
    if existing.options != identity["options"]:
        raise FileExistsError(
            f"{out_dir} was written with other options ({_differences(existing.options, identity['options'])}); "
            "an update keeps them: rerun with the set's options, or --overwrite to rebuild it"
        )
    if existing.class_names != source.class_names:
        raise ValueError(
            f"the source's classes changed ({_class_change(existing.class_names, source.class_names)}): the labels "
            "of the samples already in the set would shift; re-ingest with --overwrite"
        )
    plan = plan_update(replay(out_dir, existing), source)
    generation = len(existing.generations)
    identity = {**identity, "update_of": sha256_file(out_dir / MANIFEST_NAME)}  # a resume continues this update only
    resumed = _load_state(out_dir, identity)
    keep = {shard.name for shard in existing.shards} | {
        record.inputs_file for record in existing.generations if record.inputs_file
    }
    keep |= {shard.name for shard in resumed.shards} | {STATE_NAME} if resumed else set()
    _remove_own_files(out_dir, {config.name}, keep | {MANIFEST_NAME})  # what a killed update left after its last shard
    state = resumed or _Progress()
    start = state.next_input
    _write_shards(
        replace(source, items=plan.new), out_dir, config, identity, state, progress,
        first_shard=len(existing.shards), generation=generation,
    )  # fmt: skip
    records = records_of(plan.new, state.skipped)
    samples = [record for record in records if record.key is not None]
    skips = plan.carried + [record for record in records if record.key is None]
    inputs_file, inputs_sha256 = write_inputs(out_dir, generation, samples + skips)
    added = sum(shard.count for shard in state.shards)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    record = GenerationRecord(generation, created, identity["source"], added, plan.removed, inputs_file, inputs_sha256)
    manifest = replace(
        existing,
        shards=existing.shards + tuple(state.shards),
        inputs=source.inputs,
        written=existing.written + added,
        skipped=tuple(source.rejected) + tuple(skip.skipped() for skip in skips),
        source=identity["source"],
        mocoplus_version=package_version(),
        generations=(*existing.generations, record),
    )  # refuses counts that do not reconcile, before anything is written
    write_json_atomic(out_dir / MANIFEST_NAME, manifest.to_json())
    (out_dir / STATE_NAME).unlink(missing_ok=True)
    elapsed = time.perf_counter() - started
    read = len(plan.new) - start
    return IngestResult(manifest, out_dir, False, start, elapsed, added=added, removed=len(plan.removed), read=read)


def _remove_own_files(out_dir: Path, names: set[str], keep: set[str]) -> None:
    for path in _own_files(out_dir, names):
        if path.name not in keep:
            path.unlink()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    return ", ".join(f"{name} {old.get(name)!r} → {new.get(name)!r}" for name in changed)


def _class_change(old: tuple[str, ...] | None, new: tuple[str, ...] | None) -> str:
    before, after = set(old or ()), set(new or ())
    parts = [
        f"{sorted(after - before)} added" if after - before else "",
        f"{sorted(before - after)} gone" if before - after else "",
    ]
    return "; ".join(part for part in parts if part) or f"{old} → {new}"


def _write_shards(
    source: Source,
    out_dir: Path,
    config: IngestConfig,
    identity: dict[str, Any],
    state: _Progress,
    progress: bool,
    *,
    first_shard: int = 0,
    generation: int = 0,
) -> None:
    """Prepare ``source.items[state.next_input:]`` in workers and write them into shards, updating ``state``.

    Shards are numbered from ``first_shard`` (an update's follow the set's last one) and belong to ``generation``.
    """
    options = SampleOptions(
        config.image_format, config.max_side, config.max_pixels, config.max_file_bytes, source.class_names
    )
    current: ShardFile | None = None
    position = state.next_input

    def finish_shard(next_input: int) -> None:
        nonlocal current
        assert current is not None
        state.shards.append(current.commit())
        state.next_input, current = next_input, None
        _save_state(out_dir, identity, state)

    with stage_progress(progress) as bar:
        task = bar.task("ingest", total=len(source.items), completed=position, unit="inputs")
        try:
            for result in _run_workers(source, position, options, config.workers):
                position += 1
                if isinstance(result, SkippedInput):
                    state.skipped.append(result)
                else:
                    if current is not None and current.size_with(result) > config.shard_bytes:
                        finish_shard(position - 1)
                    if current is None:
                        number = first_shard + len(state.shards)
                        current = ShardFile(out_dir / f"{config.name}-{number:06d}.tar", generation)
                    current.write(result)
                    if current.count == config.shard_size:
                        finish_shard(position)
                written = sum(shard.count for shard in state.shards) + (current.count if current else 0)
                bar.update(task, completed=position, status=f"{written:,} written · {len(state.skipped):,} skipped")
            if current is not None:
                state.shards.append(current.commit())
                current = None
        finally:
            if current is not None:
                current.discard()


def _existing_manifest(out_dir: Path) -> ShardSetManifest | None:
    try:
        return read_manifest(out_dir)
    except (OSError, ValueError):
        return None
