"""Sharded IVF builds as tasks: train once, fill parts anywhere, merge, tune.

FAISS's recipe for corpora beyond one process (its ``demo_ondisk_ivf``, and
autofaiss at scale): train the coarse quantizer (and OPQ/PQ) once; give every
part a copy of that empty trained index and its own contiguous range of ids —
a part needs nothing else, so parts fill in parallel, in local processes
(`fill_parts`) or on Dask workers (the ``index-corpus`` flow); then merge the
inverted lists. The merged index is the one a single build makes: the same
centroids, every vector in the list it would have joined, with its global id,
in the same order.

The work lives in a **staging folder** beside the bundle (``.NAME.staging``),
which survives a killed build: ``build.json`` (what is being built: the
inputs, the plan, each part's id range), ``order.npy`` (index id →
embedding-set row), ``trained.faiss``, and per part ``part-NNNN.faiss`` then
``part-NNNN.json`` (written last, naming its writer). A rerun with the same
inputs keeps the trained index and every finished part and fills only the
rest; other inputs start the staging afresh. The staging folder is removed
once the bundle is in place.

The merge runs in memory, or into an on-disk ``index.ivfdata`` (memory-mapped
at search time, never loaded whole) when the parts exceed the memory budget
or ``merge="disk"`` asks for it.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from artifacts.atomic import commit_file, temp_path_for, write_json_atomic
from artifacts.embedding_set import EmbeddingSet
from artifacts.index_bundle import write_faiss_index
from artifacts.jsonfile import read_json

STAGING_JSON, ORDER_FILE, TRAINED_FILE, IVFDATA_FILE = "build.json", "order.npy", "trained.faiss", "index.ivfdata"


def shard_bounds(count: int, num_shards: int) -> list[tuple[int, int]]:
    """``num_shards`` contiguous [start, stop) id ranges covering ``count`` rows, sizes within one."""
    edges = np.linspace(0, count, num_shards + 1).round().astype(int)
    return [(int(low), int(high)) for low, high in itertools.pairwise(edges)]


def staging_dir(out_dir: Path) -> Path:
    """Where a sharded build of the bundle ``out_dir`` keeps its work between runs (hidden, beside it)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.staging"


@dataclass(frozen=True)
class StagedBuild:
    """A staging folder whose trained index and id order are written: the parts can be filled."""

    folder: Path
    embeddings: Path
    bounds: tuple[tuple[int, int], ...]  # each part's [start, stop) index ids: the corpus shards, then the held-out
    chunk_rows: int
    build_id: str  # drawn when the folder was staged: a part filled for an earlier staging never passes for one
    train_seconds: float = 0.0

    @property
    def parts(self) -> int:
        return len(self.bounds)

    def part_path(self, part: int) -> Path:
        return self.folder / f"part-{part:04d}.faiss"

    def record_path(self, part: int) -> Path:
        return self.folder / f"part-{part:04d}.json"

    def order(self) -> np.ndarray:
        return np.load(self.folder / ORDER_FILE, mmap_mode="r")

    def done(self, part: int) -> dict[str, Any] | None:
        """The part's record when it is finished (its record, written last, matches its range), else None."""
        try:
            record = read_json(self.record_path(part), ValueError, "missing")
        except (ValueError, OSError):
            return None
        if (
            record.get("build_id") != self.build_id
            or tuple(record.get("bounds", ())) != self.bounds[part]
            or not self.part_path(part).is_file()
        ):
            return None
        return record

    def still_current(self) -> bool:
        """Whether the folder still holds this staging (a rerun with other inputs restages it)."""
        try:
            return read_json(self.folder / STAGING_JSON, ValueError, "missing").get("build_id") == self.build_id
        except (ValueError, OSError):
            return False


def stage(
    folder: Path, embeddings: EmbeddingSet, description: dict[str, Any], order: np.ndarray,
    bounds: list[tuple[int, int]], chunk_rows: int, train: Callable[[], faiss.Index],
) -> tuple[StagedBuild, bool]:  # fmt: skip
    """The staging folder for this build: reused when it describes the same build (``description``: what
    shapes the parts — the embeddings, the plan, the options the order and training depend on) with the
    same id order, else started afresh (``train()`` makes the trained, empty index). Also whether it was reused."""
    folder = Path(folder)
    order = np.asarray(order, dtype=np.int64)
    wanted = {"embeddings": str(embeddings.path.resolve()), "description": description, "bounds": bounds,
              "chunk_rows": chunk_rows}  # fmt: skip
    try:
        found = read_json(folder / STAGING_JSON, ValueError, "missing")
        reusable = (
            {name: found.get(name) for name in wanted} == json.loads(json.dumps(wanted))
            and (folder / TRAINED_FILE).is_file()
            and np.array_equal(np.load(folder / ORDER_FILE, mmap_mode="r"), order)
        )
    except (ValueError, OSError):
        reusable = False
    if reusable:
        return open_staged(folder), True
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    np.save(folder / ORDER_FILE, order)
    started = time.perf_counter()
    write_faiss_index(train(), folder / TRAINED_FILE)
    seconds = round(time.perf_counter() - started, 3)
    # last: the staging is usable
    write_json_atomic(folder / STAGING_JSON, {**wanted, "build_id": uuid.uuid4().hex, "train_seconds": seconds})
    return open_staged(folder), False


def open_staged(folder: Path | str) -> StagedBuild:
    """A staging folder written by `stage`, read back (what a fill task on another worker opens)."""
    folder = Path(folder)
    found = read_json(folder / STAGING_JSON, ValueError, f"{folder} holds no staged index build ({STAGING_JSON})")
    bounds = tuple(tuple(bound) for bound in found["bounds"])
    return StagedBuild(
        folder, Path(found["embeddings"]), bounds, int(found["chunk_rows"]),  # type: ignore[arg-type]
        str(found["build_id"]), float(found.get("train_seconds", 0.0)),
    )  # fmt: skip


def writer_name() -> str:
    """Who fills a part: ``host:pid``, and the Dask worker's name when a Dask worker runs it."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    try:
        from distributed import get_worker

        return f"{name} (dask worker {get_worker().name})"
    except (ImportError, ValueError):
        return name


def fill_part(folder: Path | str, part: int, advance: Callable[[int], None] = lambda rows: None) -> dict[str, Any]:
    """Fill part ``part`` of the staged build in ``folder`` (skipped when already done); its record.

    Reads only the trained index, the order and its own rows; writes its index, then its record. A fill
    killed half-way leaves at most a temp file: the part is not done, and its rerun starts it again.
    """
    staged = open_staged(folder)
    finished = staged.done(part)
    if finished is not None:
        advance(finished["bounds"][1] - finished["bounds"][0])
        return {**finished, "reused": True}
    started = time.perf_counter()
    start, stop = staged.bounds[part]
    index = faiss.read_index(str(staged.folder / TRAINED_FILE))
    embeddings = EmbeddingSet(staged.embeddings)
    rows = np.asarray(staged.order()[start:stop])
    for first, block in embeddings.ordered(rows, staged.chunk_rows, start):
        index.add_with_ids(block, np.arange(first, first + len(block), dtype=np.int64))
        advance(len(block))
    if not staged.still_current():  # restaged meanwhile (a rerun with other inputs): this part is stale
        raise StagingChangedError(f"{staged.folder} was staged afresh while part {part} was filled: not written")
    temp = temp_path_for(staged.part_path(part))
    try:
        write_faiss_index(index, temp)
        commit_file(temp, staged.part_path(part))
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    record = {"part": part, "bounds": [start, stop], "build_id": staged.build_id, "writer": writer_name(),
              "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    write_json_atomic(staged.record_path(part), record)
    return {**record, "reused": False}


class StagingChangedError(ValueError):
    """The staging folder was staged afresh (other inputs) while a part was being filled for the old one."""


class IndexWorkerError(OSError):
    """A local worker process filling parts failed; ``str(error)`` is one line with its reason."""


def fill_parts(staged: StagedBuild, workers: int = 1, advance: Callable[[int], None] = lambda rows: None) -> list:
    """Fill every unfinished part, in this process (``workers`` 1) or in ``workers`` local processes; the records.

    Worker ``w`` fills parts ``w, w + workers, ...`` (the split ``mocoplus embed --num-shards`` uses), so
    which process writes which part does not depend on timing. Processes are spawned, not forked (FAISS's
    OpenMP threads do not survive a fork). A worker that dies fails the build with a one-line error and
    the parts every worker finished kept: the rerun fills only the others.
    """
    if workers <= 1 or staged.parts <= 1:
        return [fill_part(staged.folder, part, advance) for part in range(staged.parts)]
    already = {part for part in range(staged.parts) if staged.done(part) is not None}
    context = get_context("spawn")
    processes = [
        context.Process(
            target=_fill_share, args=(str(staged.folder), list(range(w, staged.parts, workers)), os.getpid(), w)
        )
        for w in range(min(workers, staged.parts))
    ]
    for process in processes:
        process.start()
    counted: set[int] = set()
    try:
        while True:
            alive = [process for process in processes if process.is_alive()]
            for part in range(staged.parts):
                if part not in counted and staged.done(part) is not None:
                    counted.add(part)
                    advance(staged.bounds[part][1] - staged.bounds[part][0])
            if not alive:
                break
            alive[0].join(timeout=0.5)
    finally:
        for process in processes:  # an interrupt in the parent stops its workers too
            if process.is_alive():
                process.terminate()
            process.join()
    failed = [(w, process.exitcode) for w, process in enumerate(processes) if process.exitcode != 0]
    reasons = [_take_reason(staged.folder, w) for w in range(len(processes))]
    if failed:
        worker, code = failed[0]
        how = f"killed by signal {-code}" if code is not None and code < 0 else reasons[worker] or f"exit {code}"
        raise IndexWorkerError(
            f"index worker {worker} of {len(processes)} failed ({how}); {len(counted)} of {staged.parts} parts are "
            "done and kept in the staging folder: rerun the same command to fill the rest"
        )
    return [{**record, "reused": record["part"] in already} for record in part_records(staged)]


def _fill_share(folder: str, parts: list[int], parent: int, worker: int) -> None:
    """One worker process's share of the parts; it dies with the build that started it (``kill -9`` of the
    build must not leave workers filling parts behind the rerun's back). A failure is left, as one line, in
    ``worker-N.error`` for the build to report (a traceback from a child process would say less)."""
    _die_with_parent(parent)
    try:
        for part in parts:
            fill_part(folder, part)
    except Exception as error:
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        (Path(folder) / f"worker-{worker}.error").write_text(f"{type(error).__name__}: {text}"[:500])
        sys.exit(1)


def _take_reason(folder: Path, worker: int) -> str:
    """Worker ``worker``'s failure as it left it (and removed), or ``""``."""
    path = Path(folder) / f"worker-{worker}.error"
    try:
        return path.read_text()[:500]
    except OSError:
        return ""
    finally:
        path.unlink(missing_ok=True)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``); elsewhere, nothing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request: nobody will kill us
            os._exit(1)


def part_records(staged: StagedBuild) -> list[dict[str, Any]]:
    """Every part's record (all must be done)."""
    records = [staged.done(part) for part in range(staged.parts)]
    missing = [part for part, record in enumerate(records) if record is None]
    if missing:
        raise ValueError(f"{staged.folder}: parts {missing} are not filled yet")
    return records  # type: ignore[return-value]


def merge_mode(staged: StagedBuild, merge: str, memory_budget: int) -> str:
    """``memory`` or ``disk``: ``merge`` itself unless ``auto``, then disk when the parts exceed the budget."""
    if merge != "auto":
        return merge
    size = sum(staged.part_path(part).stat().st_size for part in range(staged.parts))
    return "memory" if size <= memory_budget else "disk"


@contextmanager
def c_stdout_silenced() -> Iterator[None]:
    """Drop what C code prints to stdout (file descriptor 1) while the block runs.

    C's stdout is block-buffered on a pipe, so it is flushed before file descriptor 1 is put back:
    otherwise the text would reach the pipe later, in the middle of the command's own output.
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def merge_parts(staged: StagedBuild, mode: str, count: int | None = None, ivfdata: Path | None = None) -> faiss.Index:
    """The first ``count`` parts (all by default) merged into one index, in memory or into ``ivfdata``."""
    paths = [staged.part_path(part) for part in range(staged.parts)][:count]
    merged = faiss.read_index(str(staged.folder / TRAINED_FILE))
    if mode == "disk":
        from faiss.contrib.ondisk import merge_ondisk

        with c_stdout_silenced():  # FAISS's on-disk lists printf "resizing ..." (it would corrupt --json)
            merge_ondisk(merged, [str(path) for path in paths], str(ivfdata or staged.folder / IVFDATA_FILE))
        merged.ntotal = faiss.extract_index_ivf(merged).ntotal
        return merged
    target = faiss.extract_index_ivf(merged)
    for path in paths:
        part = faiss.read_index(str(path))  # held: the extracted IVF part does not own its memory
        target.merge_from(faiss.extract_index_ivf(part), 0)
    merged.ntotal = target.ntotal  # an OPQ wrapper keeps its own count
    return merged
