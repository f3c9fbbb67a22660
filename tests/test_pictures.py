"""Pictures on real artifacts: corpus images by key, search result grids, training curves, embedding maps."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_corpus
from PIL import Image
from typer.testing import CliRunner

from artifacts.atomic import sha256_file
from artifacts.corpus_images import CorpusImages, CorpusImagesError, scan_shard
from artifacts.embedding_set import EmbeddingSet
from artifacts.images import decode_image
from artifacts.index_bundle import IndexBundle
from flows.cli.main import app
from pipeline.data.fashion_mnist import CLASS_NAMES
from pipeline.pictures.curves import CURVES_FILE, draw_curves, read_metrics
from pipeline.pictures.embedding_map import MapConfig, draw_map, map_embeddings, principal_components
from pipeline.pictures.figures import DPI
from pipeline.pictures.grid import CELL_INCHES, result_rows
from pipeline.search import resolve_queries

FASHION_NAMES = CLASS_NAMES  # what the slice's shard manifests name
runner = CliRunner()


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def point_part_at(embeddings: Path, index_path: Path, shard: Path) -> None:
    """The copied embedding set's first part names ``shard``; the index accepts the edited manifest."""
    manifest = json.loads((embeddings / "manifest.json").read_text())
    manifest["parts"][0]["source"] = str(shard)
    (embeddings / "manifest.json").write_text(json.dumps(manifest))
    info = json.loads((index_path / "current" / "index.json").read_text())
    info["embeddings"]["manifest_sha256"] = sha256_file(embeddings / "manifest.json")
    (index_path / "current" / "index.json").write_text(json.dumps(info))


# --- corpus images ------------------------------------------------------------------------------


def test_every_key_reads_back_its_stored_image_bytes_from_many_threads_at_once(corpus):
    images = CorpusImages.of_index(IndexBundle(corpus["index"]))
    keys = list(corpus["images"]) * 3
    with ThreadPoolExecutor(8) as pool:  # the service's decode threads share one reader
        read = list(pool.map(images.read, keys))
    assert read == [corpus["images"][key] for key in keys]


def test_a_shard_scan_keeps_the_preferred_image_of_each_key(tmp_path):
    shard = tmp_path / "mixed-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.webp", b"w" * 3), ("a.png", b"p" * 5), ("a.cls", b"1"), ("dir/b.jpg", b"j" * 7)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    found = scan_shard(str(shard))
    assert set(found) == {"a", "dir/b"}
    assert (found["a"].size, found["dir/b"].size) == (5, 7)  # png before webp, as the streams choose


def test_labels_are_named_from_the_shard_sets_manifest(corpus):
    images = CorpusImages.of_index(IndexBundle(corpus["index"]))
    assert images.class_names == FASHION_NAMES
    assert [images.label_name(label) for label in (0, 9, -1)] == ["T-shirt/top", "Ankle boot", ""]


def test_an_unknown_key_is_a_key_error_and_a_missing_shard_names_itself(corpus, tmp_path):
    embeddings, index_path = copy_corpus(corpus, tmp_path)
    with pytest.raises(KeyError):
        CorpusImages.of_index(IndexBundle(index_path)).read("../../etc/passwd")
    point_part_at(embeddings, index_path, tmp_path / "gone" / "shard-000000.tar")
    images = CorpusImages.of_index(IndexBundle(index_path))
    with pytest.raises(CorpusImagesError, match=r"shard .*gone/shard-000000\.tar .* is missing"):
        images.read(corpus["keys"][0])


def test_an_index_without_its_embedding_set_says_so(corpus, tmp_path):
    embeddings, index_path = copy_corpus(corpus, tmp_path)
    shutil.rmtree(embeddings)
    with pytest.raises(CorpusImagesError, match=r"the embedding set of index .* cannot be read"):
        CorpusImages.of_index(IndexBundle(index_path))


def test_a_shard_or_embedding_set_that_changed_after_indexing_is_a_clear_error(corpus, tmp_path):
    embeddings, index_path = copy_corpus(corpus, tmp_path)
    manifest = json.loads((embeddings / "manifest.json").read_text())
    shard = Path(manifest["parts"][0]["source"])
    moved = tmp_path / "shards" / shard.name
    moved.parent.mkdir()
    moved.write_bytes(shard.read_bytes() + b"\0" * 512)  # one more (empty) tar block: not the shard embedded
    manifest["parts"][0]["source"] = str(moved)
    (embeddings / "manifest.json").write_text(json.dumps(manifest))
    record_path = embeddings / f"{manifest['parts'][0]['part']}.json"
    index = IndexBundle(index_path)
    images = CorpusImages(EmbeddingSet(embeddings), lambda key: int(index.rows[index.id_of(key)]))
    with pytest.raises(CorpusImagesError, match=r"was embedded from .* lists"):  # the part disagrees with it
        images.read(corpus["keys"][0])
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "source": str(moved)}))
    with pytest.raises(CorpusImagesError, match=r"changed after index .* was built"):
        CorpusImages.of_index(IndexBundle(index_path))  # the manifest is not the one indexed
    info = json.loads((index_path / "current" / "index.json").read_text())
    info["embeddings"]["manifest_sha256"] = sha256_file(embeddings / "manifest.json")
    (index_path / "current" / "index.json").write_text(json.dumps(info))
    with pytest.raises(CorpusImagesError, match=r"changed after it was embedded"):
        CorpusImages.of_index(IndexBundle(index_path)).read(corpus["keys"][0])  # the shard is not the one embedded


def test_an_embedding_set_with_relative_shard_paths_says_to_rerun_embed(corpus, tmp_path):
    embeddings, index_path = copy_corpus(corpus, tmp_path)
    manifest = json.loads((embeddings / "manifest.json").read_text())
    manifest["parts"][0]["source"] = "shards/shard-000000.tar"
    (embeddings / "manifest.json").write_text(json.dumps(manifest))
    info = json.loads((index_path / "current" / "index.json").read_text())
    info["embeddings"]["manifest_sha256"] = sha256_file(embeddings / "manifest.json")
    (index_path / "current" / "index.json").write_text(json.dumps(info))
    with pytest.raises(CorpusImagesError, match="relative paths"):
        CorpusImages.of_index(IndexBundle(index_path)).read(corpus["keys"][0])


# --- result grids -------------------------------------------------------------------------------


def test_grid_rows_show_the_query_and_its_neighbours_images_labels_and_scores(corpus, bundle, tmp_path):
    from artifacts.model_bundle import ModelBundle

    index = IndexBundle(corpus["index"])
    model = ModelBundle(bundle)
    picture = tmp_path / "query.png"
    picture.write_bytes(corpus["images"][corpus["keys"][3]])
    np.save(tmp_path / "vector.npy", corpus["vectors"][corpus["keys"][5]])
    specs = [f"key:{corpus['keys'][0]}", str(picture), str(tmp_path / "vector.npy")]
    queries = resolve_queries(specs, index, model.embed, model.size)
    results = index.search(np.stack([query.vector for query in queries]), 4)
    rows = result_rows(queries, results, CorpusImages.of_index(index))

    assert [len(row.neighbours) for row in rows] == [4, 4, 4]
    first_key = corpus["keys"][0]
    stored = np.asarray(decode_image(corpus["images"][first_key]).image)
    np.testing.assert_array_equal(rows[0].query.image, stored)  # a key query shows its corpus image
    assert rows[0].neighbours[0].caption.startswith(first_key)  # ... and finds itself first
    np.testing.assert_array_equal(rows[0].neighbours[0].image, stored)
    assert rows[1].query.image.shape == (model.size, model.size, 3)  # an image query: what the model saw
    assert rows[2].query.image is None  # a vector has no picture
    hit = results[0][1]
    label_name = FASHION_NAMES[hit.label]
    assert rows[0].neighbours[1].caption.split("\n") == [hit.key, label_name, f"{hit.score:.3f}"]


def test_search_grid_writes_one_row_per_answered_query(corpus, bundle, tmp_path):
    out = tmp_path / "grid.png"
    keys = corpus["keys"]
    result = runner.invoke(
        app,
        ["search", str(corpus["index"]), "--model", str(bundle), f"key:{keys[0]}", f"key:{keys[1]}",
         "key:no-such-key", "-k", "5", "--grid", str(out)],
    )  # fmt: skip
    assert result.exit_code == 1  # the unknown key is reported; the others are answered and drawn
    assert "error: key:no-such-key" in result.output
    assert f"grid: {out}" in result.output
    width, height = png_size(out)
    assert abs(width - CELL_INCHES * 6 * DPI) <= 1  # the query + 5 neighbours
    assert abs(height - (CELL_INCHES * 1.25 * 2 + 0.4) * DPI) <= 1  # two answered queries and the title


def test_search_grid_with_a_missing_shard_is_one_error_line(corpus, bundle, tmp_path):
    embeddings, index_path = copy_corpus(corpus, tmp_path)
    point_part_at(embeddings, index_path, tmp_path / "moved.tar")
    out = tmp_path / "grid.png"
    key = corpus["keys"][0]
    result = runner.invoke(app, ["search", str(index_path), "--model", str(bundle), f"key:{key}", "--grid", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"error: shard {tmp_path / 'moved.tar'}")
    assert not out.exists()


# --- training curves ----------------------------------------------------------------------------


def test_training_draws_its_curves_when_it_ends(trained_run):
    assert png_size(trained_run / CURVES_FILE) == (1300, 700)
    metrics = read_metrics(trained_run)
    assert [step for step, _ in metrics.series["loss"]] == [1, 2, 3, 4]
    assert set(metrics.series) >= {"lr", "momentum", "positive_similarity", "selected_negative_similarity"}
    assert metrics.knn and all(0 <= top1 <= 100 for _, top1 in metrics.knn)


def test_curves_skip_a_torn_line_and_compare_several_runs(trained_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    (other / "metrics.jsonl").write_text("\n".join([*lines[:2], '{"step": 3, "lo', "[1, 2]"]) + "\n")
    assert len(read_metrics(other).series["loss"]) == 2
    result = runner.invoke(app, ["plot", str(trained_run), str(other), "--out", str(tmp_path / "both.png")])
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "both.png") == (1300, 700)


def test_plot_errors_are_one_line(trained_run, tmp_path):
    several = runner.invoke(app, ["plot", str(trained_run), str(trained_run)])
    assert several.exit_code == 1 and "name it with --out" in several.output
    missing = runner.invoke(app, ["plot", str(tmp_path)])
    assert missing.exit_code == 1 and "has no metrics.jsonl" in missing.output
    (tmp_path / "metrics.jsonl").write_text("")
    empty = runner.invoke(app, ["plot", str(tmp_path)])
    assert empty.exit_code == 1 and "no metrics logged yet" in empty.output
    wrong = runner.invoke(app, ["plot", str(trained_run), "--out", str(tmp_path / "curves.jpg")])
    assert wrong.exit_code == 1 and "PNG" in wrong.output


def test_a_failed_redraw_keeps_the_old_picture_and_leaves_no_temp_file(trained_run, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "curves.png"
    out.write_bytes(b"old")

    def half_written(figure, target, **options):
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        draw_curves([trained_run], out)
    assert out.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [out]


# --- embedding maps -----------------------------------------------------------------------------


def test_principal_components_match_the_covariance_eigenvectors():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, 12)) * np.linspace(5, 0.5, 12) + 7  # distinct variances, off-centre
    projected = principal_components(vectors, 4)
    centred = vectors - vectors.mean(axis=0)
    _values, vectors_of = np.linalg.eigh(centred.T @ centred)  # the naive reference: ascending eigenvalues
    reference = centred @ vectors_of[:, ::-1][:, :4]
    np.testing.assert_allclose(np.abs(projected), np.abs(reference), rtol=1e-4, atol=1e-4)  # up to each sign
    assert principal_components(vectors[:, :3], 4).shape == (300, 3)  # no wider than asked: as it is


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_map_projects_a_seeded_sample_with_the_sets_labels(corpus, method):
    embeddings = EmbeddingSet(IndexBundle(corpus["index"]).info["embeddings"]["path"])
    config = MapConfig(method=method, sample=150, neighbours=10)
    projected = map_embeddings(embeddings, config)
    assert projected.points.shape == (150, 2) and np.isfinite(projected.points).all()
    assert projected.total == 200 and projected.class_names == FASHION_NAMES
    _keys, labels = embeddings.keys_and_labels()
    rows = np.sort(np.random.default_rng(0).choice(200, size=150, replace=False))
    np.testing.assert_array_equal(projected.labels, labels[rows])
    again = map_embeddings(embeddings, config)
    np.testing.assert_allclose(again.points, projected.points, atol=1e-4)  # seeded: the same picture twice


def test_map_command_draws_a_labelled_and_an_unlabelled_set(corpus, tmp_path):
    embeddings = IndexBundle(corpus["index"]).info["embeddings"]["path"]
    out = tmp_path / "map.png"
    result = runner.invoke(app, ["map", embeddings, "--out", str(out), "--method", "tsne", "--sample", "100"])
    assert result.exit_code == 0, result.output
    assert png_size(out) == (900, 750)

    from artifacts.embedding_set import write_embedding_set

    unlabelled = write_embedding_set(
        tmp_path / "vectors", np.random.default_rng(0).normal(size=(40, 8)), bundle_hash="x"
    )
    projected = map_embeddings(EmbeddingSet(unlabelled), MapConfig(method="tsne", sample=40))
    assert (projected.labels == -1).all() and projected.class_names is None
    assert png_size(draw_map(projected, tmp_path / "plain.png", "vectors")) == (900, 750)


def test_map_refuses_bad_options_on_one_line(corpus, tmp_path):
    embeddings = IndexBundle(corpus["index"]).info["embeddings"]["path"]
    bad_method = runner.invoke(app, ["map", embeddings, "--out", str(tmp_path / "m.png"), "--method", "pca"])
    assert bad_method.exit_code == 1 and "umap" in bad_method.output
    not_a_set = runner.invoke(app, ["map", str(tmp_path), "--out", str(tmp_path / "m.png")])
    assert not_a_set.exit_code == 1 and "not a complete embedding set" in not_a_set.output


def test_a_map_of_an_updated_set_never_draws_a_removed_sample(tmp_path):
    from artifacts.embedding_set import grow_embedding_set, write_embedding_set

    rng = np.random.default_rng(5)
    labels = np.zeros(120, dtype=int)
    labels[::4] = 9  # the samples a later ingest --update removes
    folder = write_embedding_set(tmp_path / "emb", rng.normal(size=(120, 8)), bundle_hash="h", labels=labels)
    grow_embedding_set(folder, rng.normal(size=(30, 8)), labels=np.ones(30, dtype=int),
                       removed=[f"v{row}" for row in range(0, 120, 4)])  # fmt: skip

    drawn = map_embeddings(EmbeddingSet(folder), MapConfig(method="tsne", sample=1000, neighbours=5))

    assert drawn.total == 120 + 30 - 30 == len(drawn.points)
    assert 9 not in drawn.labels and (drawn.labels == 1).sum() == 30


def _two_d_knn(points: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out majority vote of the k nearest points on the map: do the classes separate in 2-D?"""
    distances = ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(distances, np.inf)
    nearest = labels[np.argsort(distances, axis=1)[:, :k]]
    votes = np.stack([np.bincount(row, minlength=labels.max() + 1) for row in nearest])
    return float((votes.argmax(axis=1) == labels).mean())


def test_a_whitened_embedding_is_mapped_from_its_leading_directions_where_classes_separate(fashion_shards):
    """The slice's pixels PCA-whitened to 300-d (principal order, as an exported whitening): their PCA picks
    arbitrary directions (all variances are equal), their leading coordinates hold the structure."""
    import torch

    from mocoplus.whitening import PcaWhitening, WhiteningConfig
    from pipeline.data.streams import EvalStream, StreamConfig
    from pipeline.pictures.embedding_map import project

    stream = EvalStream(str(fashion_shards), 28, "L", StreamConfig(batch_size=600, workers=0), rank=0, world_size=1)
    batches = list(stream)
    pixels = torch.cat([batch.images for batch in batches]).reshape(600, -1).float() / 255
    labels = torch.cat([batch.labels for batch in batches]).numpy()
    whitened = PcaWhitening.fit(pixels.double(), WhiteningConfig(dims=300))(pixels)
    vectors = torch.nn.functional.normalize(whitened, dim=1).numpy()
    config = MapConfig(sample=600, epochs=100)
    leading = _two_d_knn(project(vectors, config, whitened=True), labels)
    assert leading > 0.6  # ten classes: chance is 0.1 (measured 0.74)
    assert leading > _two_d_knn(project(vectors, config), labels) + 0.2  # a PCA of whitened vectors: 0.29
