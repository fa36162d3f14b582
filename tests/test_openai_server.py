"""OpenAI of today against a real `bentoml serve`, with the official openai SDK and httpx.

gpt-image-2 generations and edits, every gpt-image parameter's invalid values
(400 naming it) and valid values (200), dall-e's leniency, `models.retrieve`,
`n` up to a raised MAX_IMAGES_PER_REQUEST, and the retry hints of a 429.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import assert_openai_error
from tests.server import Server, running_server
from tests.test_edits import photo, png

pytestmark = pytest.mark.server

KEY = "sk-openai-today"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"size": "256x256", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "API_KEY": KEY,
        "LORA_ADAPTERS": f"ink={tiny_loras['ink']}",
        "MAX_IMAGES_PER_REQUEST": "10",
        "MAX_QUEUE_IMAGES": "10",
        "MAX_BATCH_IMAGES": "4",
        "WARMUP": "false",
        "DEFAULT_NUM_INFERENCE_STEPS": "1",
    }
    with running_server(env, tmp_path_factory.mktemp("openai")) as running:
        yield running


@pytest.fixture
def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_retrieve_base_adapter_and_unknown(sdk: openai.OpenAI, server: Server) -> None:
    base = sdk.models.retrieve("tiny-sd3")
    assert (base.id, base.object, base.owned_by) == ("tiny-sd3", "model", "sd35")
    adapter = sdk.models.retrieve("ink")
    assert adapter.id == "ink" and adapter.model_extra["parent"] == "tiny-sd3"
    assert [model.id for model in sdk.models.list()] == ["tiny-sd3", "ink"]
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.models.retrieve("gpt-image-2")
    assert (raised.value.code, raised.value.param) == ("model_not_found", "model")
    unknown = httpx.get(f"{server.url}/v1/models/nope", headers=AUTH, timeout=30)
    assert "'nope' does not exist" in assert_openai_error(unknown, 404, "model_not_found", "model")["message"]


def test_gpt_image_2_generates_base64_with_openais_fields(sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(
        model="gpt-image-2",
        prompt="a paper crane",
        n=2,
        size="512x256",
        quality="high",
        background="opaque",
        moderation="low",
        output_format="jpeg",
        output_compression=70,
        extra_body={"num_inference_steps": 1},
    )
    assert [decoded(item.b64_json).format for item in result.data] == ["JPEG", "JPEG"]
    assert all(item.url is None for item in result.data)
    assert (result.output_format, result.size, result.background, result.quality) == ("jpeg", "512x256", "opaque", None)
    patches = (512 // 16) * (256 // 16)
    usage = result.usage
    assert usage.output_tokens == 2 * patches and usage.input_tokens_details.image_tokens == 0
    assert usage.input_tokens == usage.input_tokens_details.text_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_gpt_image_2_edits(sdk: openai.OpenAI) -> None:
    result = sdk.images.edit(
        model="gpt-image-2",
        image=("in.png", png(photo()), "image/png"),
        prompt="a boat at dusk",
        input_fidelity="high",
        quality="medium",
        background="auto",
        output_format="webp",
        output_compression=50,
        size="256x256",
        extra_body={"num_inference_steps": 2},
    )
    assert decoded(result.data[0].b64_json).format == "WEBP" and result.output_format == "webp"
    assert result.usage.input_tokens_details.image_tokens == 16 * 16 and result.usage.output_tokens == 16 * 16


def test_gpt_image_models_answer_in_base64_only(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.generate(model="gpt-image-1.5", prompt="a cat", response_format="url", size="256x256")
    assert (raised.value.code, raised.value.param) == ("validation_error", "response_format")
    assert "base64 only" in raised.value.body["message"]
    # Other model names keep url images.
    result = sdk.images.generate(model="tiny-sd3", prompt="a cat", response_format="url", **_fast())
    assert result.data[0].url.startswith("http")


def _fast() -> dict:
    return {"size": "256x256", "extra_body": {"num_inference_steps": 1}}


INVALID = [
    # (field, value, words of the message)
    ("quality", "ultra", "'low', 'medium', 'high'"),
    ("quality", "HIGH", "got 'HIGH'"),
    ("background", "sometimes", "'transparent', 'opaque' or 'auto'"),
    ("background", "transparent", "not supported"),
    ("moderation", "high", "'low' or 'auto'"),
    ("style", "bold", "'vivid' or 'natural'"),
    ("complexity", "extreme", "'low', 'medium' or 'high'"),
    ("output_format", "gif", "'png', 'jpeg' or 'webp'"),
    ("output_compression", 101, "less than or equal to 100"),
    ("output_compression", -1, "greater than or equal to 0"),
    ("partial_images", 4, "less than or equal to 3"),
    ("partial_images", -1, "greater than or equal to 0"),
    ("n", 11, "1 to 10 images per request (MAX_IMAGES_PER_REQUEST=10)"),
    ("n", 0, "MAX_IMAGES_PER_REQUEST=10"),
    ("response_format", "url", "base64 only"),
]


@pytest.mark.parametrize(("field", "value", "words"), INVALID, ids=[f"{f}={v}" for f, v, _ in INVALID])
def test_generation_refuses_invalid_values_naming_the_parameter(server: Server, field: str, value, words: str) -> None:
    body = {"prompt": "a cat", "model": "gpt-image-2", field: value, **FAST}
    response = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=AUTH, timeout=60)
    assert words in assert_openai_error(response, 400, "validation_error", field)["message"]


def test_transparent_with_jpeg_is_refused_as_openai_refuses_it(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.generate(model="gpt-image-2", prompt="a cat", background="transparent", output_format="jpeg")
    assert raised.value.param == "background" and "'png' or 'webp', not 'jpeg'" in raised.value.body["message"]


EDIT_INVALID = [
    ("input_fidelity", "medium", "'high' or 'low'"),
    ("quality", "hd", "'standard', 'low', 'medium', 'high'"),
    ("background", "transparent", "not supported"),
    ("moderation", "none", "'low' or 'auto'"),
    ("output_compression", "101", "less than or equal to 100"),
    ("partial_images", "9", "less than or equal to 3"),
    ("n", "11", "MAX_IMAGES_PER_REQUEST=10"),
    ("response_format", "url", "base64 only"),
]


@pytest.mark.parametrize(("field", "value", "words"), EDIT_INVALID, ids=[f"{f}={v}" for f, v, _ in EDIT_INVALID])
def test_edit_refuses_invalid_values_naming_the_parameter(server: Server, field: str, value: str, words: str) -> None:
    files = [("image", ("in.png", png(photo()), "image/png"))]
    data = {"prompt": "a boat", "model": "gpt-image-2", field: value, "size": "256x256"}
    response = httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, headers=AUTH, timeout=60)
    assert words in assert_openai_error(response, 400, "validation_error", field)["message"]


VALID = [
    *[("quality", value) for value in ("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd")],
    *[("background", value) for value in ("opaque", "auto")],
    *[("moderation", value) for value in ("low", "auto")],
    *[("style", value) for value in ("vivid", "natural")],
    *[("complexity", value) for value in ("low", "medium", "high")],
    *[("partial_images", value) for value in (0, 3)],  # without stream: nothing to preview
    ("response_format", "b64_json"),
    ("n", 1),
]


def test_generation_accepts_every_valid_value(server: Server) -> None:
    async def scenario() -> list[tuple[str, object, httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            within_the_queue = asyncio.Semaphore(4)  # MAX_QUEUE_IMAGES is 10 here

            async def one(field: str, value: object) -> tuple[str, object, httpx.Response]:
                body = {"prompt": "a cat", "model": "gpt-image-2", field: value, **FAST}
                async with within_the_queue:
                    return field, value, await http.post("/v1/images/generations", json=body)

            return await asyncio.gather(*(one(field, value) for field, value in VALID))

    for field, value, response in asyncio.run(scenario()):
        assert response.status_code == 200, (field, value, response.text)
        assert len(response.json()["data"]) == 1 and "b64_json" in response.json()["data"][0]


@pytest.mark.parametrize(
    ("output_format", "compression"), [("jpeg", 0), ("jpeg", 100), ("webp", 0), ("webp", 100), ("png", 0)]
)
def test_output_compression_valid_values(sdk: openai.OpenAI, output_format: str, compression: int) -> None:
    result = sdk.images.generate(
        model="gpt-image-2", prompt="a cat", output_format=output_format, output_compression=compression, **_fast()
    )
    assert decoded(result.data[0].b64_json).format == output_format.upper()


def test_edit_accepts_valid_values(server: Server) -> None:
    files = [("image", ("in.png", png(photo()), "image/png"))]
    for field, value in [("input_fidelity", "high"), ("input_fidelity", "low"), ("quality", "standard")]:
        data = {"prompt": "a boat", "model": "gpt-image-2", field: value, "size": "256x256", "num_inference_steps": "1"}
        response = httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, headers=AUTH, timeout=60)
        assert response.status_code == 200, (field, value, response.text)


def test_dall_e_requests_keep_their_leniency(sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(
        model="dall-e-3",
        prompt="a cat",
        response_format="b64_json",
        size="256x256",
        extra_body={"quality": "ultra", "style": "bold", "background": "transparent", "moderation": "none"}
        | {"num_inference_steps": 1},
    )
    assert result.background == "opaque", "asked for transparency, told honestly what it got"
    assert decoded(result.data[0].b64_json).mode == "RGB"


def test_n_up_to_the_raised_cap_and_no_further(sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(prompt="ten lanterns", n=10, model="gpt-image-2", **_fast())
    assert len(result.data) == 10 and len({item.b64_json for item in result.data}) == 10
    assert result.usage.output_tokens == 10 * 16 * 16
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.generate(prompt="eleven lanterns", n=11, **_fast())
    assert raised.value.param == "n" and "1 to 10" in raised.value.body["message"]


def test_a_full_queue_says_when_to_retry_within_a_minute(server: Server, sdk: openai.OpenAI) -> None:
    slow = {"prompt": "a slow one", "n": 10, "size": "512x512", "num_inference_steps": 2}

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            running = asyncio.ensure_future(http.post("/v1/images/generations", json=slow))
            # Wait (on the metric, no fixed sleep) until the 10 images are queued or running.
            while not running.done() and "sd35_queue_images 0.0" in (await http.get("/metrics")).text:
                await asyncio.sleep(0.02)
            assert not running.done(), "the slow request ended before the queue could be seen full"
            refused = await http.post("/v1/images/generations", json={**slow, "prompt": "one too many"})
            return refused, await running

    refused, done = asyncio.run(scenario())
    assert_openai_error(refused, 429, "queue_full")
    assert 1 <= int(refused.headers["retry-after"]) <= 59
    assert 1 <= int(refused.headers["retry-after-ms"]) <= 59_000 and refused.headers["x-should-retry"] == "true"
    assert done.status_code == 200 and len(done.json()["data"]) == 10
