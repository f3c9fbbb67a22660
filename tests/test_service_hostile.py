"""Hostile input to the service: every budget holds whatever the framing, and every failure is one JSON line.

In process (TestClient) for what the app decides; against a real `mocoplus serve` on 127.0.0.1, over raw
sockets, for what the connection decides (request heads, body timeouts, connection counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import select
import shutil
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile
from processes import stop
from test_service import make_client, png, start_server, upload, wait_ready

import serving.payloads
import serving.service
from artifacts.images import InvalidImageError, decode_image
from artifacts.index_bundle import INDEX_JSON, IndexBundle, IndexBundleError
from serving.app import create_app
from serving.guards import Gate
from serving.limits import Limits
from serving.payloads import RequestError
from serving.service import ServiceConfig

LIMITS = Limits(max_images=8, max_image_bytes=200_000, max_body_bytes=1 << 20, max_json_tokens=100_000)
SECONDS = 30  # the generous bound on anything the server must do "soon"


@pytest.fixture(scope="module")
def client(bundle, corpus):
    with make_client(bundle, corpus["index"], limits=LIMITS, raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        yield test_client


def assert_error(answer: httpx.Response, status: int, reason: str) -> str:
    """The one failure shape: ``status``, a JSON body of exactly ``{"error": <one line>}`` naming ``reason``."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert list(body) == ["error"] and "\n" not in body["error"], body
    assert reason in body["error"], body
    return body["error"]


def post_json(client, body: bytes | str, content_type: str = "application/json", path: str = "/v1/search"):
    content = body.encode() if isinstance(body, str) else body
    return client.post(path, content=content, headers={"content-type": content_type})


# --- body budgets: counted as received, whatever the framing ------------------------------------------------------


async def asgi_post(app, path: str, content_type: str, chunks: Iterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Drive ``app`` as a server reading a chunked upload does: one chunk each time the app asks for more."""
    headers = [(b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        piece = next(chunks, None)
        return {"type": "http.request", "body": piece or b"", "more_body": piece is not None}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    answer_headers = {name.decode(): value.decode() for name, value in sent[0]["headers"]}
    return sent[0]["status"], answer_headers, b"".join(message.get("body", b"") for message in sent[1:])


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "application/json"])
def test_a_chunked_body_over_the_cap_is_refused_before_the_rest_is_read(client, content_type):
    chunk, chunks, pulled = b"0" * (64 << 10), 5120, []  # 320 MiB offered, chunked (no Content-Length)
    opening = b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'  # well-formed
    if content_type == "application/json":
        opening = b'{"images": ["'

    def body() -> Iterator[bytes]:
        yield opening
        for _ in range(chunks):
            pulled.append(len(chunk))
            yield chunk

    status, headers, answer = client.portal.call(asgi_post, client.app, "/v1/embed", content_type, body())
    error = json.loads(answer)["error"]
    assert status == 413 and f"exceeds the limit of {LIMITS.max_body_bytes:,} bytes" in error, answer
    assert headers["connection"] == "close"  # the unread rest is not waited for
    assert sum(pulled) <= LIMITS.max_body_bytes + len(chunk) and len(pulled) < chunks


@pytest.mark.parametrize("content_type", ["text/plain", "application/json"])
def test_an_answer_given_before_the_body_is_read_closes_the_connection(client, content_type):
    """A 415 (or 404, 503) leaves the body unread: the connection must close, or the server would take the
    unread rest for the next request's head. A body that was read keeps the connection open."""
    status, headers, answer = client.portal.call(asgi_post, client.app, "/v1/embed", content_type, iter([b"{}"]))
    assert status == (415 if content_type == "text/plain" else 422), answer
    assert headers.get("connection") == ("close" if content_type == "text/plain" else None)


def test_a_declared_length_over_the_cap_is_refused_without_reading(client):
    answer = post_json(client, b"{" + b" " * LIMITS.max_body_bytes + b"}")
    assert_error(answer, 413, f"request body of {LIMITS.max_body_bytes + 2:,} bytes exceeds")


# --- images: capped by decoded bytes from the header; conversions do not multiply memory ---------------------------


def png16(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("I;16", size).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb16() -> bytes:
    """75 KB of 16-bit PNG declaring 6300×6300: 39.7 M pixels (under the pixel cap), 79 MB decoded."""
    return png16((6300, 6300))


def test_a_16_bit_bomb_is_refused_from_its_header_without_decoding(client, bomb16, monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert len(bomb16) < LIMITS.max_image_bytes and LIMITS.max_pixels > 6300 * 6300
    answer = client.post("/v1/embed", **upload(bomb16))
    assert_error(answer, 413, "6300×6300 I;16 decodes to 79,380,000 bytes, over the cap of 67,108,864")
    with pytest.raises(InvalidImageError, match="decodes to"):
        decode_image(bomb16, max_pixels=LIMITS.max_pixels, max_decoded_bytes=LIMITS.max_decoded_bytes)


def test_decode_image_keeps_its_pixel_only_api_and_converts_16_bit_without_wide_copies():
    data = png16((2000, 2000))  # 4 M pixels, 8 MB as decoded
    tracemalloc.start()
    try:
        decoded = decode_image(data, max_pixels=4_000_000)  # how ingest calls it: no byte cap given
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.image.mode == "L" and decoded.conversion == "I;16→L"
    assert peak < 4_000_000 * 5  # one 16-bit copy and the 8-bit result; int64 temporaries took 8 bytes a pixel each


# --- concurrency: a bounded number of decodes and searches, a bounded queue, then 503 ------------------------------


def test_a_gate_lets_slots_run_queues_a_few_and_refuses_the_rest():
    async def scenario() -> None:
        gate, inside, release = Gate("decodes", slots=1, queue=1), asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with gate.slot():
                inside.set()
                await release.wait()

        first = asyncio.create_task(hold())
        await inside.wait()
        second = asyncio.create_task(hold())
        while gate.waiting < 1:
            await asyncio.sleep(0)
        with pytest.raises(RequestError) as refused:
            async with gate.slot():
                pass
        assert refused.value.status == 503 and "1 decodes running and 1 waiting" in refused.value.reason
        release.set()
        await asyncio.gather(first, second)
        async with gate.slot():  # free again
            pass

    asyncio.run(scenario())


def test_decodes_beyond_the_slots_and_queue_get_503_with_retry_after(bundle, corpus, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_decode = serving.service.decode_images

    def held_decode(*args):
        entered.set()
        release.wait(SECONDS)
        return real_decode(*args)

    monkeypatch.setattr(serving.service, "decode_images", held_decode)
    limits = Limits(max_images=8, max_concurrent_decodes=1, max_waiting=1)
    image = upload(corpus["images"][corpus["keys"][0]])
    with make_client(bundle, None, limits=limits) as small:
        wait_ready(small)
        service = small.app.state.service
        answers: list[int] = []
        senders = [threading.Thread(target=lambda: answers.append(small.post("/v1/embed", **image).status_code))]
        senders[0].start()
        assert entered.wait(SECONDS)
        senders.append(threading.Thread(target=lambda: answers.append(small.post("/v1/embed", **image).status_code)))
        senders[1].start()
        deadline = time.monotonic() + SECONDS
        while service.decodes.waiting < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.01)
        refused = small.post("/v1/embed", **image)
        assert_error(refused, 503, "overloaded: 1 decodes running and 1 waiting")
        assert refused.headers["retry-after"] == "1"
        release.set()
        for sender in senders:
            sender.join(SECONDS)
        assert answers == [200, 200]


# --- search work ---------------------------------------------------------------------------------------------------


def test_a_search_over_the_work_budget_is_refused_before_it_runs(client, corpus, monkeypatch):
    monkeypatch.setattr(IndexBundle, "search", lambda *args: pytest.fail("the search ran"))
    vector = corpus["vectors"][corpus["keys"][0]].tolist()
    answer = client.post("/v1/search", json={"vectors": [vector] * 8, "k": 1000, "nprobe": 65536})
    assert_error(answer, 422, "search work 8 queries × k 1000 × nprobe 65536 = 524,288,000 exceeds 16,777,216")


# --- JSON: parsed off the event loop, its size and depth bounded before parsing ------------------------------------


def test_json_is_parsed_off_the_event_loop(client, corpus, monkeypatch):
    on_loop: list[bool] = []
    real_parse = serving.payloads._parse_json

    def spy(body: bytes, limits: Limits, members):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real_parse(body, limits, members)

    monkeypatch.setattr(serving.payloads, "_parse_json", spy)
    assert client.post("/v1/search", json={"key": corpus["keys"][0]}).status_code == 200
    assert on_loop == [False]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        pytest.param("[" * 2000 + "]" * 2000, 422, "JSON nested 2000 levels deep; the limit is 32", id="deep"),
        pytest.param('{"k": ' + "[" * 33 + "1" + "]" * 33 + "}", 422, "nested 34 levels", id="deep-member"),
        pytest.param("[" + "0," * 150_000 + "0]", 413, "over 100,000 punctuation marks", id="too-many-values"),
        pytest.param('{"k": ' + "9" * 5000 + "}", 422, "not valid JSON", id="5000-digit-int"),
        pytest.param('{"images": [', 422, "not valid JSON", id="truncated"),
    ],
)
def test_hostile_json_is_a_4xx(client, body, status, reason):
    assert_error(post_json(client, body), status, reason)


def test_brackets_and_escaped_quotes_inside_strings_do_not_count_as_nesting(client):
    key = '[[[[\\"{{{{' * 100  # 800 brackets and escaped quotes, all inside one string
    assert_error(post_json(client, f'{{"key": "{key}"}}'), 404, "no sample with key")


# --- one error contract --------------------------------------------------------------------------------------------


def test_unknown_routes_and_methods_are_json_errors(client):
    assert_error(client.get("/no/such/route"), 404, "not found: GET /no/such/route")
    answer = client.get("/v1/embed")
    assert_error(answer, 405, "method not allowed: GET /v1/embed")
    assert "POST" in answer.headers["allow"]


def test_a_request_validation_error_is_a_json_422(bundle):
    app = create_app(ServiceConfig(model=bundle))  # not started: the error contract needs no model

    @app.get("/typed")
    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    assert_error(TestClient(app).get("/typed", params={"n": "x"}), 422, "invalid request: query.n")


def test_a_bug_is_a_one_line_500_without_internals(client, corpus, monkeypatch):
    async def broken(self, payload):
        raise RuntimeError(f"secret {corpus['index']}\nTraceback (most recent call last)")

    monkeypatch.setattr(serving.service.Service, "search", broken)
    error = assert_error(client.post("/v1/search", json={"key": "x"}), 500, "internal server error")
    assert "secret" not in error and "Traceback" not in error


@pytest.mark.parametrize("value", ["²", "١٢", "1" * 5000, " 3\n4", True, 2.5])
def test_parameters_must_be_ascii_integers(client, corpus, value):
    assert_error(client.post("/v1/search", json={"key": corpus["keys"][0], "k": value}), 422, "'k' must be an integer")
    form = client.post("/v1/search", files={"key": (None, corpus["keys"][0]), "k": (None, str(value))})
    assert_error(form, 422, "'k' must be an integer")


def test_an_unknown_key_is_quoted_short_and_the_index_path_is_never_shown(client, corpus):
    error = assert_error(client.post("/v1/search", json={"key": "k" * (1 << 19)}), 404, "no sample with key 'kkk")
    assert len(error) < 200 and "…" in error and str(corpus["index"]) not in error


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("Application/JSON", 200),
        ("application/json; charset=UTF-8", 200),
        ("APPLICATION/JSON ;charset=utf-8", 200),
        ("application/jsonfoo", 415),
        ("application/json-patch+json", 415),
        ("multipart/form-dataX; boundary=x", 415),
    ],
)
def test_content_types_are_matched_exactly_and_case_insensitively(client, corpus, content_type, status):
    answer = post_json(client, json.dumps({"key": corpus["keys"][0], "k": 1}), content_type)
    if status == 200:
        assert answer.status_code == 200, answer.text
    else:
        assert_error(answer, status, "send multipart/form-data or application/json")


def test_more_files_than_allowed_is_413_however_many(client):
    for count in (LIMITS.max_images + 1, LIMITS.max_images + 2, 66):
        assert_error(client.post("/v1/embed", **upload(*[png((28, 28))] * count)), 413, "more than 8 images")


@pytest.mark.parametrize("component", ["1.5", True, None, [1.0], 10**400])
def test_vector_components_must_be_json_numbers(client, corpus, component):
    vector = corpus["vectors"][corpus["keys"][0]].tolist()
    answer = post_json(client, json.dumps({"vectors": [[component, *vector[1:]]]}))
    reason = "NaN or infinity" if component == 10**400 else "lists of numbers"
    assert_error(answer, 422, reason)


# --- index.json: validated when a bundle opens -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("search", "reason"),
    [
        pytest.param(None, "'search' must be an object", id="null"),
        pytest.param("fast", "'search' must be an object", id="string"),
        pytest.param({"parameter": "bogus", "params": {}}, "unknown search parameter 'bogus'", id="unknown-name"),
        pytest.param({"parameter": "nprobe", "params": {"nprobe": 4, "foo": 1}}, "'foo' is not", id="extra"),
        pytest.param({"parameter": "nprobe", "params": []}, "'search.params' must be an object", id="params-list"),
        pytest.param({"parameter": "nprobe", "params": {"nprobe": -5}}, "integer >= 1; got -5", id="negative"),
        pytest.param({"parameter": "nprobe", "params": {"nprobe": True}}, "integer >= 1; got True", id="bool"),
        pytest.param({"parameter": "nprobe", "params": {"nprobe": "8"}}, "integer >= 1; got '8'", id="text"),
        pytest.param({"parameter": "efSearch", "params": {"efSearch": 16}}, "efSearch does not apply", id="wrong-kind"),
    ],
)
def test_a_malformed_index_json_search_is_refused_on_opening(corpus, tmp_path, search, reason):
    broken = tmp_path / "index"
    shutil.copytree(corpus["index"], broken)
    info = json.loads((broken / "current" / INDEX_JSON).read_text())
    (broken / "current" / INDEX_JSON).write_text(json.dumps({**info, "search": search}))
    with pytest.raises(IndexBundleError, match=re.escape(reason)) as refused:
        IndexBundle(broken)
    assert "\n" not in str(refused.value)


def test_the_service_reports_a_malformed_index_without_its_path(bundle, corpus, tmp_path):
    broken = tmp_path / "index"
    shutil.copytree(corpus["index"], broken)
    info = json.loads((broken / "current" / INDEX_JSON).read_text())
    (broken / "current" / INDEX_JSON).write_text(
        json.dumps({**info, "search": {"parameter": "nprobe", "params": {"nprobe": -5}}})
    )
    with make_client(bundle, broken) as failing:
        deadline = time.monotonic() + SECONDS
        while "error" not in failing.get("/readyz").json():
            assert time.monotonic() < deadline, "the load failure was never reported"
            time.sleep(0.05)
        error = assert_error(failing.post("/v1/search", json={"key": "x"}), 503, "<index bundle>/current/index.json")
        assert str(tmp_path) not in error and "integer >= 1" in error


# --- Swagger UI offline -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_and_their_assets_are_served_by_the_app(client, page):
    answer = client.get(page)
    assert answer.status_code == 200 and "text/html" in answer.headers["content-type"]
    assets = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', answer.text)
    assert assets and not [url for url in assets if re.match(r"(https?:)?//", url)], assets
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert client.get("/openapi.json").status_code == 200


# --- the connection: request heads, body timeouts, connection count (a real server, raw sockets) --------------------


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from ``sock`` (its body by Content-Length); a timeout fails the test."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def assert_closed(sock: socket.socket) -> None:
    with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread: as closed
        assert sock.recv(65536) == b"", "the server left the connection open"


def assert_refused(sock: socket.socket, status: int, reason: str) -> None:
    """The server answered ``status`` with the JSON error and closed the connection."""
    code, headers, body = read_response(sock)
    assert code == status and headers["content-type"] == "application/json", (code, body)
    assert reason in json.loads(body)["error"] and headers["connection"] == "close", body
    assert_closed(sock)


def start_ready(*args: str):
    """A real `mocoplus serve`, ready; its readiness checks leave no connection open."""
    process, url = start_server(*args)
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/readyz", headers={"connection": "close"}, timeout=SECONDS).status_code == 200:
                return process, int(url.rsplit(":", 1)[1])
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def fast_timeouts(bundle):
    """A server whose request head and body must arrive within 1 s."""
    process, port = start_ready("--model", str(bundle), "--head-timeout", "1", "--body-timeout", "1")
    yield port
    stop(process)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SECONDS)
    sock.settimeout(SECONDS)
    return sock


def test_a_trickled_request_head_gets_408_and_is_closed(fast_timeouts):
    with connect(fast_timeouts) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + SECONDS
        while not select.select([sock], [], [], 0.2)[0]:  # one more header line every 0.2 s, never the head's end
            assert time.monotonic() < deadline, "a trickled head was never cut off"
            sock.sendall(b"X-Slow: 1\r\n")
        assert_refused(sock, 408, "request head not received within 1 s")


def test_a_connection_that_sends_nothing_is_closed(fast_timeouts):
    with connect(fast_timeouts) as sock:
        assert_closed(sock)


def test_a_body_shorter_than_its_content_length_gets_408_and_is_closed(fast_timeouts):
    with connect(fast_timeouts) as sock:
        head = b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head + b'{"images"')
        assert_refused(sock, 408, "request body not received within 1 s")


def test_keep_alive_requests_still_work_under_the_head_clock(fast_timeouts):
    with connect(fast_timeouts) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = read_response(sock)
            assert status == 200 and json.loads(body) == {"status": "alive"}


@pytest.fixture(scope="module")
def two_connections(bundle):
    """A server with the default timeouts that keeps at most two connections open."""
    process, port = start_ready("--model", str(bundle), "--max-connections", "2")
    yield port
    stop(process)


def test_a_request_head_over_64_kib_gets_431_without_waiting_for_the_rest(two_connections):
    with connect(two_connections) as sock:
        start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
        sock.sendall(start + b"a" * ((64 << 10) + 1 - len(start)))  # one byte over, and the head not ended
        assert_refused(sock, 431, "request head exceeds 65,536 bytes")


def test_a_chunked_requests_trailers_over_64_kib_get_431(two_connections):
    with connect(two_connections) as sock:
        head = b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(
            head + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: "
        )  # the body ends; a trailer begins and never ends
        with contextlib.suppress(OSError):  # the server may close while we still send
            for _ in range(8):
                sock.sendall(b"a" * (16 << 10))
        assert_refused(sock, 431, "request trailers or chunk framing exceed 65,536 bytes")


def test_more_than_100_headers_get_431(two_connections):
    with connect(two_connections) as sock:
        headers = b"".join(b"X-H%d: v\r\n" % number for number in range(101))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert_refused(sock, 431, "more than 100 request headers")


def test_a_malformed_request_gets_a_json_400(two_connections):
    with connect(two_connections) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert_refused(sock, 400, "malformed HTTP request")


def test_connections_beyond_the_cap_get_503_until_one_closes(two_connections):
    # two idle connections (kept for the default 10 s head timeout), then a third, accepted after them
    with connect(two_connections), connect(two_connections), connect(two_connections) as third:
        code, headers, body = read_response(third)
        assert code == 503 and headers["retry-after"] == "1" and "too many connections" in json.loads(body)["error"]
    deadline = time.monotonic() + SECONDS
    while httpx.get(f"http://127.0.0.1:{two_connections}/healthz", timeout=SECONDS).status_code != 200:
        assert time.monotonic() < deadline, "closed connections were never released"
        time.sleep(0.1)


# --- across requests: clients that never read, the memory all bodies hold at once --------------------------------


@pytest.mark.slow
def test_clients_that_never_read_are_dropped_after_the_write_timeout_and_their_slots_freed(bundle):
    """Pipelined requests for a 1.5 MB asset on sockets with a 4 KiB receive buffer, never read: every slot is
    held until the write timeout drops them; then the server answers again."""
    process, port = start_ready("--model", str(bundle), "--max-connections", "4", "--write-timeout", "1")
    request = b"GET /static-offline-docs/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n"
    readers: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request * 8)
            readers.append(sock)
        deadline = time.monotonic() + SECONDS
        while True:  # until the slots are free: without a write timeout, never
            with contextlib.suppress(httpx.TransportError):
                answer = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"connection": "close"}, timeout=5)
                if answer.status_code == 200:
                    break
                assert_error(answer, 503, "too many connections")
            assert time.monotonic() < deadline, "clients that never read kept every connection slot"
            time.sleep(0.2)
        for sock in readers:  # each was dropped, its unsent response with it
            sock.settimeout(SECONDS)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass
    finally:
        for sock in readers:
            sock.close()
        stop(process)


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_bodies_held_by_64_clients_stay_within_the_request_memory_budget(bundle, corpus):
    """64 connections each send a 2 MiB body but its last byte: 8 fit the 16 MiB budget, 56 get 503 unread;
    the server's memory grows by the budget, not by 128 MiB; once they close, a search is answered again."""
    body, budget, clients = 2 << 20, 16 << 20, 64
    process, port = start_ready(
        "--model", str(bundle), "--index", str(corpus["index"]), "--max-body-bytes", str(body),
        "--max-request-memory", str(budget), "--body-timeout", "120",
    )  # fmt: skip
    held: list[socket.socket] = []
    try:
        before = resident_bytes(process.pid)
        head = f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {body}"
        head += "\r\n\r\n"
        for _ in range(clients):
            sock = connect(port)
            sock.sendall(head.encode())
            with contextlib.suppress(OSError):  # a refused body is closed on while it is still being sent
                sock.sendall(b" " * (body - 1))
            held.append(sock)
        refused, deadline = 0, time.monotonic() + SECONDS
        waiting = list(held)
        while refused < clients - budget // body and time.monotonic() < deadline:
            for sock in select.select(waiting, [], [], 0.5)[0]:
                status, _, answer = read_response(sock)
                assert status == 503 and "do not fit" in json.loads(answer)["error"], answer
                refused += 1
                waiting.remove(sock)
        assert refused == clients - budget // body  # the bodies that fit are still held, unanswered
        assert resident_bytes(process.pid) - before < 3 * budget  # 128 MiB of bodies without the budget
    finally:
        for sock in held:
            sock.close()
    try:
        vector = [[1.0] + [0.0] * (len(next(iter(corpus["vectors"].values()))) - 1)]
        deadline = time.monotonic() + SECONDS
        while True:  # the held bodies' bytes return to the budget as their connections close
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"vectors": vector}, timeout=SECONDS)
            if answer.status_code == 200:
                break
            assert_error(answer, 503, "do not fit")
            assert time.monotonic() < deadline, "the budget was never released"
            time.sleep(0.2)
    finally:
        stop(process)


def test_a_memory_budget_smaller_than_one_body_is_refused():
    with pytest.raises(ValueError, match="must hold at least one body"):
        Limits(max_body_bytes=2 << 20, max_request_memory=1 << 20)


def test_finite_vectors_whose_scores_overflow_are_a_422(client, corpus):
    dim = len(next(iter(corpus["vectors"].values())))
    answer = client.post("/v1/search", json={"vectors": [[1e38] * dim]})
    assert_error(answer, 422, "scores would overflow")
    answer = client.post("/v1/search", json={"vectors": [[0.0] * (dim - 1) + [1.0], [3e18] * dim]})
    assert_error(answer, 422, "'vectors' row 1")


def test_an_unknown_key_is_404_even_with_a_matching_if_none_match(client, corpus):
    import hashlib

    version = json.loads((corpus["index"] / "current" / INDEX_JSON).read_text())["embeddings"]["manifest_sha256"]
    etag = '"' + hashlib.sha256(f"{version}\0nope".encode()).hexdigest()[:32] + '"'
    assert_error(client.get("/v1/images/nope", headers={"if-none-match": etag}), 404, "no sample with key 'nope'")


def test_a_client_that_disconnects_mid_body_is_one_log_line_not_a_traceback(client, caplog):
    async def disconnect_mid_body(app) -> int:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/search", "raw_path": b"/v1/search", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
        messages = iter([{"type": "http.request", "body": b'{"vec', "more_body": True}, {"type": "http.disconnect"}])
        sent: list[dict] = []

        async def receive() -> dict:
            return next(messages, {"type": "http.disconnect"})

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)  # a traceback would be this raising
        return sent[0]["status"]

    logger = logging.getLogger("uvicorn.error")  # uvicorn's logging config may stop it short of the root logger
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="uvicorn.error"):
            assert client.portal.call(disconnect_mid_body, client.app) == 400
    finally:
        logger.removeHandler(caplog.handler)
    assert "disconnected before sending its whole body" in caplog.text and "Traceback" not in caplog.text
