"""Against a real `bentoml serve`: load, shutdown, logs and metrics (bounded in count and time, loopback only)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_openai_error
from tests.server import Server, running_server

pytestmark = pytest.mark.server

KEY = "sk-load-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET_PROMPT = "a lighthouse painted by SECRET-PROMPT-7f3a"


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the BentoML arbiter and its workers)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                stack += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "API_KEY": KEY,
        "MAX_QUEUE_IMAGES": "8",
        "MAX_BATCH_IMAGES": "4",
        "WARMUP": "false",
    }
    with running_server(env, tmp_path_factory.mktemp("load")) as running:
        yield running


def pixels_of(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


CLIENTS, REQUESTS_PER_CLIENT = 32, 6


async def _hammer(server: Server, references: dict[tuple[str, int], np.ndarray]) -> tuple[list, list, list[int]]:
    """32 clients, each asking for its images one after another and retrying a 429 until it is served.

    The server's throughput is not what this checks: how many first tries succeed depends on how fast a
    429 is answered, so every request is retried until served and the assertions are about correctness.
    """
    keys = list(references)
    served: list[tuple[tuple[str, int], dict]] = []
    refused: list[tuple[dict, dict]] = []
    health: list[int] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:

        async def client(index: int) -> None:
            for i in range(REQUESTS_PER_CLIENT):
                prompt, seed = keys[(index * REQUESTS_PER_CLIENT + i) % len(keys)]
                body = {"prompt": prompt, "seed": seed, "size": "256x256", "num_inference_steps": 1}
                for _ in range(2000):
                    response = await http.post("/v1/images/generations", json=body, headers=AUTH)
                    if response.status_code != 429:
                        break
                    refused.append((response.json(), dict(response.headers)))
                    # Far shorter than retry-after (1 s at least) so the test stays quick; jittered so
                    # the clients do not retry in lockstep.
                    await asyncio.sleep(0.02 + 0.03 * random.random())
                assert response.status_code == 200, (response.status_code, response.text)
                served.append(((prompt, seed), response.json()))

        async def watch_health() -> None:
            while not stop.is_set():
                health.append((await http.get("/health", timeout=30)).status_code)
                await asyncio.sleep(0.2)

        watcher = asyncio.ensure_future(watch_health())
        try:
            await asyncio.wait_for(asyncio.gather(*(client(index) for index in range(CLIENTS))), timeout=600)
        finally:
            stop.set()
            await watcher
    return served, refused, health


def test_load_loses_and_mixes_up_nothing(server: Server) -> None:
    prompts = ["a red barn", "a blue lake", "a green hill", "a grey city"]
    references = {}
    for prompt in prompts:
        for seed in (1, 2, 3, 4):
            body = {"prompt": prompt, "seed": seed, "size": "256x256", "num_inference_steps": 1}
            response = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=AUTH, timeout=60)
            assert response.status_code == 200
            references[(prompt, seed)] = pixels_of(response.json()["data"][0]["b64_json"])
    memory_before = rss_bytes(server.process.pid)

    served, refused, health = asyncio.run(_hammer(server, references))

    assert len(served) == CLIENTS * REQUESTS_PER_CLIENT, "every request is served in the end"
    for key, payload in served:
        image = pixels_of(payload["data"][0]["b64_json"])
        assert np.abs(image - references[key]).max() <= 1, f"{key} came back as another request's image"
    # 32 clients against a queue of 8 images: the queue must have been full at times.
    assert refused, "the queue limit was never reached"
    for payload, headers in refused:
        assert payload["error"]["code"] == "queue_full"
        # Both openai SDKs wait as told only below 60 s (Node: retry-after-ms first, under 60 000).
        assert 1 <= int(headers["retry-after"]) <= 59 and 1 <= int(headers["retry-after-ms"]) <= 59_000
    assert health and set(health) == {200}, "the server must answer /health throughout"
    memory_after = rss_bytes(server.process.pid)
    assert memory_after - memory_before < 300 * 1024 * 1024, (memory_before, memory_after)


def test_nothing_secret_reaches_the_log(server: Server) -> None:
    body = {"prompt": SECRET_PROMPT, "size": "256x256", "num_inference_steps": 1}
    assert httpx.post(f"{server.url}/v1/images/generations", json=body, headers=AUTH, timeout=60).status_code == 200
    wrong = {"Authorization": "Bearer sk-WRONG-SECRET-c0ffee"}
    assert httpx.post(f"{server.url}/v1/images/generations", json=body, headers=wrong, timeout=60).status_code == 401
    time.sleep(0.5)
    log = server.log_text()
    for secret in (KEY, "sk-WRONG-SECRET-c0ffee", "SECRET-PROMPT-7f3a"):
        assert secret not in log


def test_request_id_links_response_and_logs(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": ""}, headers=AUTH, timeout=30)
    assert_openai_error(response, 400, "validation_error", "prompt")
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while f"(req={request_id},key=" not in server.log_text():
        assert time.monotonic() < deadline, "BentoML's access log line carries the same id"
        time.sleep(0.1)


def test_metrics_for_operators(server: Server) -> None:
    body = {"prompt": "a cat", "size": "256x256", "num_inference_steps": 1, "n": 2}
    assert httpx.post(f"{server.url}/v1/images/generations", json=body, headers=AUTH, timeout=60).status_code == 200
    httpx.post(f"{server.url}/v1/images/generations", json={"prompt": ""}, headers=AUTH, timeout=30)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith("sd35_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["sd35_model_loaded"] == 1
    assert values["sd35_queue_images"] == 0
    assert values['sd35_images_generated_total{model="tiny-sd3"}'] >= 2
    assert values['sd35_errors_total{code="validation_error"}'] >= 1
    assert values["sd35_batch_images_count"] >= 1 and values["sd35_generation_seconds_count"] >= 1
    assert "bentoml_service_request_total" in text


def test_sigterm_finishes_the_running_request_then_exits_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "WARMUP": "false", "SHUTDOWN_GRACE_SECONDS": "30"}
    with running_server(env, tmp_path) as running:
        body = {"prompt": "a slow one", "size": "1024x1024", "n": 3, "num_inference_steps": 4}

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(base_url=running.url, timeout=120) as http:
                request = asyncio.ensure_future(http.post("/v1/images/generations", json=body))
                await asyncio.sleep(1.0)
                os.killpg(running.process.pid, signal.SIGTERM)
                return await request

        response = asyncio.run(scenario())
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 3
        assert running.process.wait(60) == 0
        assert "shutting down: no new requests" in running.log_text()
