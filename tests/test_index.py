"""Index and search: real shards → bundle → embeddings → FAISS index → `mocoplus search`, and the pieces.

Recall is checked against a naive numpy brute-force search, not FAISS's own
exact search, and the index plan against the rule as the docs state it.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from artifacts.embedding_set import EmbeddingSet, EmbeddingSetError, write_embedding_set
from artifacts.id_map import ID_MAP_FILES
from artifacts.index_bundle import INDEX_JSON, IndexBundle, IndexBundleError
from artifacts.model_bundle import ModelBundle
from flows.cli.main import app
from pipeline.embed.config import EmbedConfig
from pipeline.embed.embed import embed
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig
from pipeline.index.plan import FLAT_MAX, HNSW_BUILD_EFFORT, HNSW_MAX, list_count, plan_index
from pipeline.index.tune import recall_at_k, tune

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def embeddings(bundle, fashion_shards, tmp_path_factory) -> Path:
    """The 600-image train slice embedded by the test bundle: 3 parts."""
    out = tmp_path_factory.mktemp("index") / "emb"
    embed(bundle, str(fashion_shards), out, EmbedConfig(workers=0), **QUIET)
    return out


@pytest.fixture(scope="module")
def image_files(fashion_shards, tmp_path_factory) -> dict[str, Path]:
    """Every corpus image as a PNG file (the bytes the shards hold), by key."""
    folder = tmp_path_factory.mktemp("images")
    files = {}
    for shard in sorted(Path(fashion_shards).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    key = member.name.removesuffix(".png")
                    path = folder / member.name
                    path.write_bytes(tar.extractfile(member).read())
                    files[key] = path
    return files


def low_dimensional(n: int, d: int = 32, intrinsic: int = 6, seed: int = 0) -> np.ndarray:
    """Unit vectors near a random ``intrinsic``-dimensional subspace: shaped like real embeddings."""
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((n, intrinsic)) @ rng.standard_normal((intrinsic, d))
    vectors = codes + 0.05 * rng.standard_normal((n, d))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def naive_top(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :k]


def search_json(*args: str) -> tuple[int, list[dict]]:
    result = CliRunner().invoke(app, ["search", *args, "--json"])
    return result.exit_code, [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# --- end to end -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_every_corpus_image_searched_by_its_file_comes_back_first(kind, bundle, embeddings, image_files, tmp_path):
    out = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", str(embeddings), "--out", str(out), "--kind", kind, "--no-progress"])
    assert result.exit_code == 0, result.output
    keys = sorted(image_files)
    code, answers = search_json(str(out), "--model", str(bundle), *[str(image_files[key]) for key in keys], "-k", "3")
    assert code == 0 and len(answers) == len(keys) == 600
    for key, answer in zip(keys, answers, strict=True):
        assert answer["query"] == str(image_files[key])
        assert answer["results"][0]["key"] == key
        assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3]
        scores = [hit["score"] for hit in answer["results"]]
        assert scores == sorted(scores, reverse=True)


def test_search_shows_class_names_in_its_table_and_both_forms_in_json(bundle, embeddings, tmp_path):
    from pipeline.data.fashion_mnist import CLASS_NAMES

    build_index(embeddings, tmp_path / "index", IndexConfig(kind="flat"), **QUIET)
    keys, labels = EmbeddingSet(embeddings).keys_and_labels()
    key, label = keys[0], int(labels[0])
    code, answers = search_json(str(tmp_path / "index"), "--model", str(bundle), f"key:{key}", "-k", "1")
    assert code == 0 and answers[0]["results"][0] | {"score": None} == {
        "rank": 1, "key": key, "label": label, "label_name": CLASS_NAMES[label], "score": None
    }  # fmt: skip
    table = CliRunner().invoke(
        app, ["search", str(tmp_path / "index"), "--model", str(bundle), f"key:{key}", "-k", "1"]
    )
    row = next(line for line in table.stdout.splitlines() if key in line and f"key:{key}" not in line)
    assert CLASS_NAMES[label] in row and f" {label} " not in row


def test_index_json_describes_the_bundle(bundle, embeddings, tmp_path):
    info = build_index(embeddings, tmp_path / "index", IndexConfig(kind="hnsw", queries=200), **QUIET).info
    assert info["factory"] == "HNSW32,Flat" and info["metric"] == "ip" and info["count"] == 600
    graph = faiss.downcast_index(faiss.read_index(str(tmp_path / "index" / "current" / "index.faiss"))).hnsw
    assert graph.efConstruction == HNSW_BUILD_EFFORT  # a better graph than faiss's default 40 (plan.py)
    assert info["bundle_hash"] == ModelBundle(bundle).hash
    assert info["search"] == {"parameter": "efSearch", "params": {"efSearch": info["search"]["params"]["efSearch"]}}
    report = info["recall_at_k"]
    assert report["queries"] == 60  # a tenth of the set at most is held out
    assert report["k"] == 10 and report["recall"] >= 0.95 and report["qps"] > 0
    assert info["build"]["total_seconds"] >= info["build"]["add_seconds"] >= 0
    assert sorted(path.name for path in (tmp_path / "index" / "current").iterdir()) == sorted(
        ["index.faiss", INDEX_JSON, *ID_MAP_FILES]
    )
    assert info["bytes"] == (tmp_path / "index" / "current" / "index.faiss").stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_tuned_recall_against_naive_exact_search_reaches_the_target(kind, tmp_path):
    n = 6_000 if kind == "ivfpq" else 12_000  # OPQ training is the slow part
    vectors = low_dimensional(n + 300)
    corpus, queries = vectors[:n], vectors[n:]  # queries from the same distribution, never indexed
    emb = write_embedding_set(tmp_path / "emb", corpus, bundle_hash="a" * 64, parts=3)
    target = 0.85 if kind == "ivfpq" else 0.95  # 16 bytes for 32 dims: PQ itself stops short of 0.9
    info = build_index(emb, tmp_path / "index", IndexConfig(kind=kind, target_recall=target, queries=300), **QUIET).info
    assert info["index_kind"] == kind and info["recall_at_k"]["target_met"]
    index = IndexBundle(tmp_path / "index")
    found = np.array([[index.rows[hit.id] for hit in row] for row in index.search(queries, 10)])
    assert recall_at_k(found, naive_top(corpus, queries, 10)) >= target - 0.03  # other queries than the tuner's


def test_a_smaller_search_parameter_misses_the_target_the_tuned_one_meets(tmp_path):
    emb = write_embedding_set(tmp_path / "emb", low_dimensional(12_000), bundle_hash="a" * 64)
    info = build_index(emb, tmp_path / "index", IndexConfig(kind="ivf", queries=300), **QUIET).info
    probes = {probe["value"]: probe["recall"] for probe in info["recall_at_k"]["probes"]}
    chosen = info["search"]["params"]["nprobe"]
    assert probes[chosen] >= 0.95 and chosen > 1
    assert all(recall < 0.95 for value, recall in probes.items() if value < chosen)


def test_l2_metric_scores_are_negated_squared_distances(tmp_path):
    vectors = low_dimensional(500)
    emb = write_embedding_set(tmp_path / "emb", vectors, bundle_hash="a" * 64, parts=3)
    build_index(emb, tmp_path / "index", IndexConfig(metric="l2", queries=50), **QUIET)
    index = IndexBundle(tmp_path / "index")
    hits = index.search(vectors[:1] * 0.5, 3)[0]
    expected = -((vectors - vectors[:1] * 0.5) ** 2).sum(axis=1)
    assert [index.rows[hit.id] for hit in hits] == list(np.argsort(-expected)[:3])
    np.testing.assert_allclose([hit.score for hit in hits], np.sort(expected)[::-1][:3], rtol=1e-5)


# --- sharded builds --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "budget", "merge"), [("ivf", 1 << 30, "memory"), ("ivf", 4096, "disk"), ("ivfpq", 1 << 30, "memory")]
)
def test_sharded_build_and_merge_answers_as_one_build(kind, budget, merge, tmp_path):
    vectors = low_dimensional(3_000, seed=3)
    emb = write_embedding_set(tmp_path / "emb", vectors, bundle_hash="a" * 64, parts=4)
    config = IndexConfig(kind=kind, queries=100, memory_budget=budget if kind == "ivf" else 1 << 30)
    one = build_index(emb, tmp_path / "one", config, **QUIET).info
    sharded = build_index(emb, tmp_path / "sharded", IndexConfig(**{**config.__dict__, "num_shards": 3}), **QUIET).info
    assert sharded["build"]["merge"] == merge and sharded["count"] == one["count"] == 3000
    assert (tmp_path / "sharded" / "current" / "index.ivfdata").exists() == (merge == "disk")
    shutil.move(tmp_path / "sharded", tmp_path / "moved")  # an on-disk index finds its .ivfdata beside it
    queries = vectors[::47] + 0.01
    first, second = IndexBundle(tmp_path / "one"), IndexBundle(tmp_path / "moved")
    first.set_search_parameter(8)
    second.set_search_parameter(8)
    a, b = first.search(queries, 10), second.search(queries, 10)
    assert [[hit.id for hit in row] for row in a] == [[hit.id for hit in row] for row in b]
    np.testing.assert_allclose(
        [[hit.score for hit in row] for row in a], [[hit.score for hit in row] for row in b], rtol=1e-6
    )
    assert not [path for path in (tmp_path / "moved").iterdir() if path.name.startswith(("shard-", "trained"))]


def test_a_sharded_build_needs_an_ivf_index(tmp_path):
    emb = write_embedding_set(tmp_path / "emb", low_dimensional(300), bundle_hash="a" * 64)
    with pytest.raises(ValueError, match="needs an IVF index"):
        build_index(emb, tmp_path / "index", IndexConfig(kind="hnsw", num_shards=2), **QUIET)


# --- the plan ---------------------------------------------------------------------------------------------


def test_auto_follows_the_documented_rule():
    gib = 1 << 30
    assert plan_index(FLAT_MAX, 128).kind == "flat"
    assert plan_index(FLAT_MAX + 1, 128).kind == "hnsw"
    assert plan_index(HNSW_MAX, 128).kind == "hnsw"
    graph_too_big = plan_index(HNSW_MAX, 128, memory_budget=HNSW_MAX * 600)  # vectors fit, the graph not
    assert graph_too_big.kind == "ivf" and graph_too_big.reason.startswith("HNSW's vectors + graph exceed")
    assert plan_index(HNSW_MAX + 1, 128).reason.startswith(f"{HNSW_MAX + 1:,} vectors > {HNSW_MAX:,}")
    assert plan_index(1_000_000, 128, memory_budget=4 * gib).factory == "HNSW32,Flat"
    ivf = plan_index(3_000_000, 128, memory_budget=4 * gib)
    assert (ivf.kind, ivf.factory, ivf.train_size) == ("ivf", "IVF8192,Flat", 64 * 8192)  # 4√3M ≈ 6,928 → 2^13
    pq = plan_index(1_000_000, 128, memory_budget=64 << 20)
    # 1M × (64 + 8) bytes exceed 64 MiB, 48 and 56 do not divide 128: 32 bytes a vector
    assert pq.kind == "ivfpq" and pq.factory == "OPQ32,IVF4096,PQ32np"
    assert pq.estimated_bytes <= 64 << 20 + 4 * 128 * 4096


def test_plan_errors_say_what_to_change():
    with pytest.raises(ValueError, match="raise --memory-budget to at least 12,000,000"):
        plan_index(1_000_000, 128, kind="ivfpq", memory_budget=1 << 20)
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        plan_index(10, 8, kind="lsh")
    with pytest.raises(ValueError, match="not divisible"):
        plan_index(10, 7, kind="ivfpq")


@pytest.mark.parametrize("n", [1, 100, 5_000, 60_000, 1_000_000, 10**9])
def test_list_count_is_a_power_of_two_near_4_sqrt_n_with_39_per_list(n):
    nlist = list_count(n)
    assert nlist & (nlist - 1) == 0 and 1 <= nlist <= 65536
    assert nlist == 1 or n >= 39 * nlist
    if 39 * 4 * np.sqrt(n) < n and nlist < 65536:
        assert 4 * np.sqrt(n) / 2 <= nlist <= 4 * np.sqrt(n) * 2


# --- tuning and recall ------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 2, 3, 7, 33, 64, 100])
def test_tune_finds_the_smallest_value_reaching_the_target(threshold):
    def recall_of(value: int) -> float:  # monotone, reaching 0.95 at `threshold`
        return 0.95 if value >= threshold else 0.5 + value / 1000

    result = tune(recall_of, "nprobe", start=1, limit=64, target=0.95)
    best = max(recall_of(value) for value in range(1, 65))
    goal = 0.95 if best >= 0.95 else best - 0.005  # unreachable: the knee
    naive = next(value for value in range(1, 65) if recall_of(value) >= goal)
    assert result.value == naive and result.reached == (threshold <= 64)


def test_recall_at_k_matches_a_hand_count():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 9, 1], [-1, -1, 4]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_an_unreachable_target_settles_at_the_knee_not_the_limit():
    def recall_of(value: int) -> float:  # saturates at 0.9 from 12 on
        return min(0.9, 0.5 + value / 30)

    result = tune(recall_of, "nprobe", start=1, limit=1024, target=0.95)
    assert not result.reached and result.value == 12  # the smallest within 0.005 of the best (0.9)


def test_the_search_upwards_stops_at_a_plateau_not_at_an_exhaustive_scan():
    asked = []

    def recall_of(value: int) -> float:  # saturates at 0.9 from 12 on; nlist 16,384 would be a full scan
        asked.append(value)
        return min(0.9, 0.5 + value / 30)

    result = tune(recall_of, "nprobe", start=1, limit=16384, target=0.95)
    assert result.value == 12 and max(asked) == 64  # 16 → 32 → 64 gained nothing twice: no 128, ..., 16,384


# --- guards and bad input ---------------------------------------------------------------------------------


def test_search_refuses_an_index_built_with_another_model(bundle, embeddings, tmp_path):
    build_index(embeddings, tmp_path / "index", IndexConfig(queries=50), **QUIET)
    info_path = tmp_path / "index" / "current" / INDEX_JSON
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "bundle_hash": "f" * 64}))
    result = CliRunner().invoke(app, ["search", str(tmp_path / "index"), "--model", str(bundle), "key:x"])
    assert result.exit_code == 1
    assert "was built from embeddings of model bundle ffffffffffff" in result.stderr
    with pytest.raises(IndexBundleError, match="not be comparable"):
        IndexBundle(tmp_path / "index").check_model(ModelBundle(bundle).hash)


def test_bad_queries_are_reported_one_by_one_and_the_good_ones_answered(bundle, embeddings, image_files, tmp_path):
    build_index(embeddings, tmp_path / "index", IndexConfig(queries=50), **QUIET)
    good_key = sorted(image_files)[5]
    (tmp_path / "notes.txt").write_text("not an image")
    png = image_files[good_key].read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    np.save(tmp_path / "wrong-dim.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "nan.npy", np.full(ModelBundle(bundle).dim, np.nan, np.float32))
    np.save(tmp_path / "two.npy", np.load(Path(embeddings) / "part-000000.npy")[:2])
    queries = ["missing.png", str(tmp_path / "notes.txt"), str(tmp_path / "cut.png"), "key:nope", str(tmp_path),
               str(tmp_path / "wrong-dim.npy"), str(tmp_path / "nan.npy"), f"key:{good_key}",
               str(image_files[good_key]), str(tmp_path / "two.npy")]  # fmt: skip
    code, answers = search_json(str(tmp_path / "index"), "--model", str(bundle), *queries, "-k", "2")
    assert code == 1
    errors = {answer["query"]: answer["error"] for answer in answers if "error" in answer}
    dim = ModelBundle(bundle).dim
    assert "not a recognised image" in errors.pop(str(tmp_path / "notes.txt"))
    assert "truncated" in errors.pop(str(tmp_path / "cut.png"))
    assert errors == {
        "missing.png": "no such file",
        "key:nope": f"no sample with key 'nope' in index {tmp_path / 'index'}",
        str(tmp_path): "is a folder, not a file",
        str(tmp_path / "wrong-dim.npy"): f"vectors must be [{dim}] or [N, {dim}] for this index; got [2, 3]",
        str(tmp_path / "nan.npy"): "vector contains NaN or infinity",
    }
    answered = [answer for answer in answers if "results" in answer]
    assert [answer["query"] for answer in answered] == [
        f"key:{good_key}",
        str(image_files[good_key]),
        f"{tmp_path / 'two.npy'}[0]",
        f"{tmp_path / 'two.npy'}[1]",
    ]
    assert answered[0]["results"][0]["key"] == answered[1]["results"][0]["key"] == good_key


def test_search_parameter_overrides_are_checked(bundle, embeddings, tmp_path):
    build_index(embeddings, tmp_path / "flat", IndexConfig(kind="flat", queries=50), **QUIET)
    result = CliRunner().invoke(app, ["search", str(tmp_path / "flat"), "--model", str(bundle), "key:x", "--ef", "8"])
    assert result.exit_code == 1 and "--ef applies to HNSW indexes" in result.stderr
    build_index(embeddings, tmp_path / "ivf", IndexConfig(kind="ivf", queries=50), **QUIET)
    key = IndexBundle(tmp_path / "ivf").keys[0]
    code, answers = search_json(str(tmp_path / "ivf"), "--model", str(bundle), f"key:{key}", "--nprobe", "1", "-k", "1")
    assert code == 0 and answers[0]["results"][0]["key"] == key


def test_index_refuses_incomplete_sets_used_folders_and_impossible_budgets(embeddings, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(embeddings, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(EmbeddingSetError, match="not a complete embedding set"):
        build_index(partial, tmp_path / "a", **QUIET)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_index(embeddings, tmp_path / "used", **QUIET)
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(
        app, ["index", str(embeddings), "--out", str(tmp_path / "b"), "--kind", "ivfpq", "--memory-budget", "1k"]
    )
    assert result.exit_code == 1 and "raise --memory-budget" in result.stderr
    assert not (tmp_path / "b").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_damaged_index_bundles_fail_in_one_line(embeddings, tmp_path):
    build_index(embeddings, tmp_path / "index", IndexConfig(queries=50), **QUIET)
    current = tmp_path / "index" / "current"
    np.save(current / "labels.npy", np.zeros(3, dtype=np.int64))  # fewer labels than keys
    with pytest.raises(IndexBundleError, match="the bundle is damaged"):
        IndexBundle(tmp_path / "index")
    (current / "labels.npy").write_bytes(b"not an array")
    with pytest.raises(IndexBundleError, match=r"labels\.npy: not a valid \.npy file"):
        IndexBundle(tmp_path / "index")
    (tmp_path / "index" / "current" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexBundleError, match="not a readable FAISS index"):
        IndexBundle(tmp_path / "index")
    with pytest.raises(IndexBundleError, match="not an index bundle"):
        IndexBundle(tmp_path)


def test_embedding_set_rows_and_chunks_agree_with_the_parts(tmp_path):
    vectors = low_dimensional(1000)
    emb = EmbeddingSet(write_embedding_set(tmp_path / "emb", vectors, bundle_hash="a" * 64, parts=3))
    ids = np.array([999, 0, 334, 333, 500])
    np.testing.assert_array_equal(emb.rows(ids), vectors[ids])
    order = np.array([5, 999, 0, 334, 333, 700])
    pieces = list(emb.ordered(order, rows=4, start=300))
    assert [first for first, _ in pieces] == [300, 304]
    np.testing.assert_array_equal(np.concatenate([block for _, block in pieces]), vectors[order])
    np.testing.assert_array_equal(np.concatenate([block for _, block in emb.chunks(rows=128)]), vectors)
    with pytest.raises(IndexError):
        emb.rows(np.array([1000]))


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss-gpu is installed")
def test_gpu_without_faiss_gpu_is_a_clear_error_not_a_cpu_run(embeddings, tmp_path):
    with pytest.raises(IndexBundleError, match="needs faiss-gpu"):
        build_index(embeddings, tmp_path / "index", IndexConfig(gpu=True), **QUIET)
    assert not (tmp_path / "index").exists()
    build_index(embeddings, tmp_path / "index", IndexConfig(queries=50), **QUIET)
    with pytest.raises(IndexBundleError, match="needs faiss-gpu"):
        IndexBundle(tmp_path / "index", gpu=True)
