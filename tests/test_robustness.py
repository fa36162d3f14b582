"""Robustness in-process: shaped BentoML errors, every /v1 route locked, CORS, request ids,
client disconnects, out-of-memory splitting, draining on shutdown, malformed headers."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from sd35.api.disconnects import unless_disconnected
from sd35.errors import ClientDisconnectedError, ServiceUnavailableError
from tests.conftest import assert_openai_error, service_client
from tests.test_engine import InstrumentedPipeline, _hold_worker, params, running_engine

GEN = "/v1/images/generations"
BODY = {"prompt": "a cat", "size": "256x256", "num_inference_steps": 1}


def test_bentomls_own_429_and_504_are_openai_shaped() -> None:
    from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware, TimeoutMiddleware

    from sd35.middleware import EdgeMiddleware, adopt_bentoml_traffic_errors

    adopt_bentoml_traffic_errors()
    gate = asyncio.Event()

    async def slow(request: Request) -> JSONResponse:
        await asyncio.sleep(1)
        return JSONResponse({})

    async def blocked(request: Request) -> JSONResponse:
        await gate.wait()
        return JSONResponse({})

    routes = [Route("/v1/x", slow), Route("/sdapi/v1/txt2img", slow, methods=["POST"])]
    timed = EdgeMiddleware(TimeoutMiddleware(Starlette(routes=routes), timeout=0.05))
    with TestClient(timed) as client:
        response = client.get("/v1/x", headers={"x-request-id": "from-the-proxy"})
        error = assert_openai_error(response, 504, "timeout")
        assert "Not able to process the request" in error["message"]
        # Ahead of BentoML's layers, the edge stamps their replies too.
        assert (
            response.headers["x-request-id"] == "from-the-proxy" and int(response.headers["openai-processing-ms"]) >= 50
        )
        # Under /sdapi, in AUTOMATIC1111's shape, stamped the same way.
        a1111 = client.post("/sdapi/v1/txt2img")
        assert a1111.status_code == 504 and set(a1111.json()) == {"detail"}, a1111.text
        assert "x-request-id" in a1111.headers and "openai-processing-ms" in a1111.headers

    limited = MaxConcurrencyMiddleware(Starlette(routes=[Route("/v1/x", blocked)]), max_concurrency=1)
    with TestClient(limited) as client:
        portal = client.portal
        first = portal.start_task_soon(lambda: asyncio.to_thread(client.get, "/v1/x"))
        time.sleep(0.3)
        response = client.get("/v1/x")
        assert_openai_error(response, 429, "queue_full")  # the server is full, not the caller over a quota
        assert response.headers["retry-after"] == "1"
        portal.call(gate.set)
        assert first.result(5).status_code == 200


@pytest.fixture
def secured(tiny_model_dir: Path) -> Iterator[TestClient]:
    # Function-scoped: its tests come first, and only one in-process service may live at a time.
    env = {"MODEL_ID": str(tiny_model_dir), "API_KEY": "k", "CORS_ALLOW_ORIGINS": "https://app.example.com"}
    with service_client(env) as client:
        yield client


def test_every_v1_route_needs_the_key(secured: TestClient) -> None:
    from fastapi.routing import iter_route_contexts

    import service

    # FastAPI keeps included routers as such: iter_route_contexts walks into them.
    contexts = iter_route_contexts(service.app.routes)
    routes = [(route.path, method) for route in contexts for method in route.methods or ()]
    v1 = [(path, method) for path, method in routes if path.startswith("/v1")]
    assert ("/v1/images/generations", "POST") in v1 and ("/v1/models", "GET") in v1
    # The one deliberate exception: image URLs are capability URLs (the name is the secret).
    public = {("/v1/images/files/{name}", "GET"), ("/v1/images/files/{name}", "HEAD")}
    for path, method in v1:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        response = secured.request(method, concrete)
        if (path, method) in public:
            assert response.status_code == 404
        else:
            assert_openai_error(response, 401, "authentication_error")


def test_cors_preflight_and_headers_when_configured(secured: TestClient) -> None:
    origin = {"Origin": "https://app.example.com"}
    preflight = secured.options(
        GEN,
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    refused = secured.post(GEN, json=BODY, headers=origin)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example.com"
    other = secured.get("/health", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in other.headers


def test_a_request_that_outlives_request_timeout_gets_504(tiny_model_dir: Path) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "WARMUP": "false", "REQUEST_TIMEOUT": "1"}
    with service_client(env) as timed:
        import service

        engine = service.app.state.serving.engine
        slow = {"prompt": "slow", "size": "1024x1024", "n": 2, "num_inference_steps": 8}
        started = time.monotonic()
        response = timed.post(GEN, json=slow)
        error = assert_openai_error(response, 504, "timeout")
        assert "REQUEST_TIMEOUT" in error["message"] and time.monotonic() - started < 10
        assert response.headers["x-should-retry"] == "false", "a retry would time out the same way"
        # Nobody waits for the running batch any more: it stops at its next step instead of finishing.
        deadline = time.monotonic() + 120
        while not engine.steps_run and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 1 <= engine.steps_run[0] < 8, list(engine.steps_run)
        assert not engine.batch_sizes, "the interrupted call produced no images"


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.get("/v1/models", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options(GEN, headers={"Origin": "https://x.com", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_every_response_has_a_request_id(client: TestClient) -> None:
    ok = client.post(GEN, json=BODY)
    bad = client.post(GEN, json={"prompt": ""})
    missing = client.get("/v1/nope")
    ids = [response.headers["x-request-id"] for response in (ok, bad, missing)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids), ids
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json; charset=utf-8"},
        {"Content-Type": "application/json", "Content-Length": "9999"},
        {"Content-Type": "application/json", "Accept": "text/html"},
        {"Content-Type": "application/json", "Authorization": "Bearer \t"},
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        {"Content-Type": "application/json", "X-Forwarded-For": "not-an-ip, ::::"},
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    ],
)
def test_odd_headers_never_cause_a_5xx(client: TestClient, headers: dict) -> None:
    try:
        response = client.post(GEN, content=b'{"prompt": "a cat", "size": "256x256"}', headers=headers)
    except Exception as exc:  # the test client itself may refuse impossible framing
        pytest.skip(f"client refused the request: {exc}")
    assert response.status_code < 500, response.text


@pytest.fixture
def blocked_engine(tiny_model_dir: Path) -> Iterator[Any]:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with running_engine(pipe) as engine:
        yield engine


class FakeDisconnectingRequest:
    """Just enough of a Starlette request: the client leaves after ``after`` seconds."""

    def __init__(self, after: float) -> None:
        self.after = after

    async def receive(self) -> dict:
        await asyncio.sleep(self.after)
        return {"type": "http.disconnect"}


def test_client_that_disconnects_while_queued_frees_its_place(blocked_engine: Any) -> None:
    async def scenario() -> None:
        blocker = await _hold_worker(blocked_engine)
        with pytest.raises(ClientDisconnectedError):
            await unless_disconnected(FakeDisconnectingRequest(0.05), blocked_engine.generate(params(1, "gone")))
        assert blocked_engine.queued_images == 0, "the place in the queue is free again"
        blocked_engine.pipeline.gate.set()
        await blocker
        await blocked_engine.generate(params(2, "stayed"))

    asyncio.run(scenario())
    prompts = [prompt for call in blocked_engine.pipeline.calls for prompt in call]
    assert "gone" not in prompts and "stayed" in prompts


def test_out_of_memory_batch_is_split_image_by_image(blocked_engine: Any) -> None:
    pipe: InstrumentedPipeline = blocked_engine.pipeline
    solo = [asyncio.run(blocked_engine.generate(params(seed, "split me")))[0] for seed in (10, 11, 12)]
    original = InstrumentedPipeline.__call__

    def oom_when_batched(self: InstrumentedPipeline, **kwargs: Any) -> Any:
        if len(kwargs["prompt"]) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12 GiB")
        return original(self, **kwargs)

    pipe.__class__ = type("OOMWhenBatched", (InstrumentedPipeline,), {"__call__": oom_when_batched})
    images = asyncio.run(blocked_engine.generate(params(10, "split me", n=3)))
    assert len(images) == 3
    for alone, split in zip(solo, images, strict=True):
        assert np.abs(alone.astype(int) - split.astype(int)).max() <= 1


def test_draining_refuses_new_work_then_interrupts_the_batch_and_refuses_the_queue(blocked_engine: Any) -> None:
    async def scenario() -> None:
        blocker = await _hold_worker(blocked_engine)
        queued = asyncio.ensure_future(blocked_engine.generate(params(3, "queued")))
        await asyncio.sleep(0.05)
        blocked_engine.drain(grace_seconds=0.2)
        with pytest.raises(ServiceUnavailableError) as refused:
            await blocked_engine.generate(params(4, "late"))
        assert refused.value.status == 503 and "shutting down" in refused.value.message
        await asyncio.sleep(0.4)  # the grace period ends while the worker is still busy
        blocked_engine.pipeline.gate.set()
        with pytest.raises(ServiceUnavailableError, match="shut down while these images were being made"):
            await blocker  # the batch running when the grace ended stops at its next step
        assert list(blocked_engine.steps_run)[-1] == 1, "one of two steps ran"
        with pytest.raises(ServiceUnavailableError, match="shut down before this request could run"):
            await queued

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("method", "path", "label", "allow"),
    [
        ("GET", "/v1/images/files/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.png", "/v1/images/files/{name}", ()),
        ("POST", "/v1/images/generations", "/v1/images/generations", ()),
        ("GET", "/docs-assets/swagger-ui.css", "/docs-assets/{path}", ()),
        ("GET", "/livez", "/livez", ()),
        ("GET", "/metrics", "/metrics", ()),
        ("GET", "/a/random/path/9f8e7d", "/{unmatched}", ()),
        ("GET", "/v1/images/generations", "/{unmatched}", ("POST",)),
        ("PUT", "/v1/images/files/x", "/{unmatched}", ("GET", "HEAD")),
        ("HEAD", "/v1/images/files/x", "/v1/images/files/{name}", ()),
        ("HEAD", "/livez", "/livez", ()),
        ("HEAD", "/v1/images/generations", "/{unmatched}", ("POST",)),
        # The mount of the FastAPI app takes no newline (nor does BentoML's router): no route, a JSON 404.
        ("GET", "/v1/images/files/a\nb.png", "/{unmatched}", ()),
    ],
)
def test_requests_are_labelled_by_their_route_template(
    client: TestClient, method: str, path: str, label: str, allow: tuple[str, ...]
) -> None:
    from sd35.middleware import route_of

    route = route_of({"type": "http", "method": method, "path": path, "app": client.app, "headers": []})
    assert (route.label, route.allow) == (label, allow)
