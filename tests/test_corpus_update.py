"""A corpus that lives, end to end: a catalogue folder changes day after day, and each change reaches search —
the CLI and a running service — through ingest --update, embed and index --update, with no failed request.

Real Fashion-MNIST images as PNG files in class folders; each day the folder grows by 20 %, loses 5 % and has
2 % of its photos overwritten with other pictures. Every command runs as a user runs it (a subprocess).
"""

from __future__ import annotations

import json
import signal
import time

import httpx
import numpy as np
import pytest
from datasets import PhotoFolder
from PIL import Image
from processes import start_server, stop, wait_listening
from test_killed_runs import hidden, mocoplus
from test_reload import LoadClient, generation_of, reloads, wait_for

from artifacts.embedding_set import EmbeddingSet
from artifacts.index_bundle import IndexBundle
from artifacts.versions import switch_current, version_name
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig

pytestmark = pytest.mark.slow
SECONDS = 60
NEW = {1: range(200, 240), 2: range(240, 288), 3: range(288, 346)}  # day → new images (+20 % of what is live)


def cli(*args: str) -> str:
    done = mocoplus(*args, *(() if args[0] == "search" else ("--no-progress",)))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def refresh(folder: PhotoFolder, paths: dict, model: str) -> None:
    """The day's three commands, exactly as docs/search.md gives them."""
    cli("ingest", str(folder.root), "--out", str(paths["shards"]), "--update")
    cli("embed", model, "--data", str(paths["shards"]), "--out", str(paths["emb"]))
    cli("index", str(paths["emb"]), "--out", str(paths["index"]), "--kind", "flat", "--update")


def day_one(folder: PhotoFolder, bundle, tmp_path) -> tuple[dict, object, str, httpx.Client]:
    """The first ingest, embed and (flat) index of the folder, and `mocoplus serve` on them, ready."""
    paths = {name: tmp_path / name for name in ("shards", "emb", "index")}
    cli("ingest", str(folder.root), "--out", str(paths["shards"]))
    cli("embed", str(bundle), "--data", str(paths["shards"]), "--out", str(paths["emb"]))
    cli("index", str(paths["emb"]), "--out", str(paths["index"]), "--kind", "flat")
    process, url = start_server("--model", str(bundle), "--index", str(paths["index"]), log=tmp_path / "log")
    return paths, process, url, wait_listening(process, url)


def search_images(client: httpx.Client, folder: PhotoFolder, numbers, k: int = 5) -> list[list[dict]]:
    files = [("images", (f"{n}.png", folder.path(n).read_bytes(), "image/png")) for n in numbers]
    answer = client.post("/v1/search", files=files, data={"k": str(k)})
    assert answer.status_code == 200, answer.text
    return [result["hits"] for result in answer.json()["results"]]


def test_each_day_new_photos_find_themselves_and_removed_ones_never_come_back(bundle, fashion_mnist_slice, tmp_path):
    folder = PhotoFolder(fashion_mnist_slice, tmp_path / "photos")
    folder.add(range(200))
    paths, process, url, client = day_one(folder, bundle, tmp_path)
    gone: list[tuple[str, int, bool]] = []  # (key, the row it showed, whether its key lives on with new pixels)
    try:
        dim = client.get("/v1/model").json()["index"]["dim"]
        with LoadClient(url, dim, limit=200_000) as load:  # requests go on through three refreshes
            load.wait_for_answers(5)
            for day, new in NEW.items():
                live = sorted(folder.shown)
                removed = live[day::20]  # 5 %
                overwritten = [number for number in live[day + 7 :: 45] if number not in removed][:5]  # 2 %
                gone += [(folder.key(n), folder.shown[n], False) for n in removed]
                gone += [(folder.key(n), folder.shown[n], True) for n in overwritten]
                folder.add(new)
                folder.remove(removed)
                folder.overwrite(overwritten, [400 + 5 * day + i for i in range(len(overwritten))])
                refresh(folder, paths, str(bundle))
                process.send_signal(signal.SIGHUP)

                assert wait_for(client, day + 1) == len(folder.shown)
                assert client.get("/v1/model").json()["index"]["version"] == day + 1
                changed = [*new, *overwritten]
                for number, hits in zip(changed, search_images(client, folder, changed), strict=True):
                    assert hits[0]["key"] == folder.key(number) and hits[0]["score"] == pytest.approx(1, abs=1e-4)
                load.wait_for_answers(len(load.answers) + 5)
        assert {status for status, _ in load.answers} == {200}
        assert {generation for _, generation in load.answers} >= {1, 2, 3, 4}
        assert reloads(client, "failed") == 0
    finally:
        stop(process)

    # the CLI reads the current version: a removed photo's pixels never bring back its key, and an overwritten
    # photo's old pixels never find its old vector (that would score 1: the very same image)
    index = IndexBundle(paths["index"])
    assert index.count == len(folder.shown) == EmbeddingSet(paths["emb"]).live_count
    query_files = []
    for number, (_, row, _) in enumerate(gone):
        path = tmp_path / "queries" / f"gone-{number}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(folder.pixels[row]).save(path)
        query_files.append(str(path))
    out = cli("search", str(paths["index"]), "--model", str(bundle), *query_files, "-k", "20", "--json")
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == len(gone)
    removed_keys = {key for key, _, replaced in gone if not replaced} - folder.live_keys()
    returned = {hit["key"] for answer in answers for hit in answer["results"]}
    assert removed_keys and returned and not returned & removed_keys
    for (key, _, replaced), answer in zip(gone, answers, strict=True):
        if replaced:
            own = [hit for hit in answer["results"] if hit["key"] == key]
            assert not own or own[0]["score"] < 1 - 1e-4, (key, own)

    # an exact index after three updates answers as one built from scratch
    scratch = build_index(paths["emb"], tmp_path / "scratch", IndexConfig(kind="flat"), progress=False)
    vectors = np.random.default_rng(0).standard_normal((30, index.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ours, theirs = index.search(vectors, 10), IndexBundle(scratch.out_dir).search(vectors, 10)
    assert [[hit.key for hit in row] for row in ours] == [[hit.key for hit in row] for row in theirs]
    assert hidden(paths["index"]) == [] and hidden(paths["emb"]) == []


def test_a_corrupt_new_version_is_refused_and_the_old_one_keeps_serving(bundle, fashion_mnist_slice, tmp_path):
    folder = PhotoFolder(fashion_mnist_slice, tmp_path / "photos")
    folder.add(range(120))
    paths, process, _url, client = day_one(folder, bundle, tmp_path)
    try:
        broken = paths["index"] / version_name(2)
        broken.mkdir()
        for item in (paths["index"] / version_name(1)).iterdir():
            (broken / item.name).write_bytes(item.read_bytes())
        (broken / "index.faiss").write_bytes(b"not a faiss index")
        switch_current(paths["index"], 2)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + SECONDS
        while reloads(client, "failed") < 1:
            assert time.monotonic() < deadline, "the failed reload was never counted"
            time.sleep(0.1)
        assert generation_of(client) == (1, 120)
        assert "keeps serving" in (tmp_path / "log").read_text()
        folder.add(range(120, 150))
        refresh(folder, paths, str(bundle))  # the update rebuilds from the embeddings, and says why
        reason = IndexBundle(paths["index"]).info["trained"]["reason"]
        assert reason.startswith("version 2 is unreadable") and "not a readable FAISS index" in reason
        process.send_signal(signal.SIGHUP)  # the next good version (3) is taken
        assert wait_for(client, 2) == 150
        assert client.get("/v1/model").json()["index"]["version"] == 3
    finally:
        stop(process)
