"""Nothing holds a worker hostage: vanished, stalled and slow clients, and a shutdown that always ends.

Real `bentoml serve` processes on loopback; raw sockets play the clients that
misbehave (an HTTP library would not send half a body and then wait).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from sd35.lifecycle import Stopping, bound_graceful_shutdown
from tests.conftest import assert_openai_error
from tests.server import Server, running_server

GRACE = 2.0
# SIGTERM ends every process within the grace plus this (sd35.lifecycle.SHUTDOWN_MARGIN_SECONDS is 3 s).
FEW_SECONDS = 5.0
LONG_BATCH = {"prompt": "a long one", "size": "1024x1024", "n": 2, "num_inference_steps": 50}


def _family(server: Server) -> list[psutil.Process]:
    """The arbiter and every process under it (circus gives each worker a session of its own)."""
    arbiter = psutil.Process(server.process.pid)
    return [arbiter, *arbiter.children(recursive=True)]


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    # is_running() compares start times too: a reused pid does not count.
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _worker(server: Server) -> psutil.Process:
    workers = [p for p in _family(server) if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    return workers[0]


def _wait_gone(processes: list[psutil.Process], seconds: float) -> float:
    """Seconds until every one of ``processes`` has exited; fails after ``seconds``."""
    started = time.monotonic()
    while alive := _alive(processes):
        elapsed = time.monotonic() - started
        assert elapsed < seconds, f"still alive after {elapsed:.1f} s: {alive}"
        time.sleep(0.05)
    return time.monotonic() - started


@contextmanager
def _serving(
    env: dict[str, str], tmp_path: Path, tiny_model_dir: Path, target: str = "service:SD35"
) -> Iterator[Server]:
    full = {"MODEL_ID": str(tiny_model_dir), "WARMUP": "false", "SHUTDOWN_GRACE_SECONDS": str(GRACE), **env}
    with running_server(full, tmp_path, target=target) as server:
        family = _family(server)
        try:
            yield server
        finally:
            for process in _alive(family):  # whatever a failed test left behind, orphaned workers included
                process.kill()


def _open(server: Server, path: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """A connection that sent a POST's headers and ``body`` (the start of it, usually), and waits."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def _reply(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], dict, bool]:
    """Status, headers and JSON body of the reply, and whether the server closed the connection after it."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without a reply: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    while len(rest) < int(headers["content-length"]):
        rest += sock.recv(65536)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    return int(status_line.split()[1]), headers, json.loads(rest), closed


def _metrics(server: Server) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("sd35_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


EDIT_HEADERS = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(1 << 20)}


@pytest.mark.server
def test_sigterm_ends_every_process_whatever_the_clients_do(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The read timeout is far beyond the shutdown: it is not what ends the stalled request.
    env = {"BODY_READ_TIMEOUT": "600", "MAX_UPLOAD_BYTES": str(1 << 20), "MAX_BUFFERED_BYTES": str(24 << 20)}
    with _serving(env, tmp_path, tiny_model_dir) as server:
        for _ in range(20):  # each declares 1 MiB and vanishes mid-body
            _open(server, "/v1/images/edits", EDIT_HEADERS, b"--x\r\n" + b"a" * 10_000).close()
        deadline = time.monotonic() + 5
        while (values := _metrics(server)).get('sd35_errors_total{code="client_disconnected"}', 0) < 20:
            assert time.monotonic() < deadline, values
            time.sleep(0.1)
        assert values["sd35_buffered_body_bytes"] == 0, "every vanished request ended and freed its bytes"

        async def long_batch() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                response = await http.post("/v1/images/generations", json=LONG_BATCH)
                return response, time.monotonic()

        batch: dict = {}
        runner = threading.Thread(target=lambda: batch.update(result=asyncio.run(long_batch())))
        runner.start()
        stalled = _open(server, "/v1/images/generations", {"Content-Type": "application/json", "Content-Length": "100"})
        stalled.sendall(b'{"prompt": ')
        time.sleep(2)  # the batch is on the worker, many steps from its end
        family = _family(server)
        # To the arbiter alone, as `docker stop` signals PID 1.
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        status, _, body, closed = _reply(stalled, timeout=GRACE)
        assert (status, body["error"]["code"]) == (503, "service_unavailable") and closed
        assert time.monotonic() - signalled < 1.5, "answered at once, not at the end of the grace"
        gone = _wait_gone(family, GRACE + FEW_SECONDS)
        runner.join(10)
        response, answered = batch["result"]
        error = assert_openai_error(response, 503, "service_unavailable")
        assert "shut down while these images were being made" in error["message"]
        assert GRACE <= answered - signalled < GRACE + FEW_SECONDS, "the batch had the whole grace, then stopped"
        assert server.process.wait(5) == 0
        log = server.log_text()
        steps = int(re.search(r"stopped a batch after (\d+) steps", log).group(1))
        assert 1 <= steps < 50, log[-3000:]
        # uvicorn cancels what is still open at grace + 3 s: nothing should have been left to it.
        assert "timeout graceful shutdown exceeded" not in log, log[-3000:]
        assert gone < GRACE + FEW_SECONDS


@pytest.mark.server
def test_workers_exit_when_the_arbiter_is_killed_even_holding_a_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    with _serving({}, tmp_path, tiny_model_dir, target="tests.hanging_service:SD35") as server:
        worker = _worker(server)
        host, port = server.url.removeprefix("http://").split(":")
        hanging = socket.create_connection((host, int(port)), timeout=10)
        hanging.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)
        os.kill(server.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        server.process.wait(5)
        assert _alive([worker]), "the worker outlived the arbiter's SIGKILL itself"
        # The request that never ends was cancelled when the grace and its margin were over, and answered.
        status, headers, body, closed = _reply(hanging, timeout=GRACE + FEW_SECONDS)
        assert (status, body["error"]["code"], closed) == (503, "service_unavailable", True), body
        assert "SHUTDOWN_GRACE_SECONDS" in body["error"]["message"] and headers["x-should-retry"] == "true"
        assert time.monotonic() - killed >= GRACE + 3
        _wait_gone([worker], GRACE + FEW_SECONDS)
        log = server.log_text()
        assert "shutting down: no new requests" in log and "timeout graceful shutdown exceeded" in log, log[-3000:]


@pytest.fixture(scope="module")
def strict(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A running server with a 1 s body read timeout and an 8 MiB cap on buffered bodies."""
    env = {"BODY_READ_TIMEOUT": "1", "MAX_UPLOAD_BYTES": str(4 << 20), "MAX_BUFFERED_BYTES": str(8 << 20)}
    with _serving(env, tmp_path_factory.mktemp("strict"), tiny_model_dir) as server:
        yield server


@pytest.mark.server
def test_a_stalled_body_is_answered_408_and_closed(strict: Server) -> None:
    sock = _open(strict, "/v1/images/generations", {"Content-Type": "application/json", "Content-Length": "100"})
    sock.sendall(b'{"prompt": "a cat", ')
    started = time.monotonic()
    status, headers, body, closed = _reply(sock, timeout=5)
    elapsed = time.monotonic() - started
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert "BODY_READ_TIMEOUT" in body["error"]["message"]
    assert headers["connection"] == "close" and closed
    assert 0.9 <= elapsed < 2.5, elapsed
    assert httpx.get(f"{strict.url}/health", timeout=10).status_code == 200


def _hold(server: Server, stop: threading.Event) -> socket.socket:
    """An upload that sent 3.75 MiB of its 4 MiB and trickles a byte before each read timeout, until ``stop``.

    Only bytes received count against the budget: a declared length alone holds nothing.
    """
    headers = {**EDIT_HEADERS, "Content-Length": str(4 << 20)}
    sock = _open(server, "/v1/images/edits", headers, b"--x\r\n" + b"a" * (15 << 18))

    def trickle() -> None:
        while not stop.wait(0.3):
            sock.sendall(b"a")

    threading.Thread(target=trickle, daemon=True).start()
    return sock


@pytest.mark.server
def test_the_buffered_bytes_cap_refuses_the_next_upload(strict: Server) -> None:
    stop = threading.Event()
    holders = [_hold(strict, stop) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while _metrics(strict)["sd35_buffered_body_bytes"] < 2 * (15 << 18):  # 7.5 of the 8 MiB are held
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # A body declared larger than what is left is refused before it is sent.
        refused = httpx.post(
            f"{strict.url}/v1/images/edits", files={"image": b"x" * (600 << 10)}, data={"prompt": "x"}, timeout=30
        )
        error = assert_openai_error(refused, 503, "server_busy")
        assert "MAX_BUFFERED_BYTES" in error["message"] and int(refused.headers["retry-after"]) >= 1
        assert refused.headers["connection"] == "close"
    finally:
        stop.set()
    for sock in holders:  # they stop trickling: the read timeout frees their reservations
        status, _, body, closed = _reply(sock, timeout=5)
        assert (status, body["error"]["code"], closed) == (408, "request_timeout", True)
    accepted = httpx.post(
        f"{strict.url}/v1/images/edits", files={"image": b"x" * 1000}, data={"prompt": "x"}, timeout=30
    )
    assert_openai_error(accepted, 400, "validation_error", "image")


@pytest.mark.server
def test_memory_stays_flat_with_fifty_slow_uploads(strict: Server) -> None:
    worker = _worker(strict)
    before = worker.memory_info().rss
    headers = {"Content-Type": "multipart/form-data; boundary=x", "Transfer-Encoding": "chunked"}
    chunk = 256 << 10
    frame = f"{chunk:x}\r\n".encode() + b"a" * chunk + b"\r\n"
    uploads = [_open(strict, "/v1/images/edits", headers) for _ in range(50)]
    peak, refused = before, 0
    # Up to 3.75 MiB each (under MAX_UPLOAD_BYTES): 190 MiB if every one were buffered.
    for _ in range(15):
        for sock in list(uploads):
            try:
                sock.settimeout(1)
                sock.sendall(frame)
            except OSError:  # refused and closed by the server
                uploads.remove(sock)
                refused += 1
        peak = max(peak, worker.memory_info().rss)
        time.sleep(0.05)
    for sock in uploads:
        sock.close()
    growth = (peak - before) >> 20
    # The 8 MiB cap plus uvicorn's per-connection buffers and allocator slack (~30 MiB measured); 160+ without a cap.
    assert growth < 64, f"RSS grew {growth} MiB"
    assert refused >= 40, f"only {refused} of 50 uploads were refused"
    deadline = time.monotonic() + 5
    while _metrics(strict)["sd35_buffered_body_bytes"] != 0:
        assert time.monotonic() < deadline, "bytes still held after every upload ended"
        time.sleep(0.1)


@pytest.mark.server
def test_a_batch_whose_clients_all_left_stops_early(strict: Server) -> None:
    async def leave() -> None:
        async with httpx.AsyncClient(base_url=strict.url, timeout=1.5) as http:
            with pytest.raises(httpx.TimeoutException):
                await http.post("/v1/images/generations", json=LONG_BATCH)

    asyncio.run(leave())
    deadline = time.monotonic() + 30
    while not (found := re.search(r"stopped a batch after (\d+) steps \(every request", strict.log_text())):
        assert time.monotonic() < deadline, strict.log_text()[-3000:]
        time.sleep(0.2)
    assert 1 <= int(found.group(1)) < 50
    assert httpx.get(f"{strict.url}/health", timeout=10).json()["model_loaded"] is True


def test_stopping_wakes_waiters_on_other_loops_and_later_ones_at_once() -> None:
    stopping = Stopping()
    woken = threading.Event()

    async def wait() -> None:
        await stopping.wait()
        woken.set()

    waiter = threading.Thread(target=lambda: asyncio.run(wait()))
    waiter.start()
    time.sleep(0.2)
    assert not woken.is_set()
    stopping.set()  # from another thread, as the signal handler does
    waiter.join(2)
    assert woken.is_set() and stopping.is_set()
    asyncio.run(asyncio.wait_for(stopping.wait(), 0.5))


def test_uvicorns_graceful_shutdown_is_bounded_unless_given() -> None:
    import uvicorn

    bound_graceful_shutdown(7.5)
    assert uvicorn.Config(app=None).timeout_graceful_shutdown == 7.5
    assert uvicorn.Config(app=None, timeout_graceful_shutdown=60).timeout_graceful_shutdown == 60
