"""What popular clients send, replayed as they send it (shapes from their source; see the README's client notes)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from tests.conftest import service_client
from tests.test_edits import photo, png

KEY = "sk-clients"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    env = {"MODEL_ID": str(tiny_model_dir), "API_KEY": KEY, "WARMUP": "false", "DEFAULT_NUM_INFERENCE_STEPS": "1"}
    with service_client(env) as test_client:
        yield test_client


def image_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_open_webui_generation(client: TestClient) -> None:
    # backend/open_webui/routers/images.py, engine "openai": model, prompt, n, size, response_format b64_json
    body = {"model": "dall-e-3", "prompt": "a castle", "n": 1, "size": "512x512", "response_format": "b64_json"}
    response = client.post("/v1/images/generations", json=body, headers=AUTH)
    assert response.status_code == 200
    assert image_size(response.json()["data"][0]["b64_json"]) == (512, 512)


def test_open_webui_edit(client: TestClient) -> None:
    # multipart: model, prompt, n, size, background, response_format=b64_json, file 'image' (or 'image[]')
    data = {"model": "gpt-image-1", "prompt": "add a moon", "n": "1", "size": "512x512", "background": "auto"}
    files = [("image[]", ("a.png", png(photo()), "image/png")), ("image[]", ("b.png", png(photo()), "image/png"))]
    response = client.post("/v1/images/edits", data={**data, "response_format": "b64_json"}, files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    assert image_size(response.json()["data"][0]["b64_json"]) == (512, 512)


def test_librechat_gpt_image_tool(client: TestClient) -> None:
    # OpenAIImageTools.js: no response_format; size/quality/background 'auto'; reads data[0].b64_json
    body = {
        "model": "gpt-image-1",
        "prompt": "a lighthouse",
        "n": 1,
        "background": "auto",
        "output_format": "webp",
        "output_compression": 80,
        "quality": "auto",
        "size": "auto",
    }
    response = client.post("/v1/images/generations", json=body, headers=AUTH)
    assert response.status_code == 200
    payload = response.json()
    assert payload["output_format"] == "webp" and payload["size"] == "1024x1024"
    assert Image.open(io.BytesIO(base64.b64decode(payload["data"][0]["b64_json"]))).format == "WEBP"


def test_librechat_dalle3_tool_reads_a_url_with_an_extension(client: TestClient) -> None:
    # DALLE3.js: model dall-e-3, quality, style, size, n=1, no response_format, reads data[0].url
    body = {"model": "dall-e-3", "prompt": "a fox", "quality": "hd", "style": "vivid", "size": "1024x1792", "n": 1}
    response = client.post("/v1/images/generations", json={**body, "response_format": "url"}, headers=AUTH)
    url = response.json()["data"][0]["url"]
    assert url.rsplit("/", 1)[1].endswith(".png")
    fetched = client.get(url)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (1024, 1792)


def test_vercel_ai_sdk_openai_compatible(client: TestClient) -> None:
    # openai-compatible-image-model.ts: {model, prompt, n, size, ...providerOptions, response_format: 'b64_json'}
    body = {"model": "sd35", "prompt": "a harbour", "n": 2, "size": "768x768", "response_format": "b64_json"}
    response = client.post("/v1/images/generations", json={**body, "seed": 5}, headers=AUTH)
    assert [image_size(item["b64_json"]) for item in response.json()["data"]] == [(768, 768)] * 2


def test_openai_sdk_with_every_documented_argument(client: TestClient) -> None:
    import openai

    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
    result = sdk.images.generate(
        prompt="a quiet street",
        background="opaque",
        model="gpt-image-1",
        moderation="low",
        n=1,
        output_compression=90,
        output_format="jpeg",
        quality="high",
        response_format="b64_json",
        size="1536x1024",
        style="natural",
        user="user-42",
        extra_body={"seed": 1, "negative_prompt": "blur", "num_inference_steps": 1, "guidance_scale": 0.0},
    )
    assert result.output_format == "jpeg" and result.size == "1536x1024" and result.background == "opaque"
    assert image_size(result.data[0].b64_json) == (1536, 1024)
