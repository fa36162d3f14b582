"""OpenAI of today, in-process: usage counts, n split into batches, input_fidelity, model lookup, retry hints.

What the official SDKs see over a real socket is in tests/test_openai_server.py;
the shapes, against OpenAI's own OpenAPI document, in tests/test_conformance.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from starlette.testclient import TestClient

from sd35.engine.usage import T5_MAX_SEQUENCE_LENGTH
from sd35.errors import (
    APIError,
    BodyReadTimeoutError,
    ModelNotLoadedError,
    RateLimitError,
    ServiceUnavailableError,
    UploadsBusyError,
    ValidationError,
    error_payload,
)
from tests.conftest import assert_openai_error, pixels, service_client
from tests.test_edits import photo, png

GEN = "/v1/images/generations"
EDITS = "/v1/images/edits"
FAST = {"size": "256x256", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "WARMUP": "false",
        "MAX_IMAGES_PER_REQUEST": "10",
        "MAX_BATCH_IMAGES": "4",
    }
    with service_client(env) as test_client:
        yield test_client


def engine():
    return importlib.import_module("service").app.state.serving.engine


def t5_tokens(text: str) -> int:
    """What the tiny pipeline's T5 tokenizer makes of ``text``, special tokens included, nothing cut off."""
    return len(engine().pipeline.tokenizer_3(text, truncation=False).input_ids)


# --- usage -----------------------------------------------------------------


def test_usage_counts_prompt_tokens_and_latent_patches(client: TestClient) -> None:
    prompt = "a lighthouse on a cliff at dawn, oil painting"
    body = {"prompt": prompt, "model": "gpt-image-2", "n": 2, "size": "256x512", "num_inference_steps": 1}
    usage = client.post(GEN, json=body).json()["usage"]
    text = t5_tokens(prompt)
    assert 5 < text < 100
    patches = (256 // 16) * (512 // 16)
    assert usage == {
        "input_tokens": text,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens": 2 * patches,
        "output_tokens_details": {"image_tokens": 2 * patches, "text_tokens": 0},
        "total_tokens": text + 2 * patches,
    }


def test_usage_counts_what_the_encoder_reads_and_the_negative_prompt_with_guidance(client: TestClient) -> None:
    long_prompt = "a very long prompt about many things " * 60
    assert t5_tokens(long_prompt) > T5_MAX_SEQUENCE_LENGTH
    usage = client.post(GEN, json={"prompt": long_prompt, **FAST}).json()["usage"]
    assert usage["input_tokens_details"]["text_tokens"] == T5_MAX_SEQUENCE_LENGTH, "T5 reads 256 tokens, no more"

    guided = {"prompt": "a cat", "negative_prompt": "blurry, dark", "guidance_scale": 2.0, **FAST}
    with_cfg = client.post(GEN, json=guided).json()["usage"]["input_tokens_details"]["text_tokens"]
    assert with_cfg == t5_tokens("a cat") + t5_tokens("blurry, dark")
    without = client.post(GEN, json={**guided, "guidance_scale": 0.0}).json()["usage"]["input_tokens_details"]
    assert without["text_tokens"] == t5_tokens("a cat"), "no guidance: the negative prompt is never encoded"


def test_edit_usage_counts_the_input_image(client: TestClient) -> None:
    files = [("image", ("in.png", png(photo()), "image/png"))]
    data = {"prompt": "a boat", "model": "gpt-image-1.5", "size": "512x256", "num_inference_steps": "2"}
    usage = client.post(EDITS, files=files, data=data).json()["usage"]
    patches = (512 // 16) * (256 // 16)
    assert usage["input_tokens_details"] == {"text_tokens": t5_tokens("a boat"), "image_tokens": patches}
    assert usage["input_tokens"] == t5_tokens("a boat") + patches
    assert usage["output_tokens"] == patches and usage["total_tokens"] == usage["input_tokens"] + patches


def test_streamed_completed_events_carry_the_same_usage(client: TestClient) -> None:
    from tests.test_streaming import read_events

    body = {"prompt": "a heron", "model": "gpt-image-2", "n": 2, "stream": True, **FAST}
    with client.stream("POST", GEN, json=body) as response:
        completed = [data for name, data in read_events(response) if name.endswith(".completed")]
    plain = client.post(GEN, json={**body, "stream": False}).json()["usage"]
    assert plain.pop("output_tokens_details") == {"image_tokens": 2 * 256, "text_tokens": 0}
    assert [event["usage"] for event in completed] == [plain, plain], "no output details: OpenAI's events have none"
    assert plain["output_tokens"] == 2 * 256


# --- n: MAX_IMAGES_PER_REQUEST, several batches -----------------------------


def test_large_n_runs_as_batches_of_max_batch_images_with_consecutive_seeds(client: TestClient) -> None:
    runner = engine().runner
    runner.batch_sizes.clear()
    body = {"prompt": "a row of houses", "n": 10, "seed": 40, **FAST}
    response = client.post(GEN, json=body)
    assert response.status_code == 200, response.text
    images = [pixels(item["b64_json"]) for item in response.json()["data"]]
    assert len(images) == 10
    assert sum(runner.batch_sizes) == 10 and max(runner.batch_sizes) <= 4, list(runner.batch_sizes)
    # Image i is the image of seed + i, whichever batch made it.
    for index in (0, 5, 9):
        alone = client.post(GEN, json={**body, "n": 1, "seed": 40 + index}).json()["data"][0]["b64_json"]
        assert np.abs(images[index] - pixels(alone)).max() <= 1, index


def test_a_stream_of_several_batches_numbers_every_image(client: TestClient) -> None:
    from tests.test_streaming import read_events

    body = {"prompt": "five kites", "n": 5, "stream": True, "partial_images": 1, "size": "256x256"}
    with client.stream("POST", GEN, json={**body, "num_inference_steps": 2}) as response:
        events = read_events(response)
    partial = sorted(data["image_index"] for name, data in events if name.endswith(".partial_image"))
    completed = [data["image_index"] for name, data in events if name.endswith(".completed")]
    assert partial == completed == [0, 1, 2, 3, 4], "batches of 4 and 1, numbered as one request"


def test_n_is_checked_against_the_configured_cap(client: TestClient) -> None:
    for n in (0, 11):
        error = assert_openai_error(client.post(GEN, json={"prompt": "a", "n": n}), 400, "validation_error", "n")
        assert "1 to 10 images per request (MAX_IMAGES_PER_REQUEST=10)" in error["message"]
    files = [("image", ("in.png", png(photo()), "image/png"))]
    refused = client.post(EDITS, files=files, data={"prompt": "a", "n": "11"})
    assert "MAX_IMAGES_PER_REQUEST=10" in assert_openai_error(refused, 400, "validation_error", "n")["message"]


def test_a_request_refused_halfway_through_queueing_leaves_nothing_queued(client: TestClient) -> None:
    from dataclasses import replace

    from sd35.engine.worker import Job
    from sd35.errors import QueueFullError

    serving = importlib.import_module("service").app.state.serving
    engine = serving.engine
    params = serving.params_for(_generation(n=10))
    # As if 57 of the 64 queue places were taken: the 1st chunk of 4 fits, the 2nd does not. The engine's lock
    # (reentrant) is held throughout, so the worker never takes the filler.
    with engine._cond:
        filler = Job(replace(params, num_images=57))
        engine._queue.push(filler)
        try:
            with pytest.raises(QueueFullError):
                serving._submit(params)
            assert engine.queued_images == 57 and len(engine._queue) == 1, "the first chunk left the queue again"
        finally:
            engine._queue.remove(filler)
    assert client.post(GEN, json={"prompt": "a", "n": 10, **FAST}).status_code == 200


def test_a_timeout_gives_up_every_batch_of_the_request(client: TestClient) -> None:
    from sd35.errors import RequestTimeoutError

    serving = importlib.import_module("service").app.state.serving
    params = serving.params_for(_generation(n=10, size="512x512", num_inference_steps=4))
    with pytest.raises(RequestTimeoutError):
        client.portal.call(serving.run, params, 0.05)
    queue = serving.engine
    with queue._cond:
        assert queue.queued_images == 0 and not queue._queue, "the batches not yet started left the queue"
    assert client.post(GEN, json={"prompt": "a", **FAST}).status_code == 200


def _generation(**fields):
    from sd35.protocol import ImageGenerationRequest

    return ImageGenerationRequest(prompt="a", **{**FAST, **fields})


# --- input_fidelity ----------------------------------------------------------


def test_input_fidelity_high_keeps_more_of_the_input(client: TestClient) -> None:
    files = [("image", ("in.png", png(photo()), "image/png"))]
    data = {"prompt": "a storm", "seed": "5", "size": "256x256", "num_inference_steps": "4"}

    def edit(**extra: str) -> np.ndarray:
        response = client.post(EDITS, files=files, data={**data, **extra})
        assert response.status_code == 200, response.text
        return pixels(response.json()["data"][0]["b64_json"])

    runner = engine().runner
    high = edit(input_fidelity="high")
    high_steps = runner.steps_run[-1]
    default = edit()
    default_steps = runner.steps_run[-1]
    # Strength 0.4 of 4 steps runs the last 2; the default 0.6, the last 3 (the tiny random VAE
    # cannot show "closer to the input" in pixels, the schedule can).
    assert (high_steps, default_steps) == (2, 3)
    assert not np.array_equal(high, default)
    assert np.array_equal(high, edit(strength="0.4")), "high fidelity is a gentler image-to-image pass"
    assert np.array_equal(edit(input_fidelity="low"), default), "low is OpenAI's default"


# --- model lookup ------------------------------------------------------------


def test_models_retrieve_accepts_a_hub_id_with_its_slash(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    hub_id = "stabilityai/stable-diffusion-3.5-large-turbo"
    serving = importlib.import_module("service").app.state.serving
    monkeypatch.setattr(serving, "settings", replace(serving.settings, model_id=hub_id))
    assert client.get(f"/v1/models/{hub_id}").json()["id"] == hub_id
    assert client.get(f"/v1/models/{quote(hub_id, safe='')}").json()["id"] == hub_id
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=client, max_retries=0)
    assert sdk.models.retrieve(hub_id).id == hub_id, "the SDK sends the slash as %2F"
    assert_openai_error(client.get("/v1/models/stabilityai/other"), 404, "model_not_found", "model")


# --- retry hints -------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retry_after", "retry_after_ms"),
    [
        (RateLimitError("full", retry_after=444), "59", "59000"),  # a long queue of slow jobs
        (RateLimitError("full", retry_after=2.5), "3", "2500"),
        (RateLimitError("full", retry_after=0.01), "1", "10"),
        (RateLimitError("full"), "1", "1000"),  # BentoML's own 429 names no delay
        (ModelNotLoadedError("loading", retry_after=10), "10", "10000"),
        (UploadsBusyError("busy", retry_after=2), "2", "2000"),
        (ServiceUnavailableError("stopped"), "1", "1000"),
    ],
)
def test_every_retryable_429_and_503_says_when_within_a_minute(
    exc: APIError, retry_after: str, retry_after_ms: str
) -> None:
    status, _, headers = error_payload(exc)
    assert status in (429, 503)
    assert headers == {"x-should-retry": "true", "retry-after": retry_after, "retry-after-ms": retry_after_ms}


@pytest.mark.parametrize(
    "exc",
    [
        ModelNotLoadedError("the model failed to load: no such directory", retryable=False),
        ValidationError("bad", param="n"),
        BodyReadTimeoutError("stalled"),
    ],
)
def test_no_delay_where_none_helps(exc: APIError) -> None:
    _, _, headers = error_payload(exc)
    assert "retry-after" not in headers and "retry-after-ms" not in headers
    assert headers["x-should-retry"] == ("true" if isinstance(exc, BodyReadTimeoutError) else "false")


def test_openapi_document_lists_the_new_errors_and_headers(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    generations = paths["/v1/images/generations"]["post"]["responses"]
    assert "BODY_READ_TIMEOUT" in generations["408"]["description"]
    assert "server_busy" in generations["503"]["description"]
    for status in ("429", "503"):
        assert {"retry-after", "retry-after-ms", "x-should-retry"} <= set(generations[status]["headers"])
    retrieve = paths["/v1/models/{model}"]["get"]
    assert "model_not_found" in retrieve["responses"]["404"]["description"]
    for path in ("/v1/models", "/v1/models/{model}", "/v1/queue"):
        starting = paths[path]["get"]["responses"]["503"]
        assert "model_not_loaded" in starting["description"] and "retry-after" in starting["headers"], path
    # Swagger UI's "Authorize" sends the key where one is needed, and only there: image URLs are capabilities.
    bearer = [{"bearerAuth": []}]
    assert retrieve["security"] == bearer and paths["/v1/queue"]["get"]["security"] == bearer
    assert "security" not in paths["/v1/images/files/{name}"]["get"]
    n = client.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]["properties"]["n"]
    assert (n["minimum"], n["maximum"]) == (1, 10) and "MAX_IMAGES_PER_REQUEST" in n["description"]


def test_routes_that_need_no_model_answer_503_before_the_service_is_up(client: TestClient) -> None:
    state = importlib.import_module("service").app.state
    serving, state.serving = state.serving, None
    try:
        for path in ("/v1/models", "/v1/models/tiny-sd3", "/v1/queue"):
            response = client.get(path)
            assert_openai_error(response, 503, "model_not_loaded")
            assert response.headers["retry-after"] == "5" and response.headers["x-should-retry"] == "true"
    finally:
        state.serving = serving
    assert client.get("/v1/models").status_code == 200


def test_a_request_larger_than_the_queue_is_a_400_even_in_batches(client: TestClient, monkeypatch) -> None:
    serving = importlib.import_module("service").app.state.serving
    monkeypatch.setattr(serving.engine, "settings", replace(serving.engine.settings, max_queue_images=6))
    error = assert_openai_error(client.post(GEN, json={"prompt": "a", "n": 8, **FAST}), 400, "validation_error", "n")
    assert "MAX_QUEUE_IMAGES=6" in error["message"], "batches of 4 would each fit; all 8 never could"


def test_a_request_larger_than_the_keys_share_of_the_queue_is_a_400_even_in_batches(
    client: TestClient, monkeypatch
) -> None:
    from sd35.engine.fairness import EqualShares

    serving = importlib.import_module("service").app.state.serving
    engine = serving.engine
    monkeypatch.setattr(engine, "policy", EqualShares(6))  # every key may have 6 images queued
    params = serving.params_for(_generation(n=8))
    # The engine's lock held, the worker takes nothing: the 2nd batch of 4 meets the 4 of the 1st. Checked batch by
    # batch, that was a 429 to retry for ever (or a 200, when the worker had taken the 1st batch in time).
    with engine._cond, pytest.raises(ValidationError) as never:
        serving._submit(params)
    assert never.value.param == "n" and "6 per API key" in never.value.message
    assert engine.queued_images == 0
    refused = client.post(GEN, json={"prompt": "a", "n": 8, **FAST})
    assert "6 per API key" in assert_openai_error(refused, 400, "validation_error", "n")["message"]
