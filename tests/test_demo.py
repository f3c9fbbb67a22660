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


@pytest.mark.slow
def test_demo_runs_the_whole_chain_within_its_budget(fashion_mnist_env, tmp_path):
    """As a user runs it: a fresh process on Prefect's ephemeral API (its own PREFECT_HOME)."""
    out = tmp_path / "demo"
    # the tiny network, with the preset's whitened embedding (fitted at export on all the training images)
    tiny = [*TINY, "model.embedding_whitening=pca"]
    overrides = [argument for override in tiny for argument in ("--set", override)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # the demo turns telemetry off itself
    # a 1-minute budget is below what the stages after training need: the plan falls back to one step
    command = [sys.executable, "-m", "flows.cli", "demo", "--out", str(out), "--minutes", "1", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "demo.json").read_text())
    assert report["planned_steps"] == 1 and report["calibration_images_per_s"] > 0
    assert 0 <= report["knn_top1"] <= 1 and report["recall_at_10"] >= 0.95
    assert report["search"]["query"].startswith("test") and len(report["search"]["neighbours"]) == 8
    assert all((out / name).exists() for name in ("shards/train", "shards/test", "run", "model", "corpus/index"))
    for text in ("kNN top-1", "recall@10", "search: test", "kNN-200", "P@10", "key encoder", "pixels", "hog"):
        assert text in result.stdout
    assert set(report["retrieval"]) == {"key encoder", "pixels", "pixels, whitened", "hog", "hog, whitened"}
    assert report["whitening"] == "pca" and "PCA-whitened" in result.stdout and "linear probe" not in result.stdout
    model = json.loads((out / "model" / "model.json").read_text())
    written = json.loads((out / "shards" / "train" / "manifest.json").read_text())["counts"]["written"]
    assert model["whitening"]["images"] == written and model["whitening"]["fitted_on"].endswith("shards/train")
    for stage in ("demo: 1/3 ingest", "demo: 2/3 calibration", "demo: 3/3 the end-to-end flow", "demo: done"):
        assert stage in result.stderr
    assert "expect a weak model, or give more --minutes" in result.stderr  # 1 minute leaves no training time
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


def test_demo_refuses_a_budget_below_one_minute():
    result = CliRunner().invoke(app, ["demo", "--minutes", "0.5"])
    assert result.exit_code == 1 and "--minutes" in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


def test_the_reserve_after_training_grows_on_a_slower_machine_never_shrinks():
    from flows.demo import REFERENCE_IMAGES_PER_S, RESERVE_SECONDS, reserve_seconds

    assert reserve_seconds(REFERENCE_IMAGES_PER_S) == RESERVE_SECONDS
    assert reserve_seconds(REFERENCE_IMAGES_PER_S / 2) == 2 * RESERVE_SECONDS
    assert reserve_seconds(REFERENCE_IMAGES_PER_S * 3) == RESERVE_SECONDS
