"""Quality without labels: altered views of a corpus's own pictures searched for their originals."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from artifacts.shard_set import resolve_shards
from flows.cli.main import app
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.sample_photos import SAMPLE_PHOTOS, SamplePhotosConfig, write_sample_photos
from pipeline.evaluate import views as views_module
from pipeline.evaluate.config import ViewConfig
from pipeline.evaluate.gate import view_gate
from pipeline.evaluate.views import (
    altered_view,
    evaluate_run_views,
    pixel_recall,
    recall_of_originals,
    sample_keys,
    stored_images,
)
from pipeline.train.run_config import load_config, with_data
from pipeline.train.trainer import train

# one pytest-xdist worker for the whole module: the tests share `photo_run`, a real training run that two
# workers would each train again (``make test`` runs two)
pytestmark = pytest.mark.xdist_group("views-photo-run")

PER_PHOTO = 8  # 19 photos × 8 crops: a 152-picture folder in a second


@pytest.fixture(scope="module")
def unlabelled_shards(tmp_path_factory) -> Path:
    """The sample-photo corpus written flat (no class folders), ingested as a user's folder would be."""
    root = tmp_path_factory.mktemp("own-photos")
    write_sample_photos(root / "photos", SamplePhotosConfig(per_photo=PER_PHOTO, labelled=False))
    config = IngestConfig(image_format="jpg", max_side=128, workers=1, shard_size=100)
    ingest(str(root / "photos"), root / "shards", config, progress=False)
    return root / "shards"


# the photos-cpu recipe shrunk (width 1/8, 200 steps of 32 pictures): half a minute on a CPU
PHOTO_TINY = [
    "model.width=0.125", "model.queue_size=256", "model.num_negatives=128", "model.skip_negatives=4",
    "model.embedding_dim=32", "data.workers=0", "data.shuffle_buffer=100", "train.global_batch=32",
    "train.max_steps=200", "train.checkpoint_every=0", "train.time_budget=0",
]  # fmt: skip
# mirrored views: a model trained with flips finds them, raw pixels mostly do not (on the 152 pictures at 64 px
# the tiny model scored recall@10 0.68 against pixels' 0.47; on default views 0.68 against 0.63)
MIRRORED = ViewConfig(sample=60, views=3, flip_p=1.0)


@pytest.fixture(scope="module")
def photo_run(unlabelled_shards, tmp_path_factory) -> Path:
    """`PHOTO_TINY` on the unlabelled folder."""
    config = with_data(load_config("photos-cpu", PHOTO_TINY), train=str(unlabelled_shards))
    run = tmp_path_factory.mktemp("photo-run") / "run"
    train(config, run, progress=False)
    return run


def naive_recall(corpus: torch.Tensor, originals: torch.Tensor, views: torch.Tensor, k: int) -> float:
    """Each view's neighbours sorted one by one; found when the original is among the first k."""
    corpus = corpus / corpus.norm(dim=1, keepdim=True)
    hits = 0
    for view, original in zip(views, originals.tolist(), strict=True):
        similarity = (corpus @ (view / view.norm())).tolist()
        better = sum(1 for value in similarity if value > similarity[original])
        hits += better < k
    return hits / len(views)


@pytest.mark.parametrize("corpus_chunk", [4096, 64])
def test_recall_of_originals_matches_a_naive_search(corpus_chunk, monkeypatch):
    monkeypatch.setattr(views_module, "CORPUS_CHUNK", corpus_chunk)  # one block of the corpus, or five
    generator = torch.Generator().manual_seed(0)
    corpus = torch.randn(300, 16, generator=generator)
    originals = torch.randint(0, 300, (2500,), generator=generator)  # more views than one chunk
    views = corpus[originals] + 0.9 * torch.randn(2500, 16, generator=generator)
    result = recall_of_originals(corpus, originals, views, (1, 5, 10))
    for k in (1, 5, 10):
        assert result.recall[k] == pytest.approx(naive_recall(corpus, originals, views, k), abs=1e-9)
    assert 0 < result.recall[1] < result.recall[5] < result.recall[10] < 1 and result.queries == 2500


def test_a_view_identical_to_its_original_is_found_and_noise_is_not():
    corpus = torch.eye(20)
    same = recall_of_originals(corpus, torch.arange(20), corpus.clone(), (1,))
    assert same.recall[1] == 1.0
    shifted = recall_of_originals(corpus, torch.arange(20), corpus.roll(1, dims=0), (1, 10))
    assert shifted.recall[1] == 0.0


def test_pixel_recall_standardises_with_the_corpus_statistics():
    rng = np.random.default_rng(0)
    corpus = torch.from_numpy(rng.integers(0, 256, size=(50, 8, 8, 3), dtype=np.uint8))
    assert pixel_recall(corpus, torch.arange(50), corpus.clone(), (1,)).recall[1] == 1.0


def test_views_are_altered_and_the_same_for_the_same_seed():
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(120, 160, 3), dtype=np.uint8))
    config = ViewConfig()
    first = altered_view(photo, np.random.default_rng([0, 3]), config)
    again = altered_view(photo, np.random.default_rng([0, 3]), config)
    other = altered_view(photo, np.random.default_rng([0, 4]), config)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert first.size != photo.size and first.mode == "RGB"
    assert first.size != other.size or not np.array_equal(np.asarray(first), np.asarray(other))
    gray = altered_view(photo.convert("L"), np.random.default_rng(0), config)
    assert gray.mode == "L"


def test_the_sample_is_seeded_and_never_larger_than_the_corpus():
    keys = [f"k{index}" for index in range(40)]
    assert sample_keys(keys, ViewConfig(sample=10)) == sample_keys(keys, ViewConfig(sample=10))
    assert sample_keys(keys, ViewConfig(sample=10)) != sample_keys(keys, ViewConfig(sample=10, seed=1))
    assert sample_keys(keys, ViewConfig(sample=500)) == list(range(40))


def test_stored_images_reads_the_sampled_pictures_and_names_a_missing_one(unlabelled_shards):
    shards = resolve_shards(unlabelled_shards)
    with tarfile.open(shards.urls[0]) as tar:
        name = next(member.name for member in tar if member.name.endswith(".jpg"))
        expected = tar.extractfile(name).read()
    key = name.removesuffix(".jpg")
    assert stored_images(shards, [key]) == {key: expected}
    with pytest.raises(ValueError, match="missing from their shards"):
        stored_images(shards, [key, "no-such-key"])


def test_the_sample_photo_folder_holds_every_photo_at_many_sizes(tmp_path):
    count = write_sample_photos(tmp_path / "labelled", SamplePhotosConfig(per_photo=3, seed=2))
    folders = sorted(path.name for path in (tmp_path / "labelled").iterdir())
    assert count == 3 * len(SAMPLE_PHOTOS) and folders == sorted(name for name, _, _ in SAMPLE_PHOTOS)
    sides = {max(Image.open(path).size) for path in (tmp_path / "labelled").rglob("*.jpg")}
    assert len(sides) > 10 and min(sides) >= 64 and max(sides) <= 300
    with pytest.raises(FileExistsError):
        write_sample_photos(tmp_path / "labelled", SamplePhotosConfig(per_photo=1))


def test_a_briefly_trained_model_finds_mirrored_originals_pixels_miss(photo_run, unlabelled_shards):
    result = evaluate_run_views(photo_run, str(unlabelled_shards), MIRRORED, progress=False)
    assert (result.corpus, result.sample, result.views) == (PER_PHOTO * len(SAMPLE_PHOTOS), 60, 3)
    assert result.model.queries == result.pixels.queries == 180
    assert result.model.recall[10] > result.pixels.recall[10] + 0.1
    assert result.model.recall[1] <= result.model.recall[10]
    again = evaluate_run_views(photo_run, str(unlabelled_shards), MIRRORED, progress=False)
    assert again == result  # the same views, the same scores


def test_views_that_barely_differ_from_their_originals_are_found_by_pixels_and_model(photo_run, unlabelled_shards):
    """No crop, no rescale, no colour change, no mirror, JPEG at 95: pixels and model both find nearly every
    original first (a layout mismatch between the corpus's pixels and the views' would score near zero)."""
    untouched = ViewConfig(
        sample=40, views=1, area=(1.0, 1.0), ratio=(1.0, 1.0), rescale=(1.0, 1.0), colour=0.0, flip_p=0.0,
        jpeg_quality=(95, 95),
    )  # fmt: skip
    result = evaluate_run_views(photo_run, str(unlabelled_shards), untouched, progress=False)
    assert result.pixels.recall[1] >= 0.95 and result.model.recall[1] >= 0.9


def test_evaluate_unlabelled_prints_recall_beside_pixels_and_refuses_labelled_options(photo_run, unlabelled_shards):
    runner = CliRunner()
    base = ["evaluate", str(photo_run), "--data", str(unlabelled_shards), "--unlabelled", "--sample", "20"]
    table = runner.invoke(app, [*base, "--views", "2", "--no-progress"])
    assert table.exit_code == 0, table.output
    assert "recall@1" in table.output and "recall@10" in table.output and "pixels" in table.output
    assert "20 pictures × 2 altered views" in table.output
    as_json = runner.invoke(app, [*base, "--json", "--no-progress"])
    record = json.loads(as_json.output)
    assert record["sample"] == 20 and set(record["model"]["recall"]) == {"1", "10"}
    refused = runner.invoke(app, [*base, "--eval", str(unlabelled_shards)])
    assert refused.exit_code != 0 and "takes no --eval" in refused.output


def test_the_label_free_gate_wants_more_than_pixels_and_no_drop():
    candidate, pixels = {"recall@1": 0.30, "recall@10": 0.60}, {"recall@1": 0.02, "recall@10": 0.05}
    assert view_gate(candidate, pixels).passed
    assert not view_gate({"recall@1": 0.01, "recall@10": 0.04}, pixels).passed
    published = {"recall@1": 0.35, "recall@10": 0.62}
    refused = view_gate(candidate, pixels, published, tolerance=0.01)
    assert not refused.passed and "recall@1 30.00% is 5.00% below" in refused.reasons[0]
    assert view_gate(candidate, pixels, published, tolerance=0.06).passed
    assert not view_gate({"recall@1": float("nan"), "recall@10": 0.6}, pixels).passed


def test_the_served_vectors_are_scored_on_the_same_views_as_the_run(photo_run, unlabelled_shards, tmp_path):
    """Export, embed, evaluate --memory --unlabelled: the same views and pixels as the run form, and a model
    scored against itself scores alike."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.embed import embed
    from pipeline.evaluate.views import evaluate_embedding_views
    from pipeline.export.config import ExportConfig
    from pipeline.export.export import export

    export(photo_run, tmp_path / "model", ExportConfig(parity_images=64), progress=False)
    embed(tmp_path / "model", str(unlabelled_shards), tmp_path / "emb", EmbedConfig(workers=0), progress=False)
    config = MIRRORED
    served = evaluate_embedding_views(
        tmp_path / "emb", config, against=tmp_path / "model", cache=tmp_path / "cache", progress=False
    )
    of_run = evaluate_run_views(photo_run, str(unlabelled_shards), config, progress=False)
    assert served.pixels == of_run.pixels and served.corpus == of_run.corpus
    assert served.model.recall[10] > served.pixels.recall[10]
    assert abs(served.model.recall[10] - of_run.model.recall[10]) <= 0.05  # ONNX Runtime against PyTorch
    assert served.against == served.model
    result = CliRunner().invoke(
        app, ["evaluate", "--memory", str(tmp_path / "emb"), "--unlabelled", "--sample", "60", "--views", "3",
              "--cache", str(tmp_path / "cache"), "--json", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    default_views = evaluate_embedding_views(
        tmp_path / "emb", ViewConfig(sample=60, views=3), cache=tmp_path / "cache", progress=False
    )
    assert json.loads(result.output)["model"]["recall"]["10"] == default_views.model.recall[10]


def test_sample_photos_writes_a_folder_once_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    made = runner.invoke(app, ["sample-photos", "--out", str(tmp_path / "flat"), "--per-photo", "2", "--unlabelled"])
    assert made.exit_code == 0 and "38 pictures of 19 photographs (flat, no labels)" in made.output
    assert len(list((tmp_path / "flat").glob("*.jpg"))) == 38
    again = runner.invoke(app, ["sample-photos", "--out", str(tmp_path / "flat")])
    assert again.exit_code == 1 and "not an empty folder" in again.output
