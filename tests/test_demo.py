"""`mocoplus demo`: the end-to-end flow on a real Fashion-MNIST slice, through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import TINY
from typer.testing import CliRunner

from flows.cli.main import app


def run_demo_command(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, Path]:
    """As a user runs it: a fresh process on Prefect's ephemeral API (its own PREFECT_HOME), the tiny network
    with the preset's whitened embedding (fitted at export on all the training images), reduced to 16-d."""
    out = tmp_path / "demo"
    tiny = [*TINY, "model.embedding_whitening=pca", "model.embedding_dims=16"]
    overrides = [argument for override in tiny for argument in ("--set", override)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # the demo turns telemetry off itself
    command = [sys.executable, "-m", "flows.cli", "demo", "--out", str(out), *options, *overrides]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1]), out


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_evaluates_the_served_vectors(fashion_mnist_env, tmp_path):
    # --steps: a look at the mechanics (the tiny network cannot beat pixels: the gate refuses, --no-gate publishes)
    result, out = run_demo_command(tmp_path, "--steps", "2", "--no-gate")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "demo.json").read_text())
    assert report["planned_steps"] == 2 and report["calibration_images_per_s"] > 0 and report["dim"] == 16
    assert 0 <= report["knn_top1"] <= 1 and report["recall_at_10"] >= 0.95
    assert report["gate"]["passed"] is False and "does not beat raw pixels" in report["gate"]["reasons"][0]
    assert report["search"]["query"].startswith("test") and len(report["search"]["neighbours"]) == 8
    for name in ("shards/train", "shards/test", "run", "model/current", "corpus/index"):
        assert (out / name).exists()
    for text in ("kNN top-1", "recall@10", "search: test", "kNN-200", "P@10", "model (16-d)", "pixels", "hog",
                 "quality gate", "refused", "seconds per stage"):  # fmt: skip
        assert text in result.stdout
    assert set(report["retrieval"]) == {"model", "pixels", "pixels, whitened to 16-d", "hog", "hog, whitened to 16-d"}
    assert set(report["stage_seconds"]) >= {"ingest", "calibration", "train", "export", "embed", "evaluate", "search"}
    model = json.loads((out / "model" / "current" / "model.json").read_text())
    written = json.loads((out / "shards" / "train" / "manifest.json").read_text())["counts"]["written"]
    assert model["whitening"]["images"] == written and model["whitening"]["dims"] == 16
    # one pass: the index holds the vectors the evaluation scored (the memory set was embedded once)
    index = json.loads((out / "corpus" / "index" / "current" / "index.json").read_text())
    assert index["embeddings"]["path"].startswith(str((out / "cache" / "embeddings").resolve()))
    for stage in ("demo: 1/3 ingest", "demo: 2/3 calibration", "demo: 3/3 the end-to-end flow", "demo: done"):
        assert stage in result.stderr
    assert "--steps 2: a look at the chain, not a trained model" in result.stderr
    assert not (out / "run" / "checkpoints" / "best.pt").exists()  # no kNN monitor: the evaluation measures kNN
    assert "telemetry" not in result.stderr.lower()
    pictures = report["pictures"]
    assert pictures == {
        "search grid": str(out / "search-grid.png"),
        "training curves": str(out / "run" / "curves.png"),
        "embedding map": str(out / "corpus" / "map.png"),
    }
    for name, path in pictures.items():
        assert f"{name}: {path}" in result.stdout and Path(path).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_machine_too_slow_for_the_budget_is_told_which_minutes_it_needs_before_training(fashion_mnist_env, tmp_path):
    result, out = run_demo_command(tmp_path, "--minutes", "1")
    assert result.returncode == 1 and "demo: 3/3" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: this machine trains at") and "run mocoplus demo --minutes " in last
    assert not (out / "run").exists() and not (out / "model").exists()  # nothing was trained or published


def test_demo_refuses_a_budget_below_one_minute():
    result = CliRunner().invoke(app, ["demo", "--minutes", "0.5"])
    assert result.exit_code == 1 and "--minutes" in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


def test_the_reserve_after_training_grows_on_a_slower_machine_never_shrinks():
    from flows.demo import REFERENCE_IMAGES_PER_S, RESERVE_SECONDS, reserve_seconds

    assert reserve_seconds(REFERENCE_IMAGES_PER_S) == RESERVE_SECONDS
    assert reserve_seconds(REFERENCE_IMAGES_PER_S / 2) == 2 * RESERVE_SECONDS
    assert reserve_seconds(REFERENCE_IMAGES_PER_S * 3) == RESERVE_SECONDS
