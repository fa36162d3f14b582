"""Generation through the whole in-process service on the tiny model."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
from starlette.testclient import TestClient

from tests.conftest import decode_image, pixels

URL = "/v1/images/generations"
FAST = {"num_inference_steps": 2}


def generate(client: TestClient, **body) -> dict:
    response = client.post(URL, json={"prompt": "a lighthouse at dawn", **FAST, **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("n", [1, 2, 4])
def test_returns_exactly_n_pngs_of_the_requested_size(client: TestClient, n: int) -> None:
    before = int(time.time())
    payload = generate(client, n=n, size="512x256")
    assert before <= payload["created"] <= int(time.time()) + 1
    assert payload["size"] == "512x256" and payload["output_format"] == "png"
    assert len(payload["data"]) == n
    for item in payload["data"]:
        assert set(item) == {"b64_json"}
        image = decode_image(item["b64_json"])
        assert (image.format, image.size, image.mode) == ("PNG", (512, 256), "RGB")


@pytest.mark.parametrize(
    ("size", "expected"), [("auto", (1024, 1024)), ("256x768", (256, 768)), (" 768X256 ", (768, 256))]
)
def test_size_forms(client: TestClient, size: str, expected: tuple[int, int]) -> None:
    payload = generate(client, size=size, num_inference_steps=1)
    assert decode_image(payload["data"][0]["b64_json"]).size == expected
    assert payload["size"] == f"{expected[0]}x{expected[1]}"


def test_default_size_is_1024(client: TestClient) -> None:
    payload = generate(client, num_inference_steps=1)
    assert decode_image(payload["data"][0]["b64_json"]).size == (1024, 1024)


def test_same_seed_gives_identical_bytes(client: TestClient) -> None:
    first = generate(client, size="256x256", seed=1234)
    second = generate(client, size="256x256", seed=1234)
    assert first["data"][0]["b64_json"] == second["data"][0]["b64_json"]


def test_different_seeds_differ(client: TestClient) -> None:
    a = pixels(generate(client, size="256x256", seed=1)["data"][0]["b64_json"])
    b = pixels(generate(client, size="256x256", seed=2)["data"][0]["b64_json"])
    assert np.abs(a - b).mean() > 1.0


def test_images_vary_within_an_image(client: TestClient) -> None:
    image = pixels(generate(client, size="256x256", seed=5)["data"][0]["b64_json"])
    assert image.std() > 5, "a flat image means the pipeline output is not reaching the response"


def test_image_i_uses_seed_plus_i(client: TestClient) -> None:
    batch = generate(client, size="256x256", seed=40, n=3)["data"]
    alone = generate(client, size="256x256", seed=41)["data"][0]
    assert np.abs(pixels(batch[1]["b64_json"]) - pixels(alone["b64_json"])).max() <= 1
    assert np.abs(pixels(batch[0]["b64_json"]) - pixels(batch[1]["b64_json"])).mean() > 1.0


def test_prompt_changes_the_image(client: TestClient) -> None:
    a = pixels(generate(client, prompt="a red apple", size="256x256", seed=9)["data"][0]["b64_json"])
    b = pixels(generate(client, prompt="a blue ocean", size="256x256", seed=9)["data"][0]["b64_json"])
    assert np.abs(a - b).mean() > 0.5


def test_guidance_and_negative_prompt_are_used(client: TestClient) -> None:
    common = {"size": "256x256", "seed": 3, "guidance_scale": 5.0}
    a = pixels(generate(client, negative_prompt="blurry", **common)["data"][0]["b64_json"])
    b = pixels(generate(client, negative_prompt="sharp, vivid", **common)["data"][0]["b64_json"])
    c = pixels(generate(client, size="256x256", seed=3, guidance_scale=0.0)["data"][0]["b64_json"])
    assert np.abs(a - b).mean() > 0.5
    assert np.abs(a - c).mean() > 0.5


def test_steps_change_the_image(client: TestClient) -> None:
    a = pixels(generate(client, size="256x256", seed=3, num_inference_steps=1)["data"][0]["b64_json"])
    b = pixels(generate(client, size="256x256", seed=3, num_inference_steps=3)["data"][0]["b64_json"])
    assert np.abs(a - b).mean() > 0.5


@pytest.mark.parametrize(("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client: TestClient, output_format: str, pil_format: str) -> None:
    payload = generate(client, size="256x256", seed=11, output_format=output_format)
    assert payload["output_format"] == output_format
    image = decode_image(payload["data"][0]["b64_json"])
    assert (image.format, image.size) == (pil_format, (256, 256))


def test_lossless_formats_agree_and_compression_shrinks(client: TestClient) -> None:
    png = generate(client, size="256x256", seed=12)["data"][0]["b64_json"]
    webp = generate(client, size="256x256", seed=12, output_format="webp")["data"][0]["b64_json"]
    assert np.array_equal(pixels(png), pixels(webp)), "webp at output_compression=100 must be lossless"
    small = generate(client, size="256x256", seed=12, output_format="jpeg", output_compression=10)["data"][0]
    large = generate(client, size="256x256", seed=12, output_format="jpeg", output_compression=95)["data"][0]
    assert len(base64.b64decode(small["b64_json"])) < len(base64.b64decode(large["b64_json"]))


def test_long_prompt_is_truncated_not_refused(client: TestClient) -> None:
    generate(client, prompt="word " * 800 + "🙂 日本", size="256x256")


def test_models_lists_the_served_model(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["object"] == "model" and card["id"] == "tiny-sd3"
    assert isinstance(card["created"], int) and card["owned_by"]


def test_without_api_key_everything_is_open(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 200
    response = client.post(URL, json={"prompt": "a", "size": "256x256", **FAST}, headers={"Authorization": "Bearer x"})
    assert response.status_code == 200


def test_health_when_ready(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "healthy" and response.json()["model_loaded"] is True
    assert client.get("/readyz").status_code == 200
