"""Sharded index builds as tasks: parts filled by worker processes, a killed worker redone alone, one build's result."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from artifacts.embedding_set import EmbeddingSet, write_embedding_set
from artifacts.id_map import ID_MAP_FILES
from pipeline.index.build import build_index, stage_index_build
from pipeline.index.config import IndexConfig
from pipeline.index.plan import TRAIN_SAMPLE_BYTES, plan_index
from pipeline.index.shards import StagingChangedError, fill_part, fill_parts, open_staged, staging_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = IndexConfig(kind="ivf", queries=200, num_shards=4, chunk_rows=400)

# Fills one part in this process and SIGKILLs itself after its first chunk was added: a worker dying mid-fill.
DIE_MID_FILL = """
import os, signal, sys
from artifacts.embedding_set import EmbeddingSet
real = EmbeddingSet.ordered
def dying(self, *args, **kwargs):
    for count, item in enumerate(real(self, *args, **kwargs)):
        if count == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield item
EmbeddingSet.ordered = dying
from pipeline.index.shards import fill_part
fill_part(sys.argv[1], int(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(24, 16))
    vectors = centres[rng.integers(0, 24, size=6000)] + 0.3 * rng.normal(size=(6000, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return write_embedding_set(tmp_path_factory.mktemp("emb"), vectors.astype(np.float32), bundle_hash="h", parts=3)


def same_bundle(first: Path, second: Path) -> None:
    for name in ("index.faiss", *ID_MAP_FILES):
        assert (first / "current" / name).read_bytes() == (second / "current" / name).read_bytes(), name


def test_two_worker_processes_fill_the_parts_and_the_merge_equals_one_process(embeddings, tmp_path):
    one = build_index(embeddings, tmp_path / "one", CONFIG, progress=False).info
    two = build_index(embeddings, tmp_path / "two", CONFIG, progress=False, workers=2).info
    assert [part["rows"] for part in two["build"]["parts"]] == [1450, 1450, 1450, 1450, 200]  # 4 + the held-out
    assert two["build"]["parts_kept"] == 0
    assert {part["writer"] for part in one["build"]["parts"]} == {f"{socket.gethostname()}:{os.getpid()}"}
    writers = [part["writer"] for part in two["build"]["parts"]]
    assert writers[0] == writers[2] == writers[4] != writers[1] == writers[3]  # worker w: parts w, w + 2, ...
    assert str(os.getpid()) not in {writer.split(":")[1] for writer in writers}
    assert two["count"] == one["count"] == 6000 and two["recall_at_k"] == one["recall_at_k"] | {
        "qps": two["recall_at_k"]["qps"],
        "exact_qps": two["recall_at_k"]["exact_qps"],
    }
    same_bundle(tmp_path / "one", tmp_path / "two")
    assert not staging_dir(tmp_path / "two").exists() and not list(tmp_path.glob(".*"))


def test_a_worker_killed_mid_fill_is_redone_alone_and_finished_parts_are_untouched(embeddings, tmp_path):
    out = tmp_path / "index"
    staged = stage_index_build(embeddings, out, CONFIG)
    assert staged is not None and staged.folder == staging_dir(out) and staged.parts == 5
    first = fill_part(staged.folder, 0)
    kept = staged.part_path(0).stat()
    died = subprocess.run([sys.executable, "-c", DIE_MID_FILL, str(staged.folder), "1"], cwd=ROOT, timeout=300)
    assert died.returncode == -signal.SIGKILL
    assert staged.done(1) is None and not staged.record_path(1).exists()

    records = fill_parts(staged, workers=2)
    assert [record["reused"] for record in records] == [True, False, False, False, False]
    assert records[0]["writer"] == first["writer"] and records[1]["writer"] != first["writer"]
    again = staged.part_path(0).stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # part 0 was not rewritten

    info = build_index(embeddings, out, CONFIG, progress=False).info
    assert [part["writer"] for part in info["build"]["parts"]] == [record["writer"] for record in records]
    assert info["build"]["train_reused"] and info["build"]["parts_kept"] == 5  # the quantizer and parts were kept
    assert not staged.folder.exists()
    build_index(embeddings, tmp_path / "clean", CONFIG, progress=False)
    same_bundle(out, tmp_path / "clean")


def test_other_options_start_the_staging_afresh(embeddings, tmp_path):
    out = tmp_path / "index"
    staged = stage_index_build(embeddings, out, CONFIG)
    fill_part(staged.folder, 0)
    other = stage_index_build(embeddings, out, IndexConfig(**{**CONFIG.__dict__, "num_shards": 2}))
    assert other.parts == 3 and other.done(0) is None  # the 4-shard part 0 is not a 2-shard one
    with pytest.raises(ValueError, match="only a sharded build"):
        stage_index_build(embeddings, out, IndexConfig(kind="ivf"))


def test_a_dead_worker_fails_the_build_in_one_line_and_the_rerun_finishes(embeddings, tmp_path):
    out, config = tmp_path / "index", IndexConfig(kind="ivf", queries=200, num_shards=4)  # the command's defaults
    staged = stage_index_build(embeddings, out, config)
    staged.part_path(1).mkdir()  # worker 1 cannot write its first part: it dies, worker 0 finishes its share
    command = [sys.executable, "-m", "flows.cli", "index", str(embeddings), "--out", str(out), "--kind", "ivf",
               "--queries", "200", "--num-shards", "4", "--workers", "2"]  # fmt: skip
    failed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr  # one line, no traceback
    assert re.fullmatch(
        r"error: index worker 1 of 2 failed \(IsADirectoryError: .*part-0001\.faiss.*\); 3 of 5 parts are done "
        r"and kept in the staging folder: rerun the same command to fill the rest\n",
        failed.stderr,
    )
    assert not out.exists() and not list(staged.folder.glob("worker-*.error"))
    staged.part_path(1).rmdir()
    assert [record["reused"] for record in fill_parts(staged, workers=2)] == [True, False, True, False, True]
    assert build_index(embeddings, out, config, progress=False, workers=2).info["count"] == 6000


def test_a_part_filled_for_an_older_staging_is_never_written_into_a_newer_one(embeddings, tmp_path, monkeypatch):
    out = tmp_path / "index"
    staged = stage_index_build(embeddings, out, CONFIG)
    real = EmbeddingSet.ordered

    def restaged_meanwhile(self, *args, **kwargs):  # another run restages with other inputs during this fill
        monkeypatch.setattr(EmbeddingSet, "ordered", real)
        stage_index_build(embeddings, out, IndexConfig(**{**CONFIG.__dict__, "seed": 1}))
        yield from real(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingSet, "ordered", restaged_meanwhile)
    with pytest.raises(StagingChangedError, match="staged afresh while part 0 was filled"):
        fill_part(staged.folder, 0)
    assert not staged.part_path(0).exists() and open_staged(staged.folder).build_id != staged.build_id


# A build process (this script) whose worker asked to die with it; the test SIGKILLs the build.
PARENT_OF_A_WORKER = """
import subprocess, sys, os, time
worker = subprocess.Popen(
    [sys.executable, "-c", "import sys, time; from pipeline.index.shards import _die_with_parent; "
     "_die_with_parent(int(sys.argv[1])); print('armed', flush=True); time.sleep(300)", str(os.getpid())],
    stdout=subprocess.PIPE, text=True,
)
worker.stdout.readline()
print(worker.pid, flush=True)
time.sleep(300)
"""


def test_a_worker_dies_with_a_build_killed_by_sigkill():
    import psutil

    build = subprocess.Popen([sys.executable, "-c", PARENT_OF_A_WORKER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker = psutil.Process(int(build.stdout.readline()))
    build.kill()
    build.wait()
    with contextlib.suppress(psutil.NoSuchProcess):
        worker.wait(timeout=60)  # gone: no orphan keeps filling parts behind a rerun
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("dim", [128, 256, 2048, 16384])
def test_the_training_sample_is_capped_in_bytes_whatever_the_dimension(dim):
    plan = plan_index(10_000_000, dim, kind="ivfpq")
    assert plan.train_size * 4 * dim <= TRAIN_SAMPLE_BYTES
    assert plan.train_size >= 39 * plan.nlist  # and k-means still gets 39 vectors per list
