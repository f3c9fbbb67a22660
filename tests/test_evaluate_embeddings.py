"""`mocoplus evaluate --memory --queries`: the suite of the served vectors, baselines kept per shard set."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from artifacts.embedding_set import EmbeddingSet, EmbeddingSetError, write_embedding_set
from flows.cli.main import app
from pipeline.embed.config import EmbedConfig
from pipeline.embed.embed import embed
from pipeline.evaluate import cache as cache_module
from pipeline.evaluate.embedded import evaluate_embeddings, image_format
from pipeline.evaluate.evaluate import evaluate
from pipeline.evaluate.retrieval import retrieval_scores
from pipeline.progress import StageProgress


@pytest.fixture(scope="module")
def sets(bundle, fashion_shards, fashion_test_shards, tmp_path_factory):
    """The slice's 600 training and 200 test images embedded by the test bundle."""
    root = tmp_path_factory.mktemp("served")
    for name, shards in (("memory", fashion_shards), ("queries", fashion_test_shards)):
        embed(bundle, str(shards), root / name, EmbedConfig(workers=0), progress=False)
    return root / "memory", root / "queries"


def test_the_suite_scores_exactly_the_vectors_in_the_sets(sets, tmp_path):
    result = evaluate_embeddings(*sets, cache=tmp_path, progress=False)
    memory, queries = EmbeddingSet(sets[0]), EmbeddingSet(sets[1])
    reference = retrieval_scores(
        torch.from_numpy(memory.rows(np.arange(600))), torch.from_numpy(memory.keys_and_labels()[1]),
        torch.from_numpy(queries.rows(np.arange(200))), torch.from_numpy(queries.keys_and_labels()[1]),
    )  # fmt: skip
    assert result.model.scores == reference
    assert (result.memory_samples, result.query_samples, result.model.dim) == (600, 200, memory.dim)
    assert result.baselines == {} and result.against is None


def test_baselines_score_as_the_run_form_does_and_are_computed_once_per_shard_set(
    sets, trained_run, fashion_shards, fashion_test_shards, tmp_path, monkeypatch
):
    first = evaluate_embeddings(*sets, baselines=("pixels", "hog"), cache=tmp_path, workers=0, progress=False)
    dim = EmbeddingSet(sets[0]).dim  # the baselines are whitened to the model's width
    assert set(first.baselines) == {"pixels", f"pixels, whitened to {dim}-d", "hog", f"hog, whitened to {dim}-d"}
    # like with like: the same images, the same split, the same suite as the run form's baseline rows
    run_form = evaluate(
        trained_run, str(fashion_shards), str(fashion_test_shards), workers=0, baselines=("pixels", "hog"),
        whiten=False, linear=False, encoders=("key",), progress=False,
    )  # fmt: skip
    assert first.baselines["pixels"] == run_form.baselines["pixels"]
    assert first.baselines["hog"] == run_form.baselines["hog"]
    kept = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.glob("baselines/*/*/features.npy"))
    assert len(kept) == 4  # two shard sets × two baselines

    def no_decoding(*args, **kwargs):
        raise AssertionError("the baselines were computed again")

    monkeypatch.setattr(cache_module, "_compute", no_decoding)
    again = evaluate_embeddings(*sets, baselines=("pixels", "hog"), cache=tmp_path, workers=0, progress=False)
    assert again.baselines == first.baselines


def test_a_run_that_loses_the_race_to_the_cache_keeps_the_winners_rows(sets, fashion_shards, tmp_path, monkeypatch):
    """Two runs computing one baseline at once: the second finds the folder already in place when it writes."""
    first = evaluate_embeddings(*sets, baselines=("pixels",), cache=tmp_path, workers=0, progress=False)
    size, mode = image_format(EmbeddingSet(sets[0]))
    root = tmp_path / "baselines" / cache_module.cache_key(fashion_shards, size, mode)
    folder = root / "pixels"
    written = folder.joinpath("features.npy").stat().st_mtime_ns
    cache_module._compute(["pixels"], fashion_shards, size, mode, root, StageProgress(False), 0)
    assert folder.joinpath("features.npy").stat().st_mtime_ns == written  # kept, not written over
    assert not [path for path in root.iterdir() if path.name.startswith(".")]  # its own work removed
    again = evaluate_embeddings(*sets, baselines=("pixels",), cache=tmp_path, workers=0, progress=False)
    assert again.baselines == first.baselines

    winner = tmp_path / "winner"  # now the other run's rename lands while this one writes its own folder
    shutil.move(folder, winner)
    real_building_dir = cache_module.building_dir

    @contextmanager
    def winner_lands_meanwhile(out_dir):
        with real_building_dir(out_dir) as work:
            yield work
            shutil.copytree(winner, out_dir)

    monkeypatch.setattr(cache_module, "building_dir", winner_lands_meanwhile)
    cache_module._compute(["pixels"], fashion_shards, size, mode, root, StageProgress(False), 0)
    assert not [path for path in root.iterdir() if path.name.startswith(".")]  # its own work removed
    assert (
        evaluate_embeddings(*sets, baselines=("pixels",), cache=tmp_path, progress=False).baselines == first.baselines
    )


def test_a_corrupt_baseline_cache_is_named_not_trusted(sets, tmp_path):
    evaluate_embeddings(*sets, baselines=("pixels",), cache=tmp_path, workers=0, progress=False)
    keys = next(tmp_path.glob("baselines/*/pixels/keys.json"))
    record = json.loads(keys.read_text())
    keys.write_text(json.dumps({**record, "keys": record["keys"][::-1]}))
    with pytest.raises(EmbeddingSetError, match="corrupt cache"):
        evaluate_embeddings(*sets, baselines=("pixels",), cache=tmp_path, workers=0, progress=False)


def test_against_another_bundle_embeds_the_same_shards_into_the_cache(sets, bundle, tmp_path):
    result = evaluate_embeddings(*sets, against=bundle, cache=tmp_path, workers=0, progress=False)
    assert result.against is not None and result.against.scores == result.model.scores  # the same model
    cached = list(tmp_path.glob("embeddings/*/*/manifest.json"))
    assert len(cached) == 2
    assert [row[0].split(" ")[0] for row in result.rows()] == ["model", "against"]


def test_unlabelled_sets_two_models_and_unknown_baselines_are_refused(sets, tmp_path):
    unlabelled = write_embedding_set(tmp_path / "plain", np.eye(40, 8, dtype=np.float32), bundle_hash="x" * 64)
    with pytest.raises(EmbeddingSetError, match="needs labelled samples"):
        evaluate_embeddings(unlabelled, unlabelled, cache=tmp_path, progress=False)
    with pytest.raises(EmbeddingSetError, match="two models"):
        evaluate_embeddings(sets[0], unlabelled, cache=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate_embeddings(*sets, baselines=("sift",), cache=tmp_path, progress=False)


def test_a_diverged_models_vectors_score_nan_not_a_number_that_looks_real(tmp_path):
    vectors = np.full((40, 8), np.nan, dtype=np.float32)
    labels = np.arange(40) % 4
    diverged = write_embedding_set(tmp_path / "nan", vectors, bundle_hash="n" * 64, labels=labels)
    result = evaluate_embeddings(diverged, diverged, cache=tmp_path, progress=False, linear=True)
    assert all(math.isnan(value) for value in result.model.scores.as_dict().values())
    assert result.model.linear_top1 is None


def test_cli_prints_the_table_and_refuses_mixed_forms(sets, tmp_path):
    runner = CliRunner()
    options = ["--memory", str(sets[0]), "--queries", str(sets[1]), "--cache", str(tmp_path), "--no-progress"]
    result = runner.invoke(app, ["evaluate", *options, "--baselines", "pixels", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert f"pixels, whitened to {EmbeddingSet(sets[0]).dim}-d" in result.output and "model " in result.output
    mixed = runner.invoke(app, ["evaluate", str(tmp_path), *options])
    assert mixed.exit_code == 1 and mixed.output.startswith("error: ") and mixed.output.count("\n") == 1
