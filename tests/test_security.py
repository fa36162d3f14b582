"""The findings of the security review (issue 20), each reproduced against a real `bentoml serve`.

One server for the module (the tests run in order and share it): auth on with
two keys, short body timeouts, small buffer and store caps. Raw sockets play
the clients that misbehave; httpx and the official openai SDK the ones that
don't. A second server, further down, gets an S3 endpoint that never answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import select
import shutil
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import assert_openai_error
from tests.server import Server, running_server
from tests.test_hostage import _metrics, _open, _reply, _worker

pytestmark = pytest.mark.server

KEY_A, KEY_B = "key-a", "key-b"
AUTH = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}
GEN = "/v1/images/generations"
SMALL = {"prompt": "a small one", "size": "256x256", "num_inference_steps": 1}
MIB = 1 << 20
ENV = {
    "API_KEY": f"{KEY_A},{KEY_B}",
    "WARMUP": "false",
    "BODY_READ_TIMEOUT": "1",
    "MAX_UPLOAD_BYTES": str(8 * MIB),
    "MAX_BUFFERED_BYTES": str(12 * MIB),
    "IMAGE_STORE_MAX_BYTES": str(MIB),
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The port comes from `bentoml serve --port`, PORT names another: the ready line must say the real one.
    with running_server(
        {"MODEL_ID": str(tiny_model_dir), **ENV}, tmp_path_factory.mktemp("security"), cli_port=True
    ) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _sdk(server: Server, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


# --- issue 23: JSON everywhere, processing time ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nope"),
        ("GET", "/nope"),
        ("PUT", "/nope/deeper"),
        ("POST", "/v1/images/generations/x"),
        ("GET", "/v1"),
    ],
)
def test_a_path_of_no_route_gets_openais_404(http: httpx.Client, method: str, path: str) -> None:
    response = http.request(method, path, headers=AUTH)
    error = assert_openai_error(response, 404, None)
    assert error == {
        "message": f"Invalid URL ({method} {path})",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/v1/models", "GET, HEAD"),
        ("GET", GEN, "POST"),
        ("POST", "/livez", "GET, HEAD"),
        ("DELETE", "/health", "GET, HEAD"),
    ],
)
def test_a_wrong_method_gets_405_with_allow(http: httpx.Client, method: str, path: str, allow: str) -> None:
    response = http.request(method, path, headers=AUTH)
    error = assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allow and f"({method} {path})" in error["message"]


def test_bentomls_own_routes_are_unchanged(http: httpx.Client) -> None:
    for path in ("/livez", "/readyz", "/healthz"):
        response = http.get(path)
        assert response.status_code == 200 and not response.content.startswith(b"{"), path
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "bentoml_service_request_total" in metrics.text


def test_the_sdk_reads_the_404_and_405(server: Server) -> None:
    sdk = _sdk(server)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.get("/nope", cast_to=object)
    assert missing.value.body == {
        "message": "Invalid URL (GET /v1/nope)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.APIStatusError) as wrong:
        sdk.post("/models", cast_to=object)
    assert wrong.value.status_code == 405 and wrong.value.code == "method_not_allowed"


def _raw_head(server: Server, path: str, headers: dict[str, str] | None = None) -> bytes:
    """Everything the server sends for a HEAD until it closes the connection."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    lines = [f"HEAD {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_head_answers_as_get_without_the_body(server: Server, http: httpx.Client) -> None:
    url = http.post(GEN, json={**SMALL, "response_format": "url"}, headers=AUTH).json()["data"][0]["url"]
    image = http.get(url)
    for path, headers, status in [
        ("/health", None, 200),
        ("/v1/models", AUTH, 200),
        ("/v1/models", None, 401),
        (url.removeprefix(server.url), None, 200),
        ("/nope", None, 404),
    ]:
        head, _, body = _raw_head(server, path, headers).partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), (path, head)
        assert body == b"", f"HEAD {path} sent a body"
        assert re.search(rb"(?im)^x-request-id: ", head) and re.search(rb"(?im)^openai-processing-ms: \d+", head)
    head = _raw_head(server, url.removeprefix(server.url)).partition(b"\r\n\r\n")[0].decode().lower()
    assert f"content-length: {len(image.content)}" in head and "content-type: image/png" in head
    # A client that keeps the connection sees the next answer intact after a HEAD.
    assert http.head("/health").status_code == 200 and http.get("/health").json()["status"] == "healthy"


def test_every_response_has_a_request_id_and_the_processing_time(server: Server, http: httpx.Client) -> None:
    sdk = _sdk(server)
    raw = sdk.images.with_raw_response.generate(prompt="a heron", size="256x256", extra_body={"num_inference_steps": 1})
    assert raw.http_response.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", raw.request_id or "")
    responses = [
        raw.http_response,
        http.get("/v1/nope"),
        http.get("/v1/models"),  # 401
        http.post("/v1/models"),  # 405
        http.get("/livez"),  # BentoML's own
        http.get("/health"),
    ]
    for response in responses:
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"]), response.headers
        assert int(response.headers["openai-processing-ms"]) >= 0, response.headers
    assert len({response.headers["x-request-id"] for response in responses}) == len(responses)


def test_a_sane_incoming_request_id_is_kept_and_logged(server: Server, http: httpx.Client) -> None:
    kept = http.post(GEN, json=SMALL, headers={**AUTH, "x-request-id": "proxy-7f3a.01"})
    assert kept.status_code == 200 and kept.headers["x-request-id"] == "proxy-7f3a.01"
    for insane in ("two words", "x" * 300, 'quote"d', "-leading-dash"):
        replaced = http.get("/health", headers={"x-request-id": insane})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"]), insane
    deadline = time.monotonic() + 10
    while not re.search(r"path=/v1/images/generations,.*\(req=proxy-7f3a\.01,key=", server.log_text()):
        assert time.monotonic() < deadline, "the access log line carries the id"
        time.sleep(0.1)


# --- 1 and 3: metric labels ----------------------------------------------------------------------


def test_metrics_and_logs_never_show_image_names_and_stay_bounded(server: Server, http: httpx.Client) -> None:
    url = http.post(GEN, json={**SMALL, "response_format": "url"}, headers=AUTH).json()["data"][0]["url"]
    name = url.rsplit("/", 1)[1]
    assert http.get(url).status_code == 200
    assert http.get(url.replace(name[:8], "A" * 8)).status_code == 404

    def scan(_: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as scanner:
            for _ in range(250):
                assert scanner.get(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex[:8]}").status_code == 404

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(scan, range(8)))  # 2,000 random paths
    scrape = http.get("/metrics").text
    assert name not in scrape and name[:32] not in server.log_text(), "a url image's name is its only secret"
    assert 'endpoint="/v1/images/files/{name}"' in scrape and 'endpoint="/{unmatched}"' in scrape
    endpoints = set(re.findall(r'endpoint="([^"]*)"', scrape))
    assert len(endpoints) < 30, endpoints
    assert len(scrape) < 200_000, f"/metrics is {len(scrape)} bytes"
    assert "path=/v1/images/files/{name}" in server.log_text(), "the access log shows the template too"


# --- 2: nobody is buffered before they are known -------------------------------------------------


def test_unauthenticated_trickles_are_refused_at_once_while_keyed_users_generate(server: Server) -> None:
    one_mib = {"Content-Type": "application/json", "Content-Length": str(MIB)}
    stop = threading.Event()
    refused: list[tuple[str, int, bool]] = []

    def trickle(path: str, headers: dict[str, str]) -> None:
        with _open(server, path, headers, b"{") as sock:
            while not stop.is_set():  # a byte every 0.2 s (1 MiB would take days), until the server answers
                if select.select([sock], [], [], 0.2)[0]:
                    status, _, body, closed = _reply(sock, timeout=10)
                    assert set(body) == {"error"}, body
                    refused.append((path, status, closed))
                    return
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")

    # 16 MiB declared, more than the whole budget (MAX_BUFFERED_BYTES=12 MiB), by clients with no key.
    attackers = [("/nope", one_mib)] * 8 + [("/v1/images/files/x", one_mib)] * 4 + [(GEN, one_mib)] * 4
    threads = [threading.Thread(target=trickle, args=attacker) for attacker in attackers]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 10
        # Until all are answered (or, were their bodies buffered, the budget is full of them).
        while len(refused) < len(attackers) and _metrics(server)["sd35_buffered_body_bytes"] < 12 * MIB:
            assert time.monotonic() < deadline, refused
            time.sleep(0.1)
        response = httpx.post(f"{server.url}{GEN}", json=SMALL, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert sorted(set(refused)) == [("/nope", 404, True), ("/v1/images/files/x", 405, True), (GEN, 401, True)]
    assert len(refused) == len(attackers), "every one answered, and its connection closed, before its body was read"
    assert _metrics(server)["sd35_buffered_body_bytes"] == 0


def test_a_keyed_trickle_is_408_and_holds_no_budget(server: Server) -> None:
    six_mib = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(6 * MIB), **AUTH}
    # Two of them declare 12 MiB, the whole budget: counting what is declared would refuse everyone else.
    socks = [_open(server, "/v1/images/edits", six_mib, b"--x\r\n") for _ in range(2)]
    stop = threading.Event()

    def drip(sock: socket.socket) -> None:
        while not stop.wait(0.3):  # under the 1 s stall timeout, far under BODY_MIN_RATE
            try:
                sock.sendall(b"a")
            except OSError:
                return

    drippers = [threading.Thread(target=drip, args=(sock,), daemon=True) for sock in socks]
    for dripper in drippers:
        dripper.start()
    try:
        deadline = time.monotonic() + 10
        while _metrics(server)["sd35_buffered_body_bytes"] < 10:  # both are being read
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other = httpx.post(
            f"{server.url}/v1/images/edits",
            files={"image": b"x" * 2000},
            data={"prompt": "x"},
            headers=AUTH,
            timeout=30,
        )
        assert_openai_error(other, 400, "validation_error", "image")  # read and parsed: not 503 server_busy
        for sock in socks:
            status, _, body, closed = _reply(sock, timeout=10)
            assert (status, body["error"]["code"], closed) == (408, "request_timeout", True)
            assert "too slowly" in body["error"]["message"] and "BODY_MIN_RATE" in body["error"]["message"]
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    assert _metrics(server)["sd35_buffered_body_bytes"] == 0


# --- 4: a stream whose client leaves ---------------------------------------------------------------


def test_a_stream_whose_client_leaves_stops_its_job_without_an_error(server: Server, http: httpx.Client) -> None:
    body = {
        "prompt": "a long stream",
        "size": "512x512",
        "num_inference_steps": 50,
        "stream": True,
        "partial_images": 3,
    }
    log_before = len(server.log_text())
    payload = json.dumps(body)
    headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(payload))}
    sock = _open(server, GEN, headers, payload.encode())
    sock.settimeout(60)
    received = b""
    while b"partial_image" not in received:  # the job is running: its first preview came
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    sock.close()
    small = http.post(GEN, json=SMALL, headers=AUTH)
    assert small.status_code == 200
    deadline = time.monotonic() + 30
    while not (
        found := re.search(r"stopped a batch after (\d+) steps \(every request", server.log_text()[log_before:])
    ):
        assert time.monotonic() < deadline, server.log_text()[log_before:][-3000:]
        time.sleep(0.1)
    assert 13 <= int(found.group(1)) < 50, "stopped at the step after the client left, not run to the end"
    log = server.log_text()[log_before:]
    assert "Traceback" not in log and "aclose()" not in log and "[ERROR]" not in log, log[-3000:]


# --- 6 and 10: uploads ----------------------------------------------------------------------------


def _png16(width: int, height: int) -> bytes:
    """A 16-bit RGB PNG (48 bits a pixel), written by hand: Pillow does not write them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + (bytes(range(256)) * (width * 6 // 256 + 1))[: width * 6]
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def test_sixteen_large_uploads_decode_only_the_image_used(server: Server) -> None:
    big = _png16(4096, 4096)  # 400 kB that decode to 50 MB of pixels each
    worker = _worker(server)
    before = worker.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, worker.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        files = [("image[]", (f"big{i}.png", big, "image/png")) for i in range(16)]
        data = {"prompt": "a gradient", "size": "256x256", "num_inference_steps": "1"}
        response = httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, headers=AUTH, timeout=120)
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 200, response.text
    growth = (peak - before) >> 20
    # Sixteen decoded: 800 MiB or more (1.2 GB was seen); one: its 50 MiB and the resize's copies.
    assert growth < 400, f"the worker grew {growth} MiB"


def test_a_bad_extra_image_is_refused_from_its_header(server: Server) -> None:
    files = [("image[]", ("a.png", _png16(64, 64), "image/png")), ("image[]", ("b.gif", _gif(), "image/gif"))]
    response = httpx.post(f"{server.url}/v1/images/edits", files=files, data={"prompt": "x"}, headers=AUTH, timeout=60)
    error = assert_openai_error(response, 400, "validation_error", "image")
    assert "'image[1]' is a GIF file" in error["message"]


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_an_mpo_photo_is_edited_from_its_first_frame(server: Server) -> None:
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (320, 256), (200, 30, 30)), Image.new("RGB", (320, 256), (30, 30, 200))
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    mpo = buffer.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    result = _sdk(server).images.edit(
        image=("photo.jpg", mpo, "image/jpeg"), prompt="a red wall", extra_body={"num_inference_steps": 1}
    )
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (320, 256)


# --- 8 and 9: the local store ----------------------------------------------------------------------


def _store_dir(server: Server) -> Path:
    port = server.url.rsplit(":", 1)[1]
    return server.log.parent / f"images-{port}"


def test_the_sdk_gets_urls_a_plain_client_can_fetch(server: Server) -> None:
    body = {"num_inference_steps": 1}
    result = _sdk(server).images.generate(prompt="a heron", size="320x256", n=2, response_format="url", extra_body=body)
    with httpx.Client(timeout=30) as plain:  # no key: the URL is the credential
        for item in result.data:
            assert item.url.startswith(f"{server.url}/v1/images/files/") and item.url.endswith(".png")
            fetched = plain.get(item.url)
            assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(fetched.content)).size == (320, 256)


def test_the_store_directory_removed_at_run_time_is_made_again(server: Server, http: httpx.Client) -> None:
    store = _store_dir(server)
    assert store.is_dir()
    shutil.rmtree(store)
    response = http.post(GEN, json={**SMALL, "response_format": "url"}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert http.get(response.json()["data"][0]["url"]).status_code == 200
    assert not [path for path in store.iterdir() if path.name.startswith(".tmp")]


def test_one_key_cannot_push_out_anothers_images(server: Server, http: httpx.Client) -> None:
    theirs = http.post(GEN, json={**SMALL, "response_format": "url"}, headers=AUTH_B).json()["data"][0]["url"]
    body = {**SMALL, "response_format": "url", "n": 2}
    for _ in range(20):  # 1 MiB holds a handful of these noisy 256² PNGs
        response = http.post(GEN, json=body, headers=AUTH)
        if response.status_code != 200:
            break
    error = assert_openai_error(response, 507, "image_store_full")
    assert "IMAGE_STORE_MAX_BYTES" in error["message"] and "b64_json" in error["message"]
    assert http.get(theirs).status_code == 200, "the other key's image is still there"
    assert not [path for path in _store_dir(server).iterdir() if path.name.startswith(".tmp")]
    assert http.post(GEN, json=SMALL, headers=AUTH).status_code == 200, "b64_json does not need the store"


# --- 12: the ready line -----------------------------------------------------------------------------


def test_the_ready_line_names_the_port_really_listened_on(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    lines = [line for line in server.log_text().splitlines() if "OpenAI base URL" in line]
    assert lines and all(f"http://127.0.0.1:{port}/v1" in line for line in lines), lines


# --- 5 and 11: an S3 endpoint that never answers --------------------------------------------------


class Silent:
    """A TCP server that accepts connections, reads the request, and never answers: an S3 endpoint that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.uploads = 0  # PUT requests received (the sweeper's listings are GETs)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            if connection.recv(65536).startswith(b"PUT "):
                self.uploads += 1

    def close(self) -> None:
        self.sock.close()
        for connection in self.held:
            connection.close()


@pytest.fixture(scope="module")
def silent_s3(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Silent]]:
    silent = Silent()
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "WARMUP": "false",
        "IMAGE_STORE": "s3",
        "IMAGE_STORE_S3_BUCKET": "sd35-images",
        "IMAGE_STORE_S3_ENDPOINT_URL": silent.url,
        "IMAGE_STORE_TIMEOUT": "6",
        "REQUEST_TIMEOUT": "20",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        with running_server(env, tmp_path_factory.mktemp("silent-s3")) as running:
            yield running, silent
    finally:
        silent.close()


def test_a_store_that_hangs_holds_only_its_own_requests(silent_s3: tuple[Server, Silent]) -> None:
    server, silent = silent_s3
    url_body = {**SMALL, "response_format": "url"}

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], int, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            started = time.monotonic()
            stuck = [
                asyncio.ensure_future(client.post(GEN, json=url_body, headers={"x-request-id": f"stuck-{i}"}))
                for i in range(3)
            ]
            deadline = time.monotonic() + 15
            while silent.uploads < 3:  # every url request is inside the store, waiting for it
                assert not any(task.done() for task in stuck), [task.result().text for task in stuck if task.done()]
                assert time.monotonic() < deadline, f"{silent.uploads} uploads reached the store"
                await asyncio.sleep(0.02)
            fast = await asyncio.gather(*(client.post(GEN, json=SMALL) for _ in range(3)))
            still_waiting = sum(not task.done() for task in stuck)
            answered = await asyncio.gather(*stuck)
            return fast, answered, still_waiting, time.monotonic() - started

    fast, answered, still_waiting, elapsed = asyncio.run(scenario())
    assert [response.status_code for response in fast] == [200] * 3
    assert still_waiting == 3, "the b64_json requests were answered while the stuck ones still waited"
    for response in answered:
        error = assert_openai_error(response, 502, "image_store_failed")
        assert "S3 bucket 'sd35-images'" in error["message"] and "IMAGE_STORE_TIMEOUT" in error["message"]
    assert elapsed < 20, "within REQUEST_TIMEOUT"
    log = server.log_text()
    for i in range(3):
        assert re.search(rf"\[req=stuck-{i} key=-\] the image store \(S3 bucket 'sd35-images'\) did not", log), log[
            -3000:
        ]
