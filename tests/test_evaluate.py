"""`mocoplus evaluate`: kNN and linear-probe scores of a run's two encoders."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import tiny_config
from typer.testing import CliRunner

from flows.cli.main import app
from pipeline.evaluate.evaluate import evaluate, linear_probe
from pipeline.train.trainer import train


@pytest.fixture(scope="module")
def tiny_run(fashion_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    train(tiny_config(fashion_shards, "train.max_steps=4"), run, progress=False)
    return run


def test_linear_probe_separates_separable_classes_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 3
    labels = torch.arange(400) % 4
    features = centres[labels] + 0.3 * torch.randn(400, 16, generator=generator)
    assert linear_probe(features[:300], labels[:300], features[300:], labels[300:]) == 1.0
    noise = torch.randn(400, 16, generator=generator)
    assert linear_probe(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.5  # chance is 0.25


def test_evaluate_scores_both_encoders(tiny_run, fashion_shards, fashion_test_shards):
    result = evaluate(tiny_run, str(fashion_shards), str(fashion_test_shards), workers=0)
    assert set(result.encoders) == {"query", "key"}
    assert (result.train_samples, result.eval_samples, result.step) == (600, 200, 4)
    for scores in result.encoders.values():
        assert 0.2 < scores.knn_top1 <= 1.0 and 0.2 < scores.linear_top1 <= 1.0  # ten classes: chance is 0.1
    assert (result.whitening, result.baselines) == ("none", {})  # the run's model.embedding_whitening


def test_evaluate_scores_a_grid_pooled_whitened_embedding_and_the_baselines_both_ways_on_the_same_split(
    tiny_run, fashion_shards, fashion_test_shards
):
    shards = (str(fashion_shards), str(fashion_test_shards))
    baselines = ("pixels", "hog")
    result = evaluate(
        tiny_run, *shards, workers=0, grid=2, baselines=baselines, whiten=True, linear=False, encoders=("key",)
    )
    assert result.whitening == "pca" and set(result.encoders) == {"key"}
    assert set(result.baselines) == {"pixels", "pixels, whitened", "hog", "hog, whitened"}
    for scores in (*(s.retrieval for s in result.encoders.values()), *result.baselines.values()):
        assert all(0.1 < value <= 1.0 for value in scores.as_dict().values())  # ten classes: chance is 0.1
    assert result.baselines["hog"].nn1 > 0.5  # HOG on real garments is far above chance
    assert all(scores.linear_top1 is None for scores in result.encoders.values())
    plain = evaluate(
        tiny_run, *shards, workers=0, grid=2, baselines=("pixels",), whiten=False, linear=False, encoders=("key",)
    )
    assert plain.baselines["pixels"] == result.baselines["pixels"]  # the plain rows do not change
    assert plain.encoders["key"].retrieval != result.encoders["key"].retrieval  # whitening changes the encoder's
    with pytest.raises(ValueError, match="encoders must be distinct"):
        evaluate(tiny_run, *shards, workers=0, encoders=("key", "key"))
    with pytest.raises(ValueError, match="unknown baseline sift"):
        evaluate(tiny_run, str(fashion_shards), str(fashion_test_shards), workers=0, baselines=("sift",))


def test_cli_prints_one_json_object(tiny_run, fashion_shards, fashion_test_shards):
    args = ["evaluate", str(tiny_run), "--data", str(fashion_shards), "--eval", str(fashion_test_shards)]
    result = CliRunner().invoke(app, [*args, "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["encoders"]) == {"query", "key"} and "knn_top1" in data["encoders"]["key"]


def test_cli_table_says_the_encoders_are_whitened_and_shows_both_baseline_rows(
    tiny_run, fashion_shards, fashion_test_shards
):
    args = ["evaluate", str(tiny_run), "--data", str(fashion_shards), "--eval", str(fashion_test_shards)]
    options = ["--whiten", "--no-linear", "--baselines", "pixels", "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(app, [*args, *options], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "PCA-whitened" in result.stdout and "pixels, whitened" in result.stdout
    assert "linear probe" not in result.stdout


def test_cli_errors_are_one_line(tmp_path, fashion_shards, fashion_test_shards):
    args = ["--data", str(fashion_shards), "--eval", str(fashion_test_shards)]
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope"), *args])
    assert missing.exit_code == 1 and "error: run folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(app, ["evaluate", str(tmp_path / "empty"), *args])
    assert empty.exit_code == 1 and "no checkpoints" in empty.stderr


def test_a_missing_query_shard_set_fails_before_any_features_are_computed(tiny_run, fashion_shards, tmp_path):
    args = ["evaluate", str(tiny_run), "--data", str(fashion_shards), "--eval", str(tmp_path / "nope")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "error: shard not found" in result.stderr
    assert "features" not in result.stderr  # nothing was embedded first
