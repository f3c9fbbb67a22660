"""Batch embedding: real Fashion-MNIST shards through an exported bundle into an embedding set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import _png, write_shard
from typer.testing import CliRunner

from artifacts.embedding_set import EMBEDDINGS_MANIFEST as MANIFEST
from artifacts.embedding_set import part_name
from artifacts.model_bundle import ModelBundle
from flows.cli.main import app
from pipeline.data.streams import EvalStream, StreamConfig
from pipeline.embed.config import EmbedConfig
from pipeline.embed.embed import embed

QUIET = {"progress": False}


def reference(bundle_dir: Path, shard: str) -> tuple[np.ndarray, list[str], list[int]]:
    """Naive path: the evaluation stream's decode + resize, one ModelBundle call per batch."""
    model = ModelBundle(bundle_dir)
    stream = EvalStream(shard, model.size, "RGB", StreamConfig(batch_size=64, workers=0), rank=0, world_size=1)
    vectors, keys, labels = [], [], []
    for batch in stream:
        vectors.append(model.embed(batch.images.permute(0, 2, 3, 1).contiguous().numpy()))
        keys += batch.keys
        labels += batch.labels.tolist()
    return np.concatenate(vectors), keys, labels


def read_part(folder: Path, index: int) -> tuple[np.ndarray, dict]:
    return np.load(folder / f"{part_name(index)}.npy"), json.loads((folder / f"{part_name(index)}.json").read_text())


def test_every_sample_is_embedded_as_the_bundle_embeds_it(bundle, fashion_test_shards, tmp_path):
    result = embed(bundle, str(fashion_test_shards), tmp_path / "emb", EmbedConfig(batch_size=48), **QUIET)
    assert result.complete and result.parts_written == 1 and result.samples == 200
    matrix, record = read_part(tmp_path / "emb", 0)
    vectors, keys, labels = reference(bundle, str(fashion_test_shards))
    assert record["keys"] == keys and record["labels"] == labels
    assert matrix.dtype == np.float32 and matrix.shape == (200, record["dim"])
    np.testing.assert_allclose(matrix, vectors, atol=1e-5, rtol=0)
    manifest = json.loads((tmp_path / "emb" / MANIFEST).read_text())
    assert manifest["bundle_hash"] == ModelBundle(bundle).hash
    assert (manifest["samples"], manifest["skipped"], manifest["inputs"]) == (200, 0, 200)


def test_rerun_skips_done_parts_and_redoes_missing_or_foreign_ones(bundle, fashion_shards, tmp_path):
    out = tmp_path / "emb"
    first = embed(bundle, str(fashion_shards), out, EmbedConfig(workers=2), **QUIET)
    assert (first.parts_written, first.samples) == (3, 600)
    before = read_part(out, 1)[0]
    again = embed(bundle, str(fashion_shards), out, EmbedConfig(workers=2), **QUIET)
    assert (again.parts_written, again.parts_skipped) == (0, 3)
    (out / f"{part_name(0)}.json").unlink()  # as a run killed before its JSON landed leaves it
    record_path = out / f"{part_name(2)}.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "bundle_hash": "0" * 64}))  # made by another model
    resumed = embed(bundle, str(fashion_shards), out, EmbedConfig(workers=2), **QUIET)
    assert (resumed.parts_written, resumed.parts_skipped) == (2, 1) and resumed.complete
    np.testing.assert_array_equal(read_part(out, 1)[0], before)


def test_parts_recorded_with_relative_shard_paths_are_still_done(bundle, fashion_shards, tmp_path, monkeypatch):
    """Sets made before sources were absolute name their shards relative to where embed ran: not redone."""
    out = tmp_path / "emb"
    embed(bundle, str(fashion_shards), out, EmbedConfig(workers=0), **QUIET)
    monkeypatch.chdir(fashion_shards.parent)
    for part in sorted(out.glob("part-*.json")):
        record = json.loads(part.read_text())
        assert Path(record["source"]).is_absolute()
        part.write_text(json.dumps({**record, "source": os.path.relpath(record["source"])}))
    again = embed(bundle, fashion_shards.name, out, EmbedConfig(workers=0), **QUIET)
    assert (again.parts_written, again.parts_skipped) == (0, 3)


KILLED_AFTER_FIRST_PART = """
import os, signal, sys
import artifacts.embedding_set as contract
import pipeline.embed.embed as stage
finished = []
def write_and_maybe_die(path, data, real=contract.write_json_atomic):
    real(path, data)
    finished.append(path)
    if len(finished) == 1:  # the first part is complete: die as a killed job does, with no clean-up
        os.kill(os.getpid(), signal.SIGKILL)
contract.write_json_atomic = write_and_maybe_die
stage.embed(sys.argv[1], sys.argv[2], sys.argv[3], stage.EmbedConfig(workers=0), progress=False)
"""


def test_a_killed_run_resumes_where_it_stopped(bundle, fashion_shards, tmp_path):
    out = tmp_path / "emb"
    args = [sys.executable, "-c", KILLED_AFTER_FIRST_PART, str(bundle), str(fashion_shards), str(out)]
    killed = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / f"{part_name(0)}.json").exists() and not (out / MANIFEST).exists()
    resumed = embed(bundle, str(fashion_shards), out, EmbedConfig(workers=0), **QUIET)
    assert (resumed.parts_written, resumed.parts_skipped, resumed.complete) == (2, 1, True)
    clean = embed(bundle, str(fashion_shards), tmp_path / "clean", EmbedConfig(workers=0), **QUIET)
    assert clean.samples == 600 and json.loads((out / MANIFEST).read_text())["samples"] == 600
    for index in range(3):
        (matrix, record), (expected, expected_record) = read_part(out, index), read_part(tmp_path / "clean", index)
        np.testing.assert_array_equal(matrix, expected)
        assert record["keys"] == expected_record["keys"]


def test_split_over_processes_builds_the_same_set(bundle, fashion_shards, tmp_path):
    whole = embed(bundle, str(fashion_shards), tmp_path / "whole", EmbedConfig(), **QUIET)
    share0 = embed(bundle, str(fashion_shards), tmp_path / "split", EmbedConfig(shard_index=0, num_shards=2), **QUIET)
    assert not share0.complete and not (tmp_path / "split" / MANIFEST).exists()
    share1 = embed(bundle, str(fashion_shards), tmp_path / "split", EmbedConfig(shard_index=1, num_shards=2), **QUIET)
    assert share1.complete and share0.parts_written + share1.parts_written == whole.parts_written == 3
    for index in range(3):
        np.testing.assert_array_equal(read_part(tmp_path / "split", index)[0], read_part(tmp_path / "whole", index)[0])
    manifest = json.loads((tmp_path / "split" / MANIFEST).read_text())
    assert manifest["samples"] == 600


def test_undecodable_samples_are_skipped_listed_and_counted(bundle, tmp_path):
    good = _png(Image.new("L", (28, 28), 128))
    shard = write_shard(
        tmp_path / "mixed.tar",
        [("a", good, 1), ("broken", good[:40], 2), ("b", good, 3), ("text", b"not an image at all", 4)],
    )
    result = embed(bundle, str(shard), tmp_path / "emb", EmbedConfig(workers=0), **QUIET)
    matrix, record = read_part(tmp_path / "emb", 0)
    assert record["keys"] == ["a", "b"] and record["labels"] == [1, 3] and matrix.shape[0] == 2
    assert [item["key"] for item in record["skipped"]] == ["broken", "text"]
    assert all(item["reason"] for item in record["skipped"])
    manifest = json.loads((tmp_path / "emb" / MANIFEST).read_text())
    assert (manifest["samples"], manifest["skipped"], manifest["inputs"]) == (2, 2, 4)
    assert result.skipped_samples == 2


def test_fp16_halves_the_matrix_and_stays_close(bundle, fashion_test_shards, tmp_path):
    embed(bundle, str(fashion_test_shards), tmp_path / "f32", EmbedConfig(), **QUIET)
    embed(bundle, str(fashion_test_shards), tmp_path / "f16", EmbedConfig(fp16=True), **QUIET)
    full, half = read_part(tmp_path / "f32", 0)[0], read_part(tmp_path / "f16", 0)[0]
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), full, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    ("config", "message"),
    [({"shard_index": 2, "num_shards": 2}, "shard_index"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_split_or_batch_is_refused(config, message):
    with pytest.raises(ValueError, match=message):
        EmbedConfig(**config)


def test_cli_embeds_and_reports_a_bad_bundle_in_one_line(bundle, fashion_test_shards, tmp_path):
    runner = CliRunner()
    args = ["embed", str(bundle), "--data", str(fashion_test_shards), "--out", str(tmp_path / "e"), "--no-progress"]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "1 parts written (200 samples, 0 skipped)" in ok.output and "manifest written" in ok.output
    bad = runner.invoke(app, ["embed", str(tmp_path), "--data", str(fashion_test_shards), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and bad.output.strip().startswith("error:") and "model.json" in bad.output


def test_cli_takes_its_share_from_torchrun_style_env(bundle, fashion_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["embed", str(bundle), "--data", str(fashion_shards), "--out", str(tmp_path / "e"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "e").glob("*.json")) == [f"{part_name(1)}.json"]  # shard 1 of 3
    monkeypatch.setenv("RANK", "one")
    bad = CliRunner().invoke(app, [*args[:-2], str(tmp_path / "f")])
    assert bad.exit_code == 1 and "$RANK must be a non-negative integer" in bad.stderr


# --- a set whose parts are replaced: never read as complete ----------------------------------------------


def _indexed_set(bundle: Path, shards: Path, root: Path) -> tuple[Path, Path]:
    from pipeline.index.build import build_index
    from pipeline.index.config import IndexConfig

    embed(bundle, str(shards), root / "emb", EmbedConfig(workers=0), **QUIET)
    build_index(root / "emb", root / "index", IndexConfig(kind="flat", queries=20), progress=False)
    return root / "emb", root / "index"


def _search_key(index: Path, bundle: Path, key: str) -> dict:
    result = CliRunner().invoke(app, ["search", str(index), "--model", str(bundle), f"key:{key}", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[0])


def test_a_partial_re_embed_of_other_shards_withdraws_the_manifest_and_keys_still_find_themselves(
    bundle, fashion_shards, fashion_mnist_env, tmp_path
):
    from artifacts.embedding_set import EmbeddingSet, EmbeddingSetError
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest

    emb, index = _indexed_set(bundle, fashion_shards, tmp_path)
    key = EmbeddingSet(emb).keys_and_labels()[0][42]
    assert _search_key(index, bundle, key)["results"][0]["key"] == key
    other_shards = tmp_path / "other-shards"  # the 200 test images as two shards
    ingest("fashion-mnist:test", other_shards, IngestConfig(shard_size=100, workers=1), progress=False)
    other = embed(bundle, str(other_shards), emb, EmbedConfig(workers=0, shard_index=0, num_shards=2), **QUIET)
    assert other.parts_written == 1 and not other.complete  # part 0 now holds test images, parts 1-2 train images
    assert not (emb / MANIFEST).exists()
    with pytest.raises(EmbeddingSetError, match="not a complete embedding set"):
        EmbeddingSet(emb)
    best = _search_key(index, bundle, key)["results"][0]  # the vector comes from the index itself now
    assert best["key"] == key and best["score"] == pytest.approx(1.0, abs=1e-4)


def test_a_part_replaced_behind_the_manifests_back_is_refused_on_read(
    bundle, fashion_shards, fashion_test_shards, tmp_path
):
    from artifacts.embedding_set import EmbeddingSet, EmbeddingSetError

    emb = tmp_path / "emb"
    embed(bundle, str(fashion_shards), emb, EmbedConfig(workers=0), **QUIET)
    embed(bundle, str(fashion_test_shards), tmp_path / "other", EmbedConfig(workers=0), **QUIET)
    manifest = (emb / MANIFEST).read_bytes()
    for suffix in (".npy", ".json"):  # what a writer that never withdrew the manifest left behind
        name = f"{part_name(0)}{suffix}"
        (emb / name).write_bytes((tmp_path / "other" / name).read_bytes())
    record = json.loads((emb / f"{part_name(0)}.json").read_text())
    matrix = np.load(emb / f"{part_name(0)}.npy")[:250]
    (emb / f"{part_name(0)}.json").write_text(json.dumps({**record, "count": 250, "keys": (record["keys"] * 2)[:250]}))
    np.save(emb / f"{part_name(0)}.npy", np.concatenate([matrix, matrix])[:250])  # even the row count agrees
    assert (emb / MANIFEST).read_bytes() == manifest
    with pytest.raises(EmbeddingSetError, match=r"was embedded from .*fashion-test"):
        EmbeddingSet(emb).rows(np.array([0]))
    with pytest.raises(EmbeddingSetError, match="was embedded from"):
        EmbeddingSet(emb).keys_and_labels()
    train_record = json.loads((tmp_path / "other" / f"{part_name(0)}.json").read_text())
    (emb / f"{part_name(0)}.json").write_text(
        json.dumps({**record, "source": str(sorted(fashion_shards.glob("*.tar"))[0]), "count": 250,
                    "keys": [f"x{row}" for row in range(250)], "labels": train_record["labels"][:1] * 250})
    )  # fmt: skip
    with pytest.raises(EmbeddingSetError, match="keys differ"):
        EmbeddingSet(emb).rows(np.array([0]))
    assert EmbeddingSet(emb).rows(np.array([300])).shape == (1, ModelBundle(bundle).dim)  # the other parts read


def test_a_re_embed_killed_after_its_first_part_leaves_no_complete_set(
    bundle, fashion_shards, fashion_test_shards, tmp_path
):
    from artifacts.embedding_set import EmbeddingSet, EmbeddingSetError

    emb = tmp_path / "emb"
    embed(bundle, str(fashion_shards), emb, EmbedConfig(workers=0), **QUIET)
    args = [sys.executable, "-c", KILLED_AFTER_FIRST_PART, str(bundle), str(fashion_test_shards), str(emb)]
    killed = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_part(emb, 0)[1]["source"].startswith(str(fashion_test_shards))  # the replaced part landed
    with pytest.raises(EmbeddingSetError, match="not a complete embedding set"):
        EmbeddingSet(emb)


@pytest.mark.parametrize("name", [f"{part_name(0)}.json", f"{part_name(0)}.npy"])
@pytest.mark.parametrize("special", ["fifo", "dev-zero"])
def test_special_files_named_like_parts_are_not_done_and_never_block(
    bundle, fashion_test_shards, tmp_path, name, special
):
    out = tmp_path / "emb"
    out.mkdir()
    if special == "fifo":
        os.mkfifo(out / name)
    else:
        (out / name).symlink_to("/dev/zero")
    result = embed(bundle, str(fashion_test_shards), out, EmbedConfig(workers=0), **QUIET)
    assert result.parts_written == 1 and result.complete
    assert (out / name).is_file() and not (out / name).is_symlink()


def test_key_vectors_come_from_the_indexed_set_opened_once_until_its_manifest_changes(
    bundle, fashion_shards, tmp_path, monkeypatch
):
    import artifacts.embedding_set as contract
    from artifacts.index_bundle import IndexBundle

    emb, index_path = _indexed_set(bundle, fashion_shards, tmp_path)
    index = IndexBundle(index_path)
    opened: list[object] = []
    real_init = contract.EmbeddingSet.__init__

    def counting_init(self, path) -> None:
        opened.append(path)
        real_init(self, path)

    embeddings = contract.EmbeddingSet(emb)
    row_of = {key: row for row, key in enumerate(embeddings.keys_and_labels()[0])}
    monkeypatch.setattr(contract.EmbeddingSet, "__init__", counting_init)
    for key in index.keys[:20]:  # a key search parses no JSON once the set is open
        np.testing.assert_array_equal(index.vector_of(key), embeddings.rows(np.array([row_of[key]]))[0])
    assert len(opened) == 1
    manifest = json.loads((emb / MANIFEST).read_text())
    (emb / MANIFEST).write_text(json.dumps({**manifest, "note": "rewritten"}))  # no longer the set indexed
    assert index._indexed_embeddings() is None and len(opened) == 2
    assert index.vector_of(index.keys[0]).shape == (ModelBundle(bundle).dim,)  # from the index itself
