"""Every request rule: bad input is a 400 `validation_error` naming the field, never a 422 or 500."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from tests.conftest import assert_openai_error

URL = "/v1/images/generations"

BAD_FIELDS = [
    # (body, param, words the message must contain)
    ({}, "prompt", "Missing required parameter"),
    ({"prompt": ""}, "prompt", "at least 1"),
    ({"prompt": "   "}, "prompt", "not only whitespace"),
    ({"prompt": "x" * 4097}, "prompt", "at most 4096"),
    ({"prompt": 42}, "prompt", "valid string"),
    ({"prompt": ["a", "b"]}, "prompt", "valid string"),
    ({"prompt": "a", "n": 0}, "n", "1 to 4 images per request (MAX_IMAGES_PER_REQUEST=4)"),
    ({"prompt": "a", "n": 5}, "n", "1 to 4 images per request (MAX_IMAGES_PER_REQUEST=4)"),
    ({"prompt": "a", "n": -3}, "n", "MAX_IMAGES_PER_REQUEST"),
    ({"prompt": "a", "n": "2"}, "n", "valid integer"),
    ({"prompt": "a", "n": 1.5}, "n", "valid integer"),
    ({"prompt": "a", "n": True}, "n", "valid integer"),
    ({"prompt": "a", "size": "1000x1000"}, "size", "not a multiple of 16"),
    ({"prompt": "a", "size": "240x240"}, "size", "outside 256–2048"),
    ({"prompt": "a", "size": "2064x512"}, "size", "outside 256–2048"),
    ({"prompt": "a", "size": "2048x2048"}, "size", "more than 2359296 pixels"),
    ({"prompt": "a", "size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "size": "1024"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "size": "-512x512"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "size": 1024}, "size", "valid string"),
    ({"prompt": "a", "response_format": "png"}, "response_format", "'b64_json' or 'url'"),
    ({"prompt": "a", "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
    ({"prompt": "a", "output_compression": -1}, "output_compression", "greater than or equal to 0"),
    ({"prompt": "a", "output_compression": 101}, "output_compression", "less than or equal to 100"),
    ({"prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "a", "seed": 2**64}, "seed", "less than or equal to"),
    ({"prompt": "a", "seed": "7"}, "seed", "valid integer"),
    ({"prompt": "a", "negative_prompt": "x" * 4097}, "negative_prompt", "at most 4096"),
    ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
    ({"prompt": "a", "num_inference_steps": 51}, "num_inference_steps", "less than or equal to 50"),
    ({"prompt": "a", "guidance_scale": -0.5}, "guidance_scale", "greater than or equal to 0"),
    ({"prompt": "a", "guidance_scale": 20.5}, "guidance_scale", "less than or equal to 20"),
    ({"prompt": "a", "guidance_scale": "3"}, "guidance_scale", "valid number"),
    ({"prompt": "a", "stream": "yes"}, "stream", "valid boolean"),
    ({"prompt": "a", "partial_images": 4}, "partial_images", "less than or equal to 3"),
]


@pytest.mark.parametrize(
    ("body", "param", "words"), BAD_FIELDS, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD_FIELDS)]
)
def test_bad_field_is_400_naming_it(client: TestClient, body: dict, param: str, words: str) -> None:
    error = assert_openai_error(client.post(URL, json=body), 400, "validation_error", param)
    assert words in error["message"], error["message"]
    assert error["type"] == "invalid_request_error"


BAD_BODIES = [
    # (raw body, content type, words the message must contain)
    (b"{not json", "application/json", "not valid JSON"),
    (b"", "application/json", "empty"),
    (b"[1, 2]", "application/json", "JSON object"),
    (b'"a prompt"', "application/json", "JSON object"),
    (b"null", "application/json", "JSON object"),
    (b"prompt=a+cat", "application/x-www-form-urlencoded", "Content-Type: application/json"),
    (b'{"prompt": "a"}', "text/plain", "Content-Type: application/json"),
    (b"\xff\xfe\x00garbage", "application/json", "not valid JSON"),
]


@pytest.mark.parametrize(("raw", "content_type", "words"), BAD_BODIES)
def test_malformed_body_is_400(client: TestClient, raw: bytes, content_type: str, words: str) -> None:
    response = client.post(URL, content=raw, headers={"content-type": content_type})
    error = assert_openai_error(response, 400, "validation_error")
    assert words in error["message"], error["message"]


def test_missing_content_type_is_400(client: TestClient) -> None:
    response = client.post(URL, content=b'{"prompt": "a"}', headers={"content-type": ""})
    assert_openai_error(response, 400, "validation_error")


def test_huge_body_is_400_before_parsing(client: TestClient) -> None:
    body = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    error = assert_openai_error(
        client.post(URL, content=body, headers={"content-type": "application/json"}), 400, "validation_error"
    )
    assert "MAX_BODY_BYTES" in error["message"]


def test_huge_chunked_body_is_400(client: TestClient) -> None:
    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    response = client.post(URL, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "validation_error")


def test_unknown_fields_and_openai_extras_are_accepted(client: TestClient) -> None:
    body = {
        "prompt": "a red square",
        "size": "256x256",
        "model": "dall-e-3",
        "quality": "hd",
        "style": "vivid",
        "user": "user-1234",
        "background": "auto",
        "moderation": "low",
        "something_new": {"nested": [1, 2]},
        "num_inference_steps": 1,
    }
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


def test_null_means_default(client: TestClient) -> None:
    body = {"prompt": "a", "n": None, "size": None, "response_format": None, "output_format": None, "seed": None}
    body |= {"output_compression": None, "num_inference_steps": 1, "guidance_scale": None, "stream": None}
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["size"] == "1024x1024" and payload["output_format"] == "png"
    assert len(payload["data"]) == 1


def test_wrong_method_is_openai_shaped_405(client: TestClient) -> None:
    assert_openai_error(client.get(URL), 405, "method_not_allowed")


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/images", "/v1/images/generations/extra", "/v1"])
def test_unknown_v1_route_is_openai_shaped_404(client: TestClient, path: str) -> None:
    error = assert_openai_error(client.get(path), 404, None)
    assert error["message"] == f"Invalid URL (GET {path})" and error["type"] == "invalid_request_error"
