"""Checkpoints: saved, pruned, resolved, and refused in one line when truncated, random, foreign or hostile."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from pipeline.train.checkpoints import (
    checkpoint_dir,
    load_checkpoint,
    mark_best,
    resolve_checkpoint,
    save_checkpoint,
)
from pipeline.train.run_config import RunConfig

# --- checkpoints -----------------------------------------------------------------------------------------------------


def checkpoint_state(step: int, epoch: int = 0) -> dict:
    return {
        "format": "mocoplus.checkpoint",
        "model": {"weight": torch.full((2, 3), float(step))},
        "step": step,
        "epoch": epoch,
        "config": RunConfig().to_dict(),
    }


def step_files(run: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir(run).iterdir() if p.name.startswith("step-"))


def test_save_keeps_the_newest_and_points_last_at_it(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30, 40, 50):
        path = save_checkpoint(run, checkpoint_state(step, epoch=step // 10), step, keep_last=2)
        assert path == checkpoint_dir(run) / f"step-{step:08d}.pt"
    assert step_files(run) == ["step-00000040.pt", "step-00000050.pt"]
    pointer = json.loads((checkpoint_dir(run) / "last.json").read_text())
    assert pointer == {"checkpoint": "step-00000050.pt", "step": 50, "epoch": 5}
    last = resolve_checkpoint(run, "last")
    assert last == checkpoint_dir(run) / "step-00000050.pt"
    state = load_checkpoint(last)
    assert state["step"] == 50 and torch.equal(state["model"]["weight"], torch.full((2, 3), 50.0))
    assert state["config"] == RunConfig().to_dict()
    assert not [p.name for p in checkpoint_dir(run).iterdir() if p.name.endswith(".tmp")]


def test_step_files_of_any_magnitude_prune_by_number(tmp_path):
    run = tmp_path / "run"
    for step in (9, 99, 100, 1000, 12345):
        save_checkpoint(run, checkpoint_state(step), step, keep_last=3)
    assert step_files(run) == ["step-00000100.pt", "step-00001000.pt", "step-00012345.pt"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, checkpoint_state(5), 5, keep_last=3)
    save_checkpoint(run, {**checkpoint_state(5), "epoch": 9}, 5, keep_last=3)
    assert step_files(run) == ["step-00000005.pt"]
    assert load_checkpoint(resolve_checkpoint(run))["epoch"] == 9


def test_best_survives_pruning(tmp_path):
    run = tmp_path / "run"
    first = save_checkpoint(run, checkpoint_state(1), 1, keep_last=1)
    mark_best(run, first, {"step": 1, "knn_top1": 0.42})
    for step in (2, 3, 4):
        save_checkpoint(run, checkpoint_state(step), step, keep_last=1)
    assert step_files(run) == ["step-00000004.pt"]
    assert not first.exists()
    best = resolve_checkpoint(run, "best")
    assert best == checkpoint_dir(run) / "best.pt"
    assert load_checkpoint(best)["step"] == 1
    assert json.loads((checkpoint_dir(run) / "best.json").read_text()) == {
        "checkpoint": "step-00000001.pt",
        "step": 1,
        "knn_top1": 0.42,
    }
    # a better one replaces it
    mark_best(run, checkpoint_dir(run) / "step-00000004.pt", {"step": 4, "knn_top1": 0.5})
    assert load_checkpoint(resolve_checkpoint(run, "best"))["step"] == 4
    assert not [p.name for p in checkpoint_dir(run).iterdir() if p.name.endswith(".tmp")]


def test_resolve_an_explicit_path(tmp_path):
    run = tmp_path / "run"
    path = save_checkpoint(run, checkpoint_state(3), 3, keep_last=2)
    assert resolve_checkpoint(run, str(path)) == path
    assert resolve_checkpoint(tmp_path / "elsewhere", str(path)) == path
    with pytest.raises(FileNotFoundError, match=re.escape("nope.pt")):
        resolve_checkpoint(run, str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(run, str(checkpoint_dir(run)))  # a folder is not a checkpoint


def test_no_checkpoints_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        resolve_checkpoint(tmp_path / "never-made", "last")
    checkpoint_dir(tmp_path / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        resolve_checkpoint(tmp_path / "empty", "last")


def test_missing_best_mentions_eval(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, checkpoint_state(1), 1, keep_last=2)
    with pytest.raises(FileNotFoundError, match="--eval"):
        resolve_checkpoint(run, "best")
    with pytest.raises(FileNotFoundError, match="--eval"):
        resolve_checkpoint(tmp_path / "never-made", "best")


def test_last_json_naming_a_deleted_file_is_file_not_found(tmp_path):
    run = tmp_path / "run"
    path = save_checkpoint(run, checkpoint_state(1), 1, keep_last=2)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("last.json")):
        resolve_checkpoint(run, "last")


@pytest.mark.parametrize("pointer", [None, "", "{not json", '{"step": 2}', "[1, 2]", '{"checkpoint": null}'])
def test_without_a_usable_last_json_the_newest_step_file_wins_not_a_temp_file(tmp_path, pointer):
    run = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run, checkpoint_state(step), step, keep_last=5)
    folder = checkpoint_dir(run)
    # what an interrupted save of a later step leaves behind: a hidden temp file, half written
    (folder / ".step-00000009.pt.abc123.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    (folder / "step-00000007.pt.partial").write_bytes(b"junk")  # not a step file either
    (folder / "last.json").unlink()
    if pointer is not None:
        (folder / "last.json").write_text(pointer)
    newest = resolve_checkpoint(run, "last")
    assert newest == folder / "step-00000002.pt"
    assert load_checkpoint(newest)["step"] == 2


def test_pruning_ignores_temp_files_and_other_files(tmp_path):
    run = tmp_path / "run"
    folder = checkpoint_dir(run)
    folder.mkdir(parents=True)
    (folder / ".step-00000001.pt.xyz.tmp").write_bytes(b"")
    (folder / "notes.txt").write_text("keep me")
    for step in (1, 2, 3):
        save_checkpoint(run, checkpoint_state(step), step, keep_last=1)
    assert step_files(run) == ["step-00000003.pt"]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_load_checkpoint_round_trips_a_checkpoint(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(checkpoint_state(4, epoch=2), path)
    state = load_checkpoint(path)
    assert state["step"] == 4 and state["epoch"] == 2
    assert state["model"]["weight"].device.type == "cpu"


def test_load_checkpoint_refuses_a_truncated_file(tmp_path):
    run = tmp_path / "run"
    path = save_checkpoint(run, checkpoint_state(1), 1, keep_last=2)
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 30):
        broken = tmp_path / f"cut-{cut}.pt"
        broken.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut-.*not a readable checkpoint"):
            load_checkpoint(broken)


def noise_bytes(seed: int, size: int = 4096) -> bytes:
    return bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed)).tolist())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("seed", [0, 1, 2, 4, 5, 6, 7, 8])
def test_load_checkpoint_refuses_random_bytes(tmp_path, seed):
    path = tmp_path / "noise.pt"
    path.write_bytes(noise_bytes(seed))
    with pytest.raises(ValueError, match=re.escape("noise.pt")):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x80\x02h\x05.", id="memo-miss-KeyError"),
        pytest.param(b"\x80\x02.", id="empty-stack-IndexError"),
        pytest.param(noise_bytes(3), id="noise-seed3-KeyError"),
        pytest.param(noise_bytes(12), id="noise-seed12-IndexError"),
    ],
)
def test_load_checkpoint_refuses_corrupt_pickles_with_a_value_error(tmp_path, data):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape("corrupt.pt")):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param({"x": 1}, id="foreign-dict"),
        pytest.param({"format": "other", "model": {}}, id="other-format"),
        pytest.param({"format": "mocoplus.checkpoint"}, id="no-model"),
        pytest.param(torch.zeros(3), id="tensor"),
        pytest.param([1, 2, 3], id="list"),
        pytest.param(None, id="none"),
    ],
)
def test_load_checkpoint_refuses_a_torch_file_that_is_not_ours(tmp_path, content):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a mocoplus checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_refuses_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=re.escape("missing.pt")):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """Unpickled without restriction, this creates the folder ``marker``: code run by loading a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_the_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.is_dir()  # so the refusals below are meaningful


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_load_checkpoint_refuses_to_run_code_in_a_pickle(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"format": "mocoplus.checkpoint", "model": _Payload(marker)}, protocol=2))
    else:
        torch.save({"format": "mocoplus.checkpoint", "model": {"weight": _Payload(marker)}}, path)
    with pytest.raises(ValueError, match=re.escape("evil.pt")):
        load_checkpoint(path)
    assert not marker.exists()
