"""The embedding and search service: in process (TestClient) and as a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import copy_corpus
from fastapi.testclient import TestClient
from PIL import Image
from processes import start_server, stop, wait_listening

from artifacts.index_bundle import INDEX_JSON
from serving.app import create_app
from serving.batcher import BatcherConfig, MicroBatcher, QueueFullError
from serving.limits import Limits
from serving.service import Service, ServiceConfig


def make_client(bundle: Path, index: Path | None, *, raise_server_exceptions: bool = True, **overrides) -> TestClient:
    config = ServiceConfig(model=bundle, index=index, **overrides)
    return TestClient(create_app(config), raise_server_exceptions=raise_server_exceptions)


def wait_ready(client: TestClient | httpx.Client, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "service never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(bundle, corpus):
    limits = Limits(max_images=8, max_image_bytes=200_000)
    with make_client(bundle, corpus["index"], limits=limits) as test_client:
        wait_ready(test_client)
        yield test_client


def png(size: tuple[int, int], noise: bool = False) -> bytes:
    """A gray PNG: blank (compresses to almost nothing, even when huge) or noise (incompressible)."""
    pixels = np.random.default_rng(0).integers(0, 256, size[::-1], dtype=np.uint8) if noise else None
    image = Image.fromarray(pixels) if noise else Image.new("L", size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- embeddings and search ---------------------------------------------------------------------------------------


def test_embed_returns_the_offline_embeddings_multipart_and_json(client, corpus, bundle):
    keys = corpus["keys"][:5]
    files = [("images", (f"{key}.png", corpus["images"][key], "image/png")) for key in keys]
    answer = client.post("/v1/embed", files=files)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = np.stack([corpus["vectors"][key] for key in keys])
    assert (
        body["dim"] == expected.shape[1]
        and body["model"] == json.loads((bundle / "model.json").read_text())["bundle_hash"]
    )
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)
    encoded = [base64.b64encode(corpus["images"][key]).decode() for key in keys]
    as_json = client.post("/v1/embed", json={"images": encoded})
    np.testing.assert_allclose(np.array(as_json.json()["embeddings"]), expected, atol=1e-5)


def test_search_by_image_key_and_vector_finds_the_item_itself_first(client, corpus):
    key = corpus["keys"][7]
    by_image = client.post(
        "/v1/search", files=[("images", ("q.png", corpus["images"][key], "image/png"))], data={"k": "3"}
    )
    assert by_image.status_code == 200, by_image.text
    hits = by_image.json()["results"][0]["hits"]
    assert hits[0]["key"] == key and len(hits) == 3 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    by_key = client.post("/v1/search", json={"key": key, "k": 2, "nprobe": 4})
    assert by_key.json()["results"][0]["hits"][0]["key"] == key
    vector = corpus["vectors"][key].tolist()
    by_vector = client.post("/v1/search", json={"vectors": [vector, vector], "k": 1})
    assert [result["hits"][0]["key"] for result in by_vector.json()["results"]] == [key, key]


def test_model_health_and_openapi(client):
    info = client.get("/v1/model").json()
    assert info["model"]["format"] == 1 and info["index"]["index_kind"] == "ivf"
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"ready": True}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embed", "/v1/search", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(paths)


def test_openapi_names_the_request_and_response_schema_of_every_v1_route(client):
    """A client generator gets every body: each /v1 route's answer has a schema (JSON by a named model, an
    image by its media type), each POST names its JSON and multipart request models, and every name resolves."""
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    routes = {path: operations for path, operations in schema["paths"].items() if path.startswith("/v1/")}
    assert set(routes) == {"/v1/embed", "/v1/search", "/v1/model", "/v1/corpus", "/v1/corpus/random",
                           "/v1/images/{key}"}  # fmt: skip
    for path, operations in routes.items():
        for method, operation in operations.items():
            answer = operation["responses"]["200"]["content"]
            if "image/png" in answer:
                continue
            reference = answer["application/json"]["schema"]["$ref"]
            assert reference.split("/")[-1] in components, (path, reference)
            assert operation["responses"]["422" if method == "post" else "200"]
            if method == "post":
                content = operation["requestBody"]["content"]
                assert set(content) == {"application/json", "multipart/form-data"}, path
                for body in content.values():
                    assert body["schema"]["$ref"].split("/")[-1] in components, (path, body)
    error = components[routes["/v1/search"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
                       ["$ref"].split("/")[-1]]  # fmt: skip
    assert set(error["properties"]) == {"error"}
    hits = components["SearchResponse"]["properties"]["results"]
    assert hits["items"]["$ref"].endswith("/QueryHits")


def test_the_request_models_are_what_the_parser_reads(client, corpus):
    """The documented members are read, and an undocumented one (a misspelt k) is refused, not ignored."""
    from serving.schemas import SearchRequest

    key = corpus["keys"][3]
    assert set(SearchRequest.model_fields) == {"images", "key", "vectors", "k", "nprobe", "ef"}
    assert len(client.post("/v1/search", json={"key": key, "k": 2}).json()["results"][0]["hits"]) == 2
    for answer in (
        client.post("/v1/search", json={"key": key, "topk": 2}),
        client.post("/v1/search", files={"key": (None, key), "topk": (None, "2")}),
        client.post("/v1/search", files={"key": (None, key), "vectors": (None, "[[1.0]]")}),  # JSON only
        client.post("/v1/embed", json={"images": [], "k": 2}),
    ):
        assert answer.status_code == 422 and "unknown field" in answer.json()["error"], answer.text


def test_metrics_count_requests_batches_and_stages(client, corpus):
    before = client.get("/metrics").text
    client.post("/v1/embed", files=[("images", ("a.png", corpus["images"][corpus["keys"][0]], "image/png"))])
    client.post("/v1/embed", json={"images": ["@@"]})
    text = client.get("/metrics").text

    def value(line_start: str, source: str) -> float:
        return sum(float(line.split()[-1]) for line in source.splitlines() if line.startswith(line_start))

    ok = 'mocoplus_responses_total{code="200",endpoint="/v1/embed"}'
    bad = 'mocoplus_responses_total{code="422",endpoint="/v1/embed"}'
    assert value(ok, text) == value(ok, before) + 1 and value(bad, text) == value(bad, before) + 1
    assert value("mocoplus_batch_size_count", text) > value("mocoplus_batch_size_count", before)
    for stage in ("decode", "queue_wait", "inference", "search"):
        assert f'mocoplus_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'mocoplus_execution_provider{provider="CPUExecutionProvider"} 1.0' in text
    assert "mocoplus_queue_depth" in text and 'mocoplus_request_seconds_bucket{endpoint="/v1/embed"' in text


# --- bad input: 4xx with a reason, never a 500 ---------------------------------------------------------------


def upload(*blobs: bytes) -> dict:
    return {"files": [("images", (f"{number}.png", blob, "image/png")) for number, blob in enumerate(blobs)]}


def raw(body: bytes, content_type: str) -> dict:
    return {"content": body, "headers": {"content-type": content_type}}


BAD_EMBED_REQUESTS = [
    ("not-an-image", upload(b"hello, not an image"), 415, "not a recognised image"),
    ("truncated", upload(png((64, 64), noise=True)[:2000]), 400, "corrupt or truncated"),
    ("decompression-bomb", upload(png((8000, 6000))), 413, "too large"),
    ("too-many-bytes", upload(b"\x89PNG" + bytes(300_000)), 413, "exceeds 200,000 bytes"),
    ("too-many-images", upload(*[png((28, 28))] * 9), 413, "more than 8 images"),
    ("too-many-json-images", {"json": {"images": ["aGk="] * 9}}, 413, "limit is 8"),
    ("broken-json", raw(b'{"images": [', "application/json"), 422, "not valid JSON"),
    ("wrong-json-shape", {"json": {"images": "abc"}}, 422, "list of base64"),
    ("bad-base64", {"json": {"images": ["***"]}}, 422, "not valid base64"),
    ("no-images", {"json": {"images": []}}, 422, "no images"),
    ("wrong-content-type", raw(b"raw bytes", "image/png"), 415, "multipart/form-data or application/json"),
]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_EMBED_REQUESTS],
)
def test_bad_embed_requests_are_4xx_with_a_reason(client, request_kwargs, status, reason):
    answer = client.post("/v1/embed", **request_kwargs)
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["error"] and "\n" not in answer.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        pytest.param({"key": "no-such-key"}, 404, "no sample with key", id="unknown-key"),
        pytest.param({"vectors": [[0.1, 0.2]]}, 422, "dimensions", id="wrong-dim"),
        pytest.param({"vectors": [[1, "a"]]}, 422, "lists of numbers", id="not-numbers"),
        pytest.param({"vectors": [[float("nan")] * 3]}, 422, "NaN", id="nan"),
        pytest.param({"key": "x", "vectors": [[0.0]]}, 422, "exactly one of", id="two-kinds"),
        pytest.param({"key": "x", "k": 0}, 422, "'k' must lie in", id="k-zero"),
        pytest.param({"key": "x", "k": "ten"}, 422, "'k' must be an integer", id="k-text"),
        pytest.param({"key": "x", "ef": 8}, 422, "'ef' does not apply", id="wrong-parameter"),
        pytest.param({"key": "x", "nprobe": 10**9}, 422, "'nprobe' must lie in", id="nprobe-too-big"),
    ],
)
def test_bad_search_requests_are_4xx_with_a_reason(client, body, status, reason):
    content = json.dumps(body, allow_nan=True).encode()
    answer = client.post("/v1/search", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["error"]


def test_a_request_larger_than_the_queue_is_refused_503_with_retry_after(bundle):
    with make_client(bundle, None, batcher=BatcherConfig(max_batch=2, max_queue=3)) as small:
        wait_ready(small)
        files = [("images", (f"{i}.png", png((28, 28)), "image/png")) for i in range(4)]
        answer = small.post("/v1/embed", files=files)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "overloaded" in answer.json()["error"]
        assert small.post("/v1/embed", files=files[:3]).status_code == 200  # what fits is served
        assert small.post("/v1/search", json={"key": "x"}).status_code == 404  # no index


def test_readiness_waits_for_the_model_and_reports_a_load_failure(bundle, tmp_path, monkeypatch):
    release = threading.Event()
    real_load = Service.load

    def slow_load(self):
        release.wait(30)
        real_load(self)

    monkeypatch.setattr(Service, "load", slow_load)
    with make_client(bundle, None) as loading:
        assert loading.get("/healthz").status_code == 200
        assert loading.get("/readyz").status_code == 503
        assert loading.post("/v1/embed", json={"images": ["aGk="]}).status_code == 503
        release.set()
        wait_ready(loading)
    monkeypatch.setattr(Service, "load", real_load)
    with make_client(tmp_path, None) as broken:
        deadline = time.monotonic() + 30
        while "error" not in broken.get("/readyz").json() and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = broken.get("/readyz")
        assert answer.status_code == 503 and "model.json" in answer.json()["error"]


# --- the micro-batcher -----------------------------------------------------------------------------------------


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    calls: list[int] = []

    def model(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        time.sleep(0.01)
        return images.reshape(len(images), -1)[:, :1].astype(np.float32)

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(model, BatcherConfig(max_batch=8, max_wait_ms=20, max_queue=100))
        await batcher.start()
        requests = [np.full((1 + i % 3, 2, 2, 3), i, np.uint8) for i in range(20)]
        results = await asyncio.gather(*(batcher.embed(images) for images in requests))
        await batcher.stop()
        return [result[:, 0] for result in results], requests

    results, requests = asyncio.run(scenario())
    for result, images in zip(results, requests, strict=True):
        assert result.tolist() == [float(images[0, 0, 0, 0])] * len(images)
    assert sum(calls) == sum(len(images) for images in requests) and max(calls) <= 8
    assert len(calls) < len(requests)  # coalesced


def test_batcher_refuses_beyond_its_queue_and_reports_model_errors_to_each_request():
    def broken(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("model exploded")

    async def scenario() -> None:
        batcher = MicroBatcher(broken, BatcherConfig(max_batch=4, max_queue=4))
        await batcher.start()
        with pytest.raises(QueueFullError):
            await batcher.embed(np.zeros((5, 2, 2, 3), np.uint8))
        outcomes = await asyncio.gather(
            *(batcher.embed(np.zeros((1, 2, 2, 3), np.uint8)) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)
        await batcher.stop()

    asyncio.run(scenario())


# --- a real server ---------------------------------------------------------------------------------------------


def test_real_server_serves_concurrent_clients_and_isolates_a_bad_image(bundle, corpus):
    process, url = start_server("--model", str(bundle), "--index", str(corpus["index"]), "--max-wait-ms", "20")
    try:
        client = wait_listening(process, url)
        keys = corpus["keys"][:24]
        outcomes: dict[str, int | list] = {}

        def good(key: str) -> None:
            answer = httpx.post(
                f"{url}/v1/embed", files=[("images", ("q.png", corpus["images"][key], "image/png"))], timeout=30
            )
            outcomes[key] = answer.json()["embeddings"][0] if answer.status_code == 200 else answer.status_code

        def bad(number: int) -> None:
            answer = httpx.post(
                f"{url}/v1/embed", files=[("images", ("q.png", b"junk" * number, "image/png"))], timeout=30
            )
            outcomes[f"bad{number}"] = answer.status_code

        threads = [threading.Thread(target=good, args=(key,)) for key in keys]
        threads += [threading.Thread(target=bad, args=(number,)) for number in range(1, 5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for key in keys:
            np.testing.assert_allclose(outcomes[key], corpus["vectors"][key], atol=1e-5)
        assert [outcomes[f"bad{number}"] for number in range(1, 5)] == [415] * 4
        hits = client.post("/v1/search", json={"key": keys[3], "k": 1}).json()["results"][0]["hits"]
        assert hits[0]["key"] == keys[3]
        assert "mocoplus_batch_size_bucket" in client.get("/metrics").text
    finally:
        stop(process)


@pytest.mark.slow
def test_sigterm_drains_a_request_in_flight(bundle, corpus):
    process, url = start_server("--model", str(bundle), "--max-wait-ms", "1500", "--max-batch", "64")
    try:
        wait_listening(process, url)
        answers: list[httpx.Response] = []
        image = corpus["images"][corpus["keys"][0]]
        sender = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/embed", files=[("images", ("q.png", image, "image/png"))], timeout=30)
            )
        )
        sender.start()
        time.sleep(0.5)  # the request now waits in the batcher for its batch to fill (1.5 s)
        process.send_signal(signal.SIGTERM)
        sender.join(30)
        assert answers and answers[0].status_code == 200
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    finally:
        stop(process)


def test_startup_refuses_an_index_of_another_model(bundle, corpus, tmp_path):
    foreign = Path(shutil.copytree(corpus["index"], tmp_path / "foreign"))
    info = json.loads((foreign / "current" / INDEX_JSON).read_text())
    (foreign / "current" / INDEX_JSON).write_text(json.dumps({**info, "bundle_hash": "0" * 64}))
    process, _ = start_server("--model", str(bundle), "--index", str(foreign))
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1 and "error: index" in output and "would not be comparable" in output
    assert "Traceback" not in output


def test_two_worker_processes_serve_the_same_embeddings(bundle, corpus):
    process, url = start_server("--model", str(bundle), "--workers", "2")
    try:
        client = wait_listening(process, url)
        key = corpus["keys"][2]
        for _ in range(4):  # connections land on either worker
            answer = client.post("/v1/embed", files=[("images", ("q.png", corpus["images"][key], "image/png"))])
            np.testing.assert_allclose(answer.json()["embeddings"][0], corpus["vectors"][key], atol=1e-5)
    finally:
        stop(process)


def test_serve_refuses_cuda_it_cannot_have_before_listening(bundle):
    from typer.testing import CliRunner

    from flows.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--model", str(bundle), "--provider", "cuda", "--port", "1"])
    assert result.exit_code == 1 and "provider 'cuda' asked for" in result.stderr


# --- the search page and corpus images ---------------------------------------------------------------------------


def test_the_search_page_is_one_self_contained_html_page(client):
    answer = client.get("/")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert 'id="file"' in page and 'id="results"' in page and "/v1/search" in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN: the machines have no internet


def test_corpus_images_come_back_as_the_stored_pixels_in_png(client, corpus):
    key = corpus["keys"][7]
    answer = client.get(f"/v1/images/{key}")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(answer.content)))
    np.testing.assert_array_equal(served, np.asarray(Image.open(io.BytesIO(corpus["images"][key]))))


def test_the_corpus_summary_names_the_classes_and_a_random_key_is_in_the_index(client, corpus):
    summary = client.get("/v1/corpus").json()
    assert summary["count"] == 200 and summary["images"] is True
    assert summary["class_names"][:2] == ["T-shirt/top", "Trouser"]
    assert {client.get("/v1/corpus/random").json()["key"] for _ in range(5)} <= set(corpus["keys"])


@pytest.mark.parametrize(
    "path",
    ["no-such-key", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2F..%2Fetc%2Fpasswd", "dir/no-such-key", "dir%2Fx",
     "k" * 4000, "test_00001.png", "%25"],
)  # fmt: skip
def test_an_unknown_or_path_like_key_is_a_short_json_404_from_the_id_map(client, path):
    answer = client.get(f"/v1/images/{path}")
    assert answer.status_code == 404 and answer.headers["content-type"] == "application/json"  # never a file
    error = answer.json()["error"]
    assert error.startswith("no sample with key") and len(error) < 200  # the key is shortened, not echoed


def test_a_corpus_image_is_revalidated_by_its_etag(client, corpus):
    key = corpus["keys"][3]
    first = client.get(f"/v1/images/{key}")
    assert first.headers["cache-control"] == "no-cache" and first.headers["etag"]
    again = client.get(f"/v1/images/{key}", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content
    other = client.get(f"/v1/images/{corpus['keys'][4]}")
    assert other.headers["etag"] != first.headers["etag"]


def test_images_over_the_byte_cap_are_refused_before_decoding(bundle, corpus):
    with make_client(bundle, corpus["index"], limits=Limits(max_image_bytes=50)) as small:
        wait_ready(small)
        answer = small.get(f"/v1/images/{corpus['keys'][0]}")
    assert answer.status_code == 413 and "exceeds 50 bytes" in answer.json()["error"]


def test_without_an_index_the_page_loads_and_the_corpus_says_why(bundle):
    with make_client(bundle, None) as plain:
        wait_ready(plain)
        assert plain.get("/").status_code == 200
        assert plain.get("/v1/model").json()["index"] is None  # what the page reads to say "no index"
        for path in ("/v1/corpus", "/v1/corpus/random", "/v1/images/test_00000"):
            answer = plain.get(path)
            assert answer.status_code == 404 and "no index" in answer.json()["error"]


def test_an_index_whose_shards_are_gone_still_searches_and_says_why_there_are_no_images(bundle, corpus, tmp_path):
    embeddings, copied = copy_corpus(corpus, tmp_path)
    shutil.rmtree(embeddings)  # the embedding set (and so the way to its shards) is gone from this server
    with make_client(bundle, copied) as moved:
        wait_ready(moved)
        summary = moved.get("/v1/corpus").json()
        assert summary["images"] is False and "not readable on this server" in summary["images_unavailable"]
        assert str(tmp_path) not in json.dumps(summary)
        assert moved.post("/v1/search", json={"key": corpus["keys"][0], "k": 1}).status_code == 200
        answer = moved.get(f"/v1/images/{corpus['keys'][0]}")
        assert answer.status_code == 503 and str(tmp_path) not in answer.text


def test_a_large_stored_image_is_served_as_a_thumbnail(bundle, tmp_path):
    """A 1,200 × 900 photo in the corpus comes back at most 256 px wide: the page shows small cards."""
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.embed import embed
    from pipeline.index.build import build_index
    from pipeline.index.config import IndexConfig

    photos = tmp_path / "photos" / "big"
    photos.mkdir(parents=True)
    for index in range(12):
        Image.new("RGB", (1200, 900), (index * 20, 80, 160)).save(photos / f"p{index}.jpg")
    ingest(str(tmp_path / "photos"), tmp_path / "shards", IngestConfig(image_format="jpg", workers=1), progress=False)
    embed(bundle, str(tmp_path / "shards"), tmp_path / "emb", EmbedConfig(workers=0), progress=False)
    build_index(tmp_path / "emb", tmp_path / "index", IndexConfig(kind="flat", queries=2), progress=False)
    with make_client(bundle, tmp_path / "index") as photos_client:
        wait_ready(photos_client)
        key = photos_client.get("/v1/corpus/random").json()["key"]
        answer = photos_client.get(f"/v1/images/{key}")
    assert answer.status_code == 200
    assert Image.open(io.BytesIO(answer.content)).size == (256, 192)
