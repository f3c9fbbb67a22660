"""The run folder contract: the names every reader and writer of a training run uses, torch-free."""

from __future__ import annotations

import json

import pytest

from artifacts.run_folder import RunFolder, step_file_name


def test_step_files_are_the_kept_checkpoints_oldest_first_and_nothing_else(tmp_path):
    run = RunFolder(tmp_path)
    assert run.step_files() == [] and not run.has_checkpoints()  # no checkpoints folder at all
    run.checkpoints.mkdir()
    for name in (step_file_name(120), step_file_name(9), f".{step_file_name(130)}.~host~1~x.tmp", "step-1.pt", "notes"):
        (run.checkpoints / name).write_bytes(b"x")
    assert [path.name for path in run.step_files()] == ["step-00000009.pt", "step-00000120.pt"]
    assert run.has_checkpoints()


def test_a_best_checkpoint_alone_is_a_run_to_resume(tmp_path):
    run = RunFolder(tmp_path)
    run.checkpoints.mkdir()
    run.best.write_bytes(b"x")
    assert run.has_checkpoints() and run.best.name == "best.pt" and run.best_info.name == "best.json"


def test_metric_records_skip_a_line_cut_by_a_kill_and_lines_without_a_step(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no metrics\.jsonl: not a training run"):
        list(run.metric_records())
    lines = [{"step": 1, "loss": 2.0}, [1, 2], {"epoch": 0}, {"step": 2, "knn_top1": 0.5}]
    run.metrics.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 3, "lo')
    assert list(run.metric_records()) == [lines[0], lines[3]]
    assert run.config.name == "config.json" and run.curves.name == "curves.png"
