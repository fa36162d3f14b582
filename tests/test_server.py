"""The real thing: `bentoml serve` on a loopback port, called with httpx and the official openai SDK."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import assert_openai_error
from tests.server import running_server

pytestmark = pytest.mark.server

KEY = "sk-test-key"
FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"MODEL_ID": str(tiny_model_dir), "API_KEY": KEY}
    with running_server(env, tmp_path_factory.mktemp("server")) as running:
        yield running.url


@pytest.fixture
def sdk(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_sdk_generates_pngs_of_the_right_size(sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(
        prompt="a watercolor fox", n=2, size="512x512", response_format="b64_json", extra_body={"seed": 7, **FAST}
    )
    assert len(result.data) == 2
    assert result.created > 0
    for item in result.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert (image.format, image.size) == ("PNG", (512, 512))


def test_openai_sdk_with_dall_e_style_arguments(sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(
        model="dall-e-3", prompt="a red cube", size="1024x1024", quality="hd", style="natural", user="u1", n=1
    )
    # dall-e-3 without response_format: a URL, as OpenAI answers it
    assert result.data[0].b64_json is None
    image = Image.open(io.BytesIO(httpx.get(result.data[0].url, timeout=30).content))
    assert image.size == (1024, 1024)


def test_wrong_key_raises_authentication_error(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.images.generate(prompt="a cat", size="256x256")
    assert raised.value.status_code == 401
    assert raised.value.code == "authentication_error"
    assert raised.value.type == "authentication_error"
    assert raised.value.body["message"] == "Invalid API key"


def test_validation_error_reaches_the_sdk(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.generate(prompt="a cat", size="1000x1000")
    assert raised.value.code == "validation_error" and raised.value.param == "size"


def test_same_seed_same_bytes_over_http(server: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "a harbour", "size": "256x256", "seed": 99, **FAST}
    first = httpx.post(f"{server}/v1/images/generations", json=body, headers=headers, timeout=60)
    second = httpx.post(f"{server}/v1/images/generations", json=body, headers=headers, timeout=60)
    assert first.status_code == second.status_code == 200
    assert first.json()["data"][0]["b64_json"] == second.json()["data"][0]["b64_json"]


def test_missing_key_and_unknown_route_over_http(server: str) -> None:
    response = httpx.post(f"{server}/v1/images/generations", json={"prompt": "a"}, timeout=10)
    assert assert_openai_error(response, 401, "authentication_error")["message"] == "Authorization header is required"
    response = httpx.get(f"{server}/v1/nope", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert assert_openai_error(response, 404, None)["message"] == "Invalid URL (GET /v1/nope)"


def test_open_routes_over_http(server: str) -> None:
    health = httpx.get(f"{server}/health", timeout=10)
    assert health.status_code == 200 and health.json()["model_loaded"] is True
    for path in ("/livez", "/readyz", "/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{server}{path}", timeout=10).status_code == 200, path
    metrics = httpx.get(f"{server}/metrics", timeout=10)
    assert metrics.status_code == 200 and "bentoml_service_request_total" in metrics.text


def test_models_over_http(sdk: openai.OpenAI) -> None:
    models = sdk.models.list()
    assert [model.id for model in models.data] == ["tiny-sd3"]


def test_workers_setting_starts_one_engine_per_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "WORKERS": "2", "WARMUP": "false"}
    with running_server(env, tmp_path) as running:
        # /readyz may be answered by either worker: wait until both logged their load,
        # or a request reaching the other one gets its 503 model_not_loaded.
        deadline = time.monotonic() + 60
        while running.log_text().count("ready on cpu") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        for seed in range(4):
            body = {"prompt": "a kite", "size": "256x256", "seed": seed, "num_inference_steps": 1}
            assert httpx.post(f"{running.url}/v1/images/generations", json=body, timeout=60).status_code == 200
        text = running.log_text()
    assert text.count("ready on cpu") == 2, text[-3000:]
    assert "[entry_service:sd35:1]" in text and "[entry_service:sd35:2]" in text
