"""`mocoplus index --update`: new vectors added, removed ones never returned, re-tuned, written as a new version.

Embedding sets here grow the way `mocoplus embed` grows one after `ingest
--update`: new parts appended, each part's removed keys listed in the manifest
(written with the embedding set's own writers).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_index import QUIET, low_dimensional, naive_top
from test_killed_runs import hidden, killed, mocoplus

from artifacts.embedding_set import EMBEDDINGS_MANIFEST, EmbeddingSet, grow_embedding_set, write_embedding_set
from artifacts.index_bundle import IndexBundle, IndexBundleError
from artifacts.versions import CURRENT, VersionError, current_version, versions
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig
from pipeline.index.update import update_index

MODEL = "a" * 64


class GrowingSet:
    """An embedding set of unit vectors, keys ``v0``, ``v1``, ...; `grow` adds a part and removes keys."""

    def __init__(self, folder, count: int, parts: int = 2, seed: int = 0) -> None:
        self.folder = folder
        self.pool = low_dimensional(20_000, seed=seed)
        self.vectors = {f"v{row}": self.pool[row] for row in range(count)}
        self.next = count
        write_embedding_set(folder, self.pool[:count], bundle_hash=MODEL, parts=parts)

    def grow(self, added: int, removed: list[str], replaced: list[str] = ()) -> None:
        """A new part of ``added`` new vectors plus new vectors for the ``replaced`` keys; ``removed`` are gone."""
        keys = [f"v{row}" for row in range(self.next, self.next + added)] + list(replaced)
        fresh = self.pool[self.next : self.next + len(keys)]
        self.next += len(keys)
        grow_embedding_set(self.folder, fresh, removed=[*removed, *replaced], keys=keys)
        for key in [*removed, *replaced]:
            del self.vectors[key]
        self.vectors.update(zip(keys, fresh, strict=True))

    def live(self) -> tuple[list[str], np.ndarray]:
        keys = sorted(self.vectors, key=lambda key: int(key[1:]))
        return keys, np.stack([self.vectors[key] for key in keys])


def hits(bundle: IndexBundle, queries: np.ndarray, k: int = 10) -> list[list[str]]:
    return [[hit.key for hit in row] for row in bundle.search(queries, k)]


@pytest.mark.parametrize(("kind", "shards"), [("flat", 1), ("hnsw", 1), ("ivf", 1), ("ivf", 3), ("ivfpq", 1)], ids=str)
def test_an_update_adds_the_new_vectors_and_never_returns_a_removed_one(kind, shards, tmp_path):
    grown = GrowingSet(tmp_path / "emb", 3000)
    config = IndexConfig(kind=kind, queries=200, num_shards=shards)
    first = build_index(grown.folder, tmp_path / "index", config, **QUIET).info
    removed, replaced = [f"v{row}" for row in range(0, 3000, 20)], ["v7", "v1001"]
    old_vectors = np.stack([grown.vectors[key] for key in [*removed, *replaced]])
    grown.grow(300, removed, replaced)

    info = update_index(grown.folder, tmp_path / "index", **QUIET).info  # with the options v1 was built with

    assert info["index_version"] == 2 and current_version(tmp_path / "index") == 2
    assert versions(tmp_path / "index") == [1, 2]
    assert "reason" not in info["trained"] and info["update"]["added"] == 302
    assert info["update"]["removed"] == len(removed) + len(replaced)
    assert info["trained"]["added_since"] == 302
    recall, before = info["recall_at_k"], first["recall_at_k"]  # IVF-PQ's codes never reach 0.95: it holds its best
    assert recall["target_met"] if before["target_met"] else recall["recall"] >= before["recall"] - 0.02
    keys, _ = grown.live()
    bundle = IndexBundle(tmp_path / "index")
    assert bundle.count == info["count"] == len(keys) == 3000 - len(removed) + 300
    gone = set(removed)
    assert not any(gone & set(row) for row in hits(bundle, old_vectors, 50))  # not even for their own vectors
    new_keys = [f"v{row}" for row in range(3000, 3300)] + replaced
    new_vectors = np.stack([grown.vectors[key] for key in new_keys])
    found = hits(bundle, new_vectors, 10)
    first_hits = np.mean([row[0] == key for row, key in zip(found, new_keys, strict=True)])
    assert first_hits >= (0.9 if kind == "ivfpq" else 0.99), first_hits
    for key in replaced:  # a key search uses the replacing vector
        np.testing.assert_allclose(bundle.vector_of(key), grown.vectors[key], atol=1e-6 if kind != "ivfpq" else 1)
    for key in removed[:3]:
        with pytest.raises(KeyError):
            bundle.id_of(key)
    assert IndexBundle(tmp_path / "index", version=1).count == first["count"] == 3000


def test_an_updated_exact_index_answers_as_a_build_from_scratch(tmp_path):
    grown = GrowingSet(tmp_path / "emb", 2000)
    config = IndexConfig(kind="flat", queries=100)
    build_index(grown.folder, tmp_path / "index", config, **QUIET)
    grown.grow(150, [f"v{row}" for row in range(5, 2000, 13)], ["v3", "v400"])
    grown.grow(100, [f"v{row}" for row in range(2000, 2150, 7)], ["v2001"])
    update_index(grown.folder, tmp_path / "index", **QUIET)
    update_index(grown.folder, tmp_path / "index", **QUIET)  # a rerun: up to date, no third version
    assert versions(tmp_path / "index") == [1, 2]
    grown.grow(10, ["v1"])
    update_index(grown.folder, tmp_path / "index", **QUIET)
    scratch = build_index(grown.folder, tmp_path / "scratch", config, **QUIET)

    queries = low_dimensional(40, seed=9)
    updated, fresh = IndexBundle(tmp_path / "index"), IndexBundle(scratch.out_dir)
    keys, live = grown.live()
    expected = [[keys[i] for i in row] for row in naive_top(live, queries, 10)]
    assert hits(updated, queries) == hits(fresh, queries) == expected
    scores = [[hit.score for hit in row] for row in updated.search(queries, 10)]
    np.testing.assert_allclose(scores, [[hit.score for hit in row] for row in fresh.search(queries, 10)], rtol=1e-5)


def test_the_quantizer_is_retrained_once_the_additions_pass_half_and_the_update_says_why(tmp_path):
    grown = GrowingSet(tmp_path / "emb", 2000)
    config = IndexConfig(kind="ivf", queries=100)
    build_index(grown.folder, tmp_path / "index", config, **QUIET)
    grown.grow(600, [])
    second = update_index(grown.folder, tmp_path / "index", **QUIET).info
    assert "reason" not in second["trained"] and second["trained"]["added_since"] == 600
    grown.grow(600, ["v0"])
    third = update_index(grown.folder, tmp_path / "index", **QUIET).info

    assert "1,200 vectors added since the quantizer was trained on 2,000" in third["trained"]["reason"]
    assert third["trained"] == {"count": 3199, "added_since": 0, "reason": third["trained"]["reason"]}
    assert not (tmp_path / "index" / "v000003" / "deleted.npy").exists()  # a rebuild compacts the removed away
    assert IndexBundle(tmp_path / "index").count == 3199


def test_versions_beyond_keep_are_removed_and_an_old_version_stays_searchable(tmp_path):
    grown = GrowingSet(tmp_path / "emb", 1000)
    config = IndexConfig(kind="flat", queries=50)
    build_index(grown.folder, tmp_path / "index", config, **QUIET)
    for day in range(3):
        grown.grow(20, [f"v{day}"])
        update_index(grown.folder, tmp_path / "index", keep=2, **QUIET)

    assert versions(tmp_path / "index") == [3, 4] and os.readlink(tmp_path / "index" / CURRENT) == "v000004"
    assert hidden(tmp_path / "index") == []
    old = IndexBundle(tmp_path / "index", version=3)
    assert old.count == 1000 + 40 - 2 and IndexBundle(tmp_path / "index").count == 1000 + 60 - 3
    with pytest.raises(VersionError, match=r"no version 1 \(versions kept: 3, 4\)"):
        IndexBundle(tmp_path / "index", version=1)
    code = mocoplus("search", str(tmp_path / "index"), "--model", "x", "key:v1", "--version", "1")
    assert code.returncode == 1 and code.stderr.count("\n") == 1


def test_an_update_refuses_another_models_vectors_and_a_re_embedded_set(tmp_path):
    grown = GrowingSet(tmp_path / "emb", 500)
    config = IndexConfig(kind="flat", queries=50)
    build_index(grown.folder, tmp_path / "index", config, **QUIET)
    other = write_embedding_set(tmp_path / "other", low_dimensional(600, seed=2), bundle_hash="b" * 64)
    with pytest.raises(IndexBundleError, match="a new model gets a new index"):
        update_index(other, tmp_path / "index", **QUIET)
    shuffled = write_embedding_set(tmp_path / "shuffled", low_dimensional(600, seed=2), bundle_hash=MODEL, parts=2)
    with pytest.raises(IndexBundleError, match="build a new index without --update"):
        update_index(shuffled, tmp_path / "index", **QUIET)
    with pytest.raises(FileExistsError, match="pass --update"):
        build_index(shuffled, tmp_path / "index", config, **QUIET)
    assert versions(tmp_path / "index") == [1]


@pytest.mark.parametrize("function", ["write_index_files", "switch_current"])
def test_a_killed_update_leaves_the_current_version_and_its_rerun_finishes(function, tmp_path):
    grown = GrowingSet(tmp_path / "emb", 1500)
    build_index(grown.folder, tmp_path / "index", IndexConfig(kind="hnsw", queries=50), **QUIET)
    grown.grow(100, ["v3", "v4"])
    args = ["index", str(grown.folder), "--out", str(tmp_path / "index"), "--kind", "hnsw", "--queries", "50"]

    killed("pipeline.index.update", function, 1, *args, "--update", "--no-progress")

    reader = IndexBundle(tmp_path / "index")
    assert reader.version == (2 if function == "switch_current" else 1)
    done = mocoplus(*args, "--update", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert ("already up to date" in done.stdout) == (function == "switch_current")
    assert current_version(tmp_path / "index") == 2 and hidden(tmp_path / "index") == []
    assert IndexBundle(tmp_path / "index").count == 1500 + 100 - 2
    manifest = json.loads((grown.folder / EMBEDDINGS_MANIFEST).read_text())
    assert EmbeddingSet(grown.folder).live_count == manifest["live"] == 1598


def test_an_update_keeps_the_bundles_options_and_a_changed_one_rebuilds(tmp_path):
    grown = GrowingSet(tmp_path / "emb", 1000)
    first = build_index(grown.folder, tmp_path / "index", IndexConfig(kind="hnsw", queries=50), **QUIET).info
    grown.grow(5, ["v1"])

    second = update_index(grown.folder, tmp_path / "index", **QUIET).info  # no --kind: the bundle's hnsw stays

    assert second["index_kind"] == "hnsw" and "reason" not in second["trained"]
    assert second["search"] == first["search"]  # 5 new vectors are too few to tune on: the setting stands
    assert second["recall_at_k"]["held_out"].startswith("kept from version 1")
    third = update_index(grown.folder, tmp_path / "index", {"target_recall": 0.99}, **QUIET).info
    assert third["trained"]["reason"] == "options changed (target_recall 0.95 → 0.99)"
    assert third["recall_at_k"]["target"] == 0.99 and third["recall_at_k"]["recall"] >= 0.99
