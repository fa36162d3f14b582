"""stream=true: OpenAI's server-sent events, previews from the denoising steps, the final image unchanged."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from sd35.api.disconnects import _until_disconnected
from sd35.config import Settings
from sd35.serving import ImageServing
from tests.conftest import assert_openai_error, pixels, service_client
from tests.server import running_server
from tests.test_edits import photo, png
from tests.test_engine import _hold_worker, running_engine
from tests.test_robustness import FakeDisconnectingRequest

GEN = "/v1/images/generations"


def read_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: ") :])))
    return events


def test_stream_that_cannot_be_queued_is_a_plain_http_error(tiny_model_dir: Path) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "WARMUP": "false", "MAX_QUEUE_IMAGES": "2"}
    with service_client(env) as client:
        body = {"prompt": "a", "size": "256x256", "n": 4, "stream": True}
        error = assert_openai_error(client.post(GEN, json=body), 400, "validation_error", "n")
        assert "MAX_QUEUE_IMAGES=2" in error["message"]


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    with service_client({"MODEL_ID": str(tiny_model_dir), "WARMUP": "false"}) as test_client:
        yield test_client


def test_partials_then_completed_and_the_final_image_is_unchanged(client: TestClient) -> None:
    body = {"prompt": "a lighthouse", "size": "256x384", "seed": 11, "num_inference_steps": 4}
    with client.stream("POST", GEN, json={**body, "stream": True, "partial_images": 2}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    names = [name for name, _ in events]
    assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    for index, (name, data) in enumerate(events[:2]):
        assert data["type"] == name and data["partial_image_index"] == index
        assert Image.open(io.BytesIO(base64.b64decode(data["b64_json"]))).size == (256, 384)
    assert np.abs(pixels(events[0][1]["b64_json"]) - pixels(events[1][1]["b64_json"])).mean() > 0.5
    completed = events[-1][1]
    assert completed["size"] == "256x384" and completed["output_format"] == "png"
    assert completed["usage"]["input_tokens"] > 0 and completed["usage"]["total_tokens"] > 0
    plain = client.post(GEN, json=body).json()["data"][0]["b64_json"]
    assert completed["b64_json"] == plain, "streaming does not change the image"


def test_no_partials_and_several_images(client: TestClient) -> None:
    body = {"prompt": "a kite", "size": "256x256", "n": 2, "stream": True, "num_inference_steps": 2, "seed": 3}
    with client.stream("POST", GEN, json=body) as response:
        events = read_events(response)
    assert [name for name, _ in events] == ["image_generation.completed"] * 2
    assert [data["image_index"] for _, data in events] == [0, 1]
    assert events[0][1]["b64_json"] != events[1][1]["b64_json"]


def test_edit_stream(client: TestClient) -> None:
    files = [("image", ("in.png", png(photo()), "image/png"))]
    data = {"prompt": "a harbour", "stream": "true", "partial_images": "1", "num_inference_steps": "4"}
    with client.stream("POST", "/v1/images/edits", files=files, data=data) as response:
        events = read_events(response)
    assert [name for name, _ in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_stream_validation_errors_are_plain_400s(client: TestClient) -> None:
    body = {"prompt": "a", "stream": True, "partial_images": 4}
    assert_openai_error(client.post(GEN, json=body), 400, "validation_error", "partial_images")


@pytest.mark.parametrize("n", [1, 10], ids=["one-batch", "three-batches"])
def test_a_stream_whose_client_leaves_gives_its_place_back(tiny_model_dir: Path, n: int) -> None:
    """Every batch of the request leaves the queue (n=10 runs as batches of 4, 4 and 2)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with running_engine(pipe, max_batch_images=4) as engine:
        settings = Settings(model_id="tiny", warmup=False, max_images_per_request=10, max_batch_images=4)
        serving = ImageServing(settings, engine, store=None)  # type: ignore[arg-type]
        from sd35.protocol import ImageGenerationRequest

        request = ImageGenerationRequest(prompt="gone", size="256x256", n=n, stream=True, partial_images=2)

        async def scenario() -> list[Any]:
            blocker = await _hold_worker(engine)
            events = serving.stream(serving.params_for(request), request, "image_generation")
            assert engine.queued_images == n and len(engine._queue) == (n + 3) // 4
            received = [item async for item in _until_disconnected(FakeDisconnectingRequest(0.05), events)]
            assert engine.queued_images == 0, "the queue place is free as soon as the client leaves"
            engine.pipeline.gate.set()
            await blocker
            return received

        assert asyncio.run(scenario()) == []
        assert all("gone" not in call for call in engine.pipeline.calls)
        serving.close()


@pytest.mark.server
def test_openai_sdk_streams_generations_and_edits(tiny_model_dir: Path, tmp_path: Path) -> None:
    with running_server({"MODEL_ID": str(tiny_model_dir), "API_KEY": "k", "WARMUP": "false"}, tmp_path) as server:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        stream = sdk.images.generate(
            prompt="a heron", size="256x256", stream=True, partial_images=2, extra_body={"num_inference_steps": 4}
        )
        events = list(stream)
        assert [event.type for event in events] == [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed",
        ]
        assert [event.partial_image_index for event in events[:2]] == [0, 1]
        final = Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))
        assert final.size == (256, 256) and events[-1].usage.input_tokens > 0
        edit_events = list(
            sdk.images.edit(image=("in.png", png(photo()), "image/png"), prompt="a boat", stream=True, partial_images=1)
        )
        assert [event.type for event in edit_events][-1] == "image_edit.completed"
