"""The service follows its bundles: SIGHUP (or ``--watch``) loads the builds its paths name now, checks and warms
them up beside the live ones and swaps them in, with no failed request; a bad new build leaves the old serving.

Real `mocoplus serve` processes on 127.0.0.1, a real load client, real index builds of real Fashion-MNIST
embeddings; the index path is a symlink switched atomically, as a deployment switches builds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from processes import start_server, stop, wait_listening

from artifacts.index_bundle import INDEX_JSON
from pipeline.embed.config import EmbedConfig
from pipeline.embed.embed import embed
from pipeline.index.build import build_index
from pipeline.index.config import IndexConfig

SECONDS = 60  # the generous bound on anything the server must do "soon"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builds(bundle, fashion_shards, fashion_test_shards, tmp_path_factory) -> dict[str, Path]:
    """Two index builds of one model (200 test images, 600 train images), a corrupt one and another model's."""
    root = tmp_path_factory.mktemp("reload")
    for name, shards in (("test", fashion_test_shards), ("train", fashion_shards)):
        embed(bundle, str(shards), root / f"emb-{name}", EmbedConfig(workers=0), progress=False)
        build_index(root / f"emb-{name}", root / name, IndexConfig(kind="flat", queries=20), progress=False)
    shutil.copytree(root / "test", root / "corrupt")
    (root / "corrupt" / "current" / INDEX_JSON).write_text("{")
    shutil.copytree(root / "test", root / "foreign")
    info = json.loads((root / "foreign" / "current" / INDEX_JSON).read_text())
    (root / "foreign" / "current" / INDEX_JSON).write_text(
        json.dumps({**info, "model_hash": "0" * 64, "bundle_hash": "0" * 64})
    )
    return {name: root / name for name in ("test", "train", "corrupt", "foreign")}


def switch(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` in one rename, as a deployment switches to a new build."""
    fresh = link.with_name(f".{link.name}.new")
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(target)
    os.replace(fresh, link)


class LoadClient:
    """A bounded loopback client: vector searches one after another until stopped (at most ``limit``)."""

    def __init__(self, url: str, dim: int, limit: int = 5000) -> None:
        self.url, self.limit = url, limit
        self.vector = [[1.0] + [0.0] * (dim - 1)]
        self.answers: list[tuple[int, int | None]] = []  # (status, generation)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(SECONDS)

    def wait_for_answers(self, count: int) -> None:
        """Until the client has ``count`` answers (a state, not a time: the deadline only bounds a stall)."""
        deadline = time.monotonic() + SECONDS
        while len(self.answers) < count:
            assert time.monotonic() < deadline, f"the load client stalled at {len(self.answers)} answers"
            time.sleep(0.05)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=SECONDS) as client:
            while not self._stop.is_set() and len(self.answers) < self.limit:
                try:
                    answer = client.post("/v1/search", json={"vectors": self.vector, "k": 3})
                    generation = answer.json().get("generation") if answer.status_code == 200 else None
                    self.answers.append((answer.status_code, generation))
                except httpx.TransportError:
                    self.answers.append((0, None))


def generation_of(client: httpx.Client) -> tuple[int, int]:
    model = client.get("/v1/model").json()
    return model["generation"], model["index"]["count"]


def wait_for(client: httpx.Client, generation: int) -> int:
    """The index count once ``generation`` serves."""
    deadline = time.monotonic() + SECONDS
    while True:
        serving, count = generation_of(client)
        if serving == generation:
            return count
        assert time.monotonic() < deadline, f"generation {generation} never served (still {serving})"
        time.sleep(0.1)


def reloads(client: httpx.Client, outcome: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'mocoplus_reloads_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def served(bundle, builds, tmp_path):
    """`mocoplus serve` on an index path that is a symlink to the 200-image build."""
    link = tmp_path / "current"
    switch(link, builds["test"])

    def start(*extra: str):
        process, url = start_server("--model", str(bundle), "--index", str(link), *extra, log=tmp_path / "log")
        client = wait_listening(process, url)
        started.append(process)
        return process, url, client

    started: list = []
    yield link, start
    for process in started:
        stop(process)


def test_sighup_swaps_in_each_new_build_with_no_failed_request(served, builds):
    link, start = served
    process, url, client = start()
    assert generation_of(client) == (1, 200)
    dim = client.get("/v1/model").json()["index"]["dim"]
    with LoadClient(url, dim) as load:
        load.wait_for_answers(5)  # generation 1 answers before the first switch
        for generation, build, count in ((2, "train", 600), (3, "test", 200), (4, "train", 600)):
            switch(link, builds[build])
            process.send_signal(signal.SIGHUP)
            assert wait_for(client, generation) == count
            load.wait_for_answers(len(load.answers) + 5)  # requests go on on the new generation
    statuses = {status for status, _ in load.answers}
    assert statuses == {200}, [answer for answer in load.answers if answer[0] != 200][:5]
    assert {generation for _, generation in load.answers} >= {1, 2, 3, 4}
    assert reloads(client, "loaded") == 3 and reloads(client, "failed") == 0
    assert process.poll() is None


@pytest.mark.parametrize("bad", ["corrupt", "foreign"])
def test_a_bad_new_build_is_logged_and_counted_and_the_old_one_keeps_serving(served, builds, bad, tmp_path):
    link, start = served
    process, _, client = start()
    switch(link, builds[bad])
    process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + SECONDS
    while reloads(client, "failed") < 1:
        assert time.monotonic() < deadline, "the failed reload was never counted"
        time.sleep(0.1)
    assert generation_of(client) == (1, 200)
    dim = client.get("/v1/model").json()["index"]["dim"]
    answer = client.post("/v1/search", json={"vectors": [[1.0] + [0.0] * (dim - 1)], "k": 3})
    assert answer.status_code == 200 and answer.json()["generation"] == 1
    assert "keeps serving" in (tmp_path / "log").read_text()
    switch(link, builds["train"])  # a good build after a bad one is taken
    process.send_signal(signal.SIGHUP)
    assert wait_for(client, 2) == 600


def test_watch_reloads_when_the_index_path_names_another_build(served, builds):
    link, start = served
    _, _, client = start("--watch", "0.2")
    switch(link, builds["train"])
    assert wait_for(client, 2) == 600
    time.sleep(1.0)  # several polls with nothing changed: no further reload
    assert generation_of(client) == (2, 600) and reloads(client, "loaded") == 1


def test_searches_answer_from_one_generation_even_across_a_swap(bundle, builds):
    """In process: a request pinned to generation 1 finishes on it while generation 2 is swapped in."""
    import asyncio

    from serving.payloads import Payload
    from serving.service import Service, ServiceConfig

    async def scenario() -> tuple[int, int, bool]:
        service = Service(ServiceConfig(model=bundle, index=builds["test"]))
        await service.start()
        dim = service.index.dim
        async with service.pinned() as first:
            swapped = await service.reload("test")
            answer = await service.search(Payload(vectors=np.eye(1, dim, dtype=np.float32)))
            still_running = not first.stopped  # its request is not done: its batcher must still run
        await asyncio.sleep(0.1)
        stopped_after = first.stopped
        await service.stop()
        assert swapped and first.retired
        return answer["generation"], first.number, still_running and stopped_after

    generation, pinned, lifecycle = asyncio.run(scenario())
    assert (generation, pinned, lifecycle) == (2, 1, True)
