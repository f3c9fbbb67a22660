"""Prefect flows on tiny real data, against Prefect's test harness (a temporary local API)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.embed.config import EmbedConfig
from pipeline.embed.embed import embed
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.mark.slow
def test_index_corpus_embeds_in_shares_indexes_and_skips_what_is_done(bundle, fashion_shards, tmp_path):
    from flows.index_corpus import index_corpus

    first = index_corpus(str(bundle), str(fashion_shards), str(tmp_path / "out"), shares=2)
    assert first["samples_embedded_now"] == 600 and first["recall"] >= 0.95
    sequential = tmp_path / "sequential"
    embed(bundle, str(fashion_shards), sequential, EmbedConfig(workers=0), progress=False)
    for part in sorted(sequential.glob("part-*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "embeddings" / part.name), np.load(part))
    info_before = (tmp_path / "out" / "index" / "current" / "index.json").read_text()
    again = index_corpus(str(bundle), str(fashion_shards), str(tmp_path / "out"), shares=2)
    assert again["samples_embedded_now"] == 0  # every part was done
    assert (tmp_path / "out" / "index" / "current" / "index.json").read_text() == info_before  # the index was kept
    assert json.loads(info_before)["count"] == 600


def test_a_task_that_fails_once_is_retried_and_the_flow_completes(bundle, fashion_test_shards, tmp_path, monkeypatch):
    import pipeline.embed.embed as stage
    from flows import index_corpus as module

    real, calls = stage.embed, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("transient: the shared folder went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "embed", flaky)
    monkeypatch.setattr(module, "embed_share", module.embed_share.with_options(retry_delay_seconds=0))
    result = module.index_corpus(str(bundle), str(fashion_test_shards), str(tmp_path / "out"), shares=1)
    assert len(calls) == 2 and result["samples_embedded_now"] == 200


@pytest.mark.slow
def test_pretrain_publishes_a_model_only_past_its_quality_gate(fashion_mnist_env, tmp_path):
    """A run too short to learn (3 steps of the tiny network: 46 % kNN-200 on the slice against 78 % for raw
    pixels) is exported as a candidate, scored, refused and left unpublished; the flow fails."""
    from test_train import TINY

    from artifacts.model_bundle import ModelBundle, read_model_json
    from artifacts.versions import current_version, versions
    from flows.pretrain import QualityGateError, pretrain

    root = tmp_path / "model"
    arguments = {
        "source": "fashion-mnist:train",
        "shards": str(tmp_path / "train-shards"),
        "run_dir": str(tmp_path / "run"),
        "model_dir": str(root),
        "eval_source": "fashion-mnist:test",
        "eval_shards": str(tmp_path / "test-shards"),
        "overrides": [*TINY, "train.max_steps=3"],
        "baselines": ["hog"],
        "linear_probe": False,
        "cache": str(tmp_path / "cache"),
    }
    with pytest.raises(QualityGateError, match="does not beat raw pixels"):
        pretrain(**arguments)
    assert versions(root, "model.json") == [1] and current_version(root) is None  # exported, not published
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics if "loss" in record] == [1, 2, 3]
    gate = _newest_artifact("pretrain-gate")
    assert "quality gate refused" in gate.data and "| pixels |" in gate.data and "| hog |" in gate.data

    ungated = pretrain(**arguments, gate=False)  # nothing retrained or re-exported: the same candidate, published
    assert ungated["gate"]["passed"] is False and versions(root, "model.json") == [1] and current_version(root) == 1
    assert ModelBundle(root).hash == read_model_json(root / "v000001")["bundle_hash"]
    assert [record["step"] for record in metrics if "loss" in record] == [1, 2, 3]

    second = {**arguments, "run_dir": str(tmp_path / "run-2"), "overrides": [*TINY, "train.max_steps=2"]}
    with pytest.raises(QualityGateError):  # a new run, scored beside the published model, refused
        pretrain(**second)
    assert versions(root, "model.json") == [1, 2] and current_version(root) == 1  # users keep the published one
    assert "| published `" in _newest_artifact("pretrain-gate").data


@pytest.mark.slow
def test_pretrain_gates_a_model_of_an_unlabelled_folder_without_labels(tmp_path):
    """A folder of photos without class folders and no held-out set: the kNN monitor is off, and the gate
    scores the candidate by recall of originals from altered views against raw pixels. Whether a half-minute
    model passes is not the point (it is close to pixels on default views): the decision follows the scores,
    and with the gate off the candidate is published either way."""
    from test_views import PHOTO_TINY

    from artifacts.versions import current_version
    from flows.pretrain import pretrain
    from pipeline.data.sample_photos import SamplePhotosConfig, write_sample_photos

    write_sample_photos(tmp_path / "photos", SamplePhotosConfig(per_photo=8, labelled=False))
    result = pretrain(
        source=str(tmp_path / "photos"), shards=str(tmp_path / "shards"), run_dir=str(tmp_path / "run"),
        model_dir=str(tmp_path / "model"), config="photos-cpu", overrides=PHOTO_TINY, cache=str(tmp_path / "cache"),
        gate=False,
    )  # fmt: skip
    evaluation, gate = result["evaluation"], result["gate"]
    beats_pixels = evaluation["model"]["recall"][10] > evaluation["pixels"]["recall"][10]
    assert gate["labels"] is False and gate["passed"] is beats_pixels
    assert evaluation["corpus"] == 152 and evaluation["sample"] == 152 and evaluation["against"] is None
    assert current_version(tmp_path / "model") == 1
    assert not any("knn_top1" in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    artifact = _newest_artifact("pretrain-gate").data
    assert "label-free quality gate" in artifact and "| pixels |" in artifact and "| candidate |" in artifact


def _newest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda artifact: artifact.created)


@pytest.mark.slow
def test_end_to_end_chains_pretrain_index_and_a_search(fashion_mnist_env, tmp_path):
    from test_train import TINY

    from flows.end_to_end import end_to_end

    # the tiny network cannot beat raw pixels in 2 steps: the gate is off to see the chain's mechanics
    result = end_to_end(str(tmp_path / "e2e"), overrides=[*TINY, "train.max_steps=2"], shares=2, gate=False)
    assert (
        result["index"]["recall"] >= 0.95
        and (tmp_path / "e2e" / "corpus" / "index" / "current" / "index.json").is_file()
    )
    neighbours = result["search"]["neighbours"]
    assert len(neighbours) == 8 and neighbours[0]["score"] >= neighbours[-1]["score"]
    assert all(hit["key"].startswith("train") for hit in neighbours)  # the corpus is the training set
    pictures = {
        "end-to-end-search": result["search"]["grid"],
        "pretrain-curves": result["pretrain"]["curves"],
        "index-corpus-map": result["index"]["map"],
    }
    assert pictures == {
        "end-to-end-search": str(tmp_path / "e2e" / "search-grid.png"),
        "pretrain-curves": str(tmp_path / "e2e" / "run" / "curves.png"),
        "index-corpus-map": str(tmp_path / "e2e" / "corpus" / "map.png"),
    }
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        published = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(pictures))))
    by_key = {artifact.key: artifact for artifact in sorted(published, key=lambda a: a.created)}  # newest wins
    assert set(by_key) == set(pictures)
    for key, path in pictures.items():  # each picture travels inside its artifact: the UI cannot read the disk
        assert by_key[key].type == "image"
        assert base64.b64decode(by_key[key].data.removeprefix("data:image/png;base64,")) == Path(path).read_bytes()


@pytest.mark.slow
def test_the_dask_path_with_two_local_workers_embeds_as_the_sequential_path(bundle, fashion_shards, tmp_path):
    from flows.index_corpus import with_dask

    result = with_dask(workers=2)(
        str(bundle), str(fashion_shards), str(tmp_path / "out"), shares=2, kind="ivf", index_shards=3, map_sample=0
    )
    assert result["samples_embedded_now"] == 600
    info = json.loads((tmp_path / "out" / "index" / "current" / "index.json").read_text())
    writers = {part["writer"] for part in info["build"]["parts"]}  # 3 shards + the held-out part
    assert len(info["build"]["parts"]) == 4
    assert len({writer.split(" (dask worker")[0] for writer in writers}) == 2  # both worker processes filled parts
    assert all("(dask worker" in writer for writer in writers)
    one_process = IndexConfig(kind="ivf", num_shards=3)
    build_index(tmp_path / "out" / "embeddings", tmp_path / "one", one_process, progress=False)
    for name in ("index.faiss", "rows.npy", "keys.bin"):  # the Dask-built index is the one-process build
        assert (tmp_path / "out" / "index" / "current" / name).read_bytes() == (
            tmp_path / "one" / "current" / name
        ).read_bytes()
    sequential = tmp_path / "sequential"
    embed(bundle, str(fashion_shards), sequential, EmbedConfig(workers=0), progress=False)
    for part in sorted(sequential.glob("part-*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "embeddings" / part.name), np.load(part))


@pytest.mark.slow
def test_refresh_corpus_carries_a_changed_folder_to_a_new_index_version_and_tells_the_service(
    bundle, fashion_mnist_slice, tmp_path
):
    import subprocess
    import sys

    from datasets import PhotoFolder
    from prefect.artifacts import Artifact
    from processes import stop

    from artifacts.index_bundle import IndexBundle
    from flows.refresh_corpus import refresh_corpus

    folder = PhotoFolder(fashion_mnist_slice, tmp_path / "photos")
    folder.add(range(150))
    marker, pid_file = tmp_path / "reloaded", tmp_path / "serve.pid"
    # a stand-in service: it records each SIGHUP, as `mocoplus serve --pid-file` would reload on it
    listener = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys, time\n"
        f"signal.signal(signal.SIGHUP, lambda *_: open({str(marker)!r}, 'a').write('hup\\n'))\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )])  # fmt: skip
    try:
        while not pid_file.exists() or not pid_file.read_text():
            assert listener.poll() is None
        arguments = {"source": str(folder.root), "model": str(bundle), "shards": str(tmp_path / "shards"),
                     "out": str(tmp_path / "corpus"), "pid_file": str(pid_file), "shares": 1,
                     "kind": "flat"}  # fmt: skip
        first = refresh_corpus(**arguments)
        assert first["index"]["version"] == 1 and first["index"]["count"] == 150
        folder.add(range(150, 180))
        folder.remove(range(0, 150, 15))
        second = refresh_corpus(**arguments)
        third = refresh_corpus(**arguments)  # nothing new: nothing changes, nobody is told
    finally:
        stop(listener)
    assert second["ingest"]["added"] == 30 and second["ingest"]["removed"] == 10
    assert second["index"]["version"] == 2 and second["index"]["update"]["added"] == 30
    assert second["reloaded_pid"] == listener.pid and third["reloaded_pid"] is None
    assert marker.read_text() == "hup\nhup\n"  # the first build and the update
    assert IndexBundle(tmp_path / "corpus" / "index").count == len(folder.shown) == 170
    report = Artifact.get("refresh-corpus").data  # the newest: the third run's
    assert "+0 added, −0 removed" in report and "not told" in report and "last full build" in report
