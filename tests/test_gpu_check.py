"""`benchmarks/gpu_check.sh` without a GPU: one JSON summary, quickly, every step skipped or unverifiable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
STEPS = [
    "probe",
    "pytest-gpu",
    "data",
    "train-bf16",
    "throughput",
    "export-parity",
    "embed-cuda",
    "faiss-gpu",
    "serve-cuda",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would really run (minutes)")
def test_the_dry_run_prints_one_json_summary_with_every_step_skipped_or_unverifiable(tmp_path):
    environment = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=180,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # the whole of stdout is the one JSON object
    assert list(summary["steps"]) == STEPS
    assert {step["status"] for step in summary["steps"].values()} <= {"skipped", "unverifiable"}
    assert all(step["reason"] for step in summary["steps"].values())
    assert summary["environment"]["cuda"] is False and "torch" in summary["environment"]
    assert summary["prepare"]["status"] == "skipped" and summary["seconds"] < 120


def test_a_step_that_needs_a_missing_package_is_unverifiable_not_failed(tmp_path):
    """With a GPU on record but no faiss-gpu or CUDA provider here, those steps say so and why."""
    (tmp_path / "probe.json").write_text(
        json.dumps({"cuda": True, "ort_cuda": False, "ort_reason": "no CUDA provider", "faiss_gpu": False})
    )
    for step, reason in (("faiss-gpu", "faiss-gpu"), ("embed-cuda", "CUDA provider"), ("serve-cuda", "")):
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "gpu_steps.py"), step, "--work", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        answer = json.loads(result.stdout.splitlines()[-1])
        assert answer["status"] == "unverifiable" and reason in answer["reason"], answer
