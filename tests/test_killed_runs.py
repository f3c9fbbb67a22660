"""`kill -9` and reruns: the same command finishes the work, gives the uninterrupted result, leaves nothing hidden.

A killed process cannot clean up after itself, so each stage removes the
leftovers of its own killed builds when it starts again: temp files and
folders carry their writer's host and pid in their name, and only those whose
writer is gone are removed (`artifacts.atomic.sweep_stale_temps`).
Finished outputs rerun with the same inputs are "up to date".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import TINY, losses

from artifacts.atomic import building_dir, reusable_output, sweep_stale_temps, temp_path_for
from artifacts.embedding_set import write_embedding_set
from artifacts.id_map import ID_MAP_FILES

ROOT = Path(__file__).resolve().parents[1]

# Runs a CLI command in this process, but SIGKILLs itself right after the Nth call of MODULE.FUNCTION returns
# (the way a killed job dies: no clean-up, no finally blocks).
KILL_AFTER = """
import os, signal, sys, importlib
module_name, function_name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
real, calls = getattr(module, function_name), []
def dying(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(module, function_name, dying)
from flows.cli.main import app
app(sys.argv[4:])
"""


def mocoplus(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def killed(module: str, function: str, nth: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", KILL_AFTER, module, function, str(nth), *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return done


def hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_sweep_removes_only_what_dead_writers_of_this_host_left(tmp_path):
    host = socket.gethostname()
    mine = temp_path_for(tmp_path / "a.json")  # this (live) process's temp file: kept
    stale_file = tmp_path / f".b.json.~{host}~{dead_pid()}~x1.tmp"
    stale_dir = tmp_path / f".model.~{host}~{dead_pid()}~x2"
    elsewhere = tmp_path / f".c.json.~another-host~{dead_pid()}~x3.tmp"  # a shared folder: another host's work
    stale_dir.mkdir()
    (stale_dir / "index.faiss").write_bytes(b"half")
    for path in (stale_file, elsewhere):
        path.write_text("x")
    (tmp_path / ".not-ours").write_text("a user's hidden file")
    assert sweep_stale_temps(tmp_path, "model") == [stale_dir]  # a name filter: only that bundle's builds
    assert sorted(p.name for p in sweep_stale_temps(tmp_path)) == [stale_file.name]
    assert sorted(hidden(tmp_path)) == sorted([mine.name, elsewhere.name, ".not-ours"])


def test_a_build_folder_names_its_writer_and_a_rerun_output_is_reusable_or_refused(tmp_path):
    with building_dir(tmp_path / "bundle") as work:
        assert f"~{socket.gethostname()}~{os.getpid()}~" in work.name
        (work / "info.json").write_text(json.dumps({"inputs": {"sha": "1", "options": {"k": 10}}}))
    assert reusable_output(tmp_path / "bundle", "info.json", {"sha": "1", "options": {"k": 10}}) is not None
    assert reusable_output(tmp_path / "fresh", "info.json", {"sha": "1"}) is None
    with pytest.raises(FileExistsError, match="not an empty folder, nor this output built from the same input"):
        reusable_output(tmp_path / "bundle", "info.json", {"sha": "2", "options": {"k": 10}})


def test_killed_index_build_reruns_to_the_uninterrupted_bundle_and_leaves_nothing_hidden(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(4000, 16)).astype(np.float32)
    emb = write_embedding_set(tmp_path / "emb", vectors, bundle_hash="h", parts=2)
    out = tmp_path / "indexes" / "flat"
    killed("faiss", "write_index", 1, "index", str(emb), "--out", str(out), "--kind", "flat")
    assert not out.exists() and len(hidden(out.parent)) == 1  # the killed build's folder, as kill -9 leaves it

    rerun = mocoplus("index", str(emb), "--out", str(out), "--kind", "flat")
    assert rerun.returncode == 0, rerun.stderr
    assert hidden(out.parent) == []
    clean = tmp_path / "indexes" / "clean"
    assert mocoplus("index", str(emb), "--out", str(clean), "--kind", "flat").returncode == 0
    for name in ("index.faiss", *ID_MAP_FILES):
        assert (out / "current" / name).read_bytes() == (clean / "current" / name).read_bytes(), name

    again = mocoplus("index", str(emb), "--out", str(out), "--kind", "flat")
    assert again.returncode == 0 and "already up to date" in again.stdout
    other = mocoplus("index", str(emb), "--out", str(out), "--kind", "flat", "--k", "5")
    assert other.returncode == 1 and other.stderr.startswith("error: ") and other.stderr.count("\n") == 1


@pytest.mark.slow
def test_killed_export_reruns_and_a_second_rerun_is_up_to_date(trained_run, tmp_path):
    out = tmp_path / "models" / "m"
    killed("pipeline.export.export", "_write_models", 1, "export", str(trained_run), "--out", str(out))
    assert not out.exists() and len(hidden(out.parent)) == 1
    first = mocoplus("export", str(trained_run), "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert hidden(out.parent) == []
    model_json = (out / "model.json").read_text()
    again = mocoplus("export", str(trained_run), "--out", str(out))
    assert again.returncode == 0 and "already up to date" in again.stdout
    assert (out / "model.json").read_text() == model_json  # nothing rewritten


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_curve_without_leftovers(fashion_shards, tmp_path):
    overrides = [arg for item in [*TINY, "train.max_steps=12", "train.checkpoint_every=4"] for arg in ("--set", item)]
    common = ["--data", str(fashion_shards), "--config", "fashion-mnist-cpu", *overrides, "--no-progress"]
    run = tmp_path / "run"
    # dies after the second checkpoint's temp file is written, before it is renamed into place
    killed("torch", "save", 2, "train", "--out", str(run), *common)
    assert any(name.startswith(".step-") for name in hidden(run / "checkpoints"))
    resumed = mocoplus("train", "--out", str(run), "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert [name for name in hidden(run / "checkpoints") if name.endswith(".tmp")] == []
    assert [name for name in hidden(run) if name.endswith(".tmp")] == []
    clean = tmp_path / "clean"
    assert mocoplus("train", "--out", str(clean), *common).returncode == 0
    np.testing.assert_allclose(losses(run), losses(clean), atol=1e-4)


def test_killed_ingest_resumes_to_the_same_bytes_without_leftovers(fashion_mnist_env, tmp_path):
    out, clean = tmp_path / "shards", tmp_path / "clean"
    env = {**os.environ}
    args = ("fashion-mnist:train", "--shard-size", "100", "--workers", "1", "--no-progress")
    # dies right after the second shard is committed (renamed), before the resume state is saved
    done = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, "pipeline.data.ingest", "commit_file", "2", "ingest", args[0],
         "--out", str(out), *args[1:]],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    assert mocoplus("ingest", args[0], "--out", str(out), *args[1:], env=env).returncode == 0
    assert mocoplus("ingest", args[0], "--out", str(clean), *args[1:], env=env).returncode == 0
    shards = sorted(path.name for path in clean.glob("*.tar"))
    assert len(shards) == 6 and sorted(path.name for path in out.glob("*.tar")) == shards
    assert all((out / name).read_bytes() == (clean / name).read_bytes() for name in shards)
    assert [name for name in hidden(out) if name != ".ingest.lock"] == []
