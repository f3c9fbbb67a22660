"""Checkpoints of a run dir: atomic files, the last K kept, the best by kNN, pointers.

See docs/architecture.md, "The contracts".

``RUN/checkpoints/step-00001234.pt`` holds everything a resumed run needs
(model incl. key encoder and queue, optimizer, scheduler, grad scaler, RNG
states, step, epoch, the config). Each is written to a temp file and renamed,
then ``last.json`` is pointed at it; only then are older ones beyond
``keep_last`` deleted, so a crash at any moment leaves a loadable checkpoint.
``best.pt`` is a copy of the checkpoint with the best kNN top-1 so far, with
``best.json`` saying which and how good.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from artifacts.atomic import commit_file, temp_path_for, write_json_atomic
from artifacts.files import read_regular_file
from artifacts.run_folder import LAST_FILE, RunFolder, step_file_name
from mocoplus import MoCoPlus
from pipeline.train.run_config import config_from_dict


def checkpoint_dir(run_dir: Path) -> Path:
    return RunFolder(run_dir).checkpoints


def _save(state: dict[str, Any], path: Path) -> None:
    """``torch.save``, a failed write as `OSError`: on a full disk torch raises a RuntimeError that says only
    ``unexpected pos 704 vs 598``; the command line's one ``error:`` line should say what happened."""
    try:
        torch.save(state, path)
    except RuntimeError as error:
        free = shutil.disk_usage(path.parent).free
        reason = (str(error).strip().splitlines() or ["write failed"])[0]
        raise OSError(errno.EIO, f"cannot write {path} ({free:,} bytes free on its disk): {reason}") from None


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, *, keep_last: int) -> Path:
    """Write ``state`` as ``step-NNNNNNNN.pt`` atomically, point ``last.json`` at it, prune old ones."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / step_file_name(step)
    temp = temp_path_for(path)
    try:
        _save(state, temp)
        commit_file(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    write_json_atomic(folder / LAST_FILE, {"checkpoint": path.name, "step": step, "epoch": state.get("epoch")})
    for old in RunFolder(run_dir).step_files()[:-keep_last]:
        old.unlink()
    return path


def mark_best(run_dir: Path, path: Path, metrics: dict[str, Any]) -> None:
    """Keep a copy of ``path`` as ``best.pt`` (it survives pruning), with ``best.json`` describing it."""
    run = RunFolder(run_dir)
    temp = temp_path_for(run.best)
    try:
        shutil.copyfile(path, temp)
        commit_file(temp, run.best)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    write_json_atomic(run.best_info, {"checkpoint": path.name, **metrics})


def resolve_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """``last``, ``best``, ``auto`` (best if the run has one, else last) or a path → an existing checkpoint
    file, or a `FileNotFoundError` saying what is missing."""
    run = RunFolder(run_dir)
    if which == "auto":
        which = "best" if run.best.is_file() else "last"
    if which not in ("last", "best"):
        path = Path(which)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        return path
    if which == "best":
        if not run.best.is_file():
            raise FileNotFoundError(f"{run_dir} has no best checkpoint (the kNN monitor needs --eval shards)")
        return run.best
    try:
        pointer = json.loads(read_regular_file(run.last, 1 << 20))
        path = run.checkpoints / pointer["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        steps = run.step_files()
        if not steps:
            raise FileNotFoundError(f"{run_dir} has no checkpoints") from None
        path = steps[-1]
    if not path.is_file():
        raise FileNotFoundError(f"{path} (named by {LAST_FILE}) is missing")
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state dict, or a `ValueError` when the file is truncated, corrupt or not ours."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)  # tensors and plain data only
    except Exception as error:  # a damaged pickle can raise almost anything (KeyError, IndexError, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != "mocoplus.checkpoint" or "model" not in state:
        raise ValueError(f"{path}: not a mocoplus checkpoint")
    return state


def load_run(run_dir: Path, checkpoint: str = "auto") -> tuple[MoCoPlus, dict, Path]:
    """The model of a run's checkpoint (``auto``: best if the run has one, else last), its config and path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found")
    path = resolve_checkpoint(run_dir, checkpoint)
    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    model = MoCoPlus(config.model)
    model.load_state_dict(state["model"])
    return model.eval(), state, path
