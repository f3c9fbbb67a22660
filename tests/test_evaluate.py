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


def test_evaluate_scores_a_grid_pooled_embedding_and_the_baselines_on_the_same_split(
    tiny_run, fashion_shards, fashion_test_shards
):
    result = evaluate(
        tiny_run, str(fashion_shards), str(fashion_test_shards), workers=0, grid=2, baselines=("pixels", "hog")
    )
    assert set(result.baselines) == {"pixels", "hog"}
    for scores in (*(s.retrieval for s in result.encoders.values()), *result.baselines.values()):
        assert all(0.1 < value <= 1.0 for value in scores.as_dict().values())  # ten classes: chance is 0.1
    assert result.baselines["hog"].nn1 > 0.5  # HOG on real garments is far above chance
    with pytest.raises(ValueError, match="unknown baseline sift"):
        evaluate(tiny_run, str(fashion_shards), str(fashion_test_shards), workers=0, baselines=("sift",))


def test_cli_prints_one_json_object(tiny_run, fashion_shards, fashion_test_shards):
    args = ["evaluate", str(tiny_run), "--data", str(fashion_shards), "--eval", str(fashion_test_shards)]
    result = CliRunner().invoke(app, [*args, "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["encoders"]) == {"query", "key"} and "knn_top1" in data["encoders"]["key"]


def test_cli_errors_are_one_line(tmp_path, fashion_shards, fashion_test_shards):
    args = ["--data", str(fashion_shards), "--eval", str(fashion_test_shards)]
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope"), *args])
    assert missing.exit_code == 1 and "error: run folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(app, ["evaluate", str(tmp_path / "empty"), *args])
    assert empty.exit_code == 1 and "no checkpoints" in empty.stderr
