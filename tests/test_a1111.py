"""AUTOMATIC1111's API in-process: shapes, auth, translation to the engine, progress, interrupt, skip, batching."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from sd35.errors import RateLimitError, ValidationError, error_payload
from tests.conftest import assert_openai_error, pixels, service_client
from tests.test_edits import photo, png
from tests.test_lora import adapters_env

KEY = "sk-a1111"
A = "/sdapi/v1"
TXT2IMG = f"{A}/txt2img"
IMG2IMG = f"{A}/img2img"
GEN = "/v1/images/generations"
FAST = {"steps": 2, "width": 256, "height": 256}


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, tiny_loras: dict[str, Path]) -> Iterator[TestClient]:
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "API_KEY": KEY,
        "LORA_ADAPTERS": adapters_env(tiny_loras),
        "WARMUP": "false",
    }
    with service_client(env) as test_client:
        test_client.auth = ("webui", KEY)  # HTTP Basic, the key as the password
        yield test_client


def engine() -> Any:
    import service

    return service.app.state.serving.engine


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def txt2img(client: TestClient, **body: Any) -> tuple[list[np.ndarray], dict[str, Any], dict[str, Any]]:
    """The images (as pixels), the parsed info and the parameters of a successful txt2img."""
    response = client.post(TXT2IMG, json={**FAST, **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    return [pixels(image) for image in payload["images"]], json.loads(payload["info"]), payload["parameters"]


def openai_image(client: TestClient, **body: Any) -> np.ndarray:
    base = {"size": "256x256", "num_inference_steps": 2, "response_format": "b64_json"}
    response = client.post(GEN, json={**base, **body}, auth=None, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    return pixels(response.json()["data"][0]["b64_json"])


def assert_a1111_error(response: Any, status: int, *mentions: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    for word in mentions:
        assert word in body["detail"], body
    assert "Traceback" not in body["detail"]
    return body["detail"]


# --- authentication ---------------------------------------------------------------


def test_basic_with_an_api_key_as_password_or_bearer_is_accepted(client: TestClient) -> None:
    assert client.get(f"{A}/options").status_code == 200
    assert client.get(f"{A}/options", auth=("any-user-name", KEY)).status_code == 200
    bearer = client.get(f"{A}/options", auth=None, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200


@pytest.mark.parametrize(
    ("headers", "auth", "message"),
    [
        ({}, None, "Authorization header is required"),
        ({}, ("webui", "wrong"), "Invalid API key"),
        ({"Authorization": "Basic !!!"}, None, "Expected 'Basic <base64 of user:api-key>'"),
        ({"Authorization": "Basic " + base64.b64encode(KEY.encode()).decode()}, None, "Expected 'Basic"),
        # Open WebUI without credentials configured sends an empty header.
        ({"Authorization": ""}, None, "Expected 'Basic"),
        ({"Authorization": "Bearer wrong"}, None, "Invalid API key"),
    ],
)
def test_a_missing_or_wrong_credential_is_an_a1111_401(
    client: TestClient, headers: dict[str, str], auth: Any, message: str
) -> None:
    response = client.get(f"{A}/sd-models", headers=headers, auth=auth)
    assert_a1111_error(response, 401, message)
    assert response.headers["www-authenticate"].startswith("Basic")


def test_every_sdapi_route_needs_the_key_and_basic_stays_off_the_openai_routes(client: TestClient) -> None:
    from fastapi.routing import iter_route_contexts

    import service

    routes = [
        (route.path, method) for route in iter_route_contexts(service.app.routes) for method in route.methods or ()
    ]
    sdapi = [(path, method) for path, method in routes if path.startswith(A)]
    assert len(sdapi) >= 16
    for path, method in sdapi:
        assert_a1111_error(client.request(method, path, auth=None), 401)
    # OpenAI's routes keep OpenAI's Bearer scheme and messages.
    assert_openai_error(client.get("/v1/models"), 401, "authentication_error")


# --- listings ---------------------------------------------------------------------


def test_the_listings_describe_sd35_as_it_is(client: TestClient, tiny_model_dir: Path, tiny_loras: dict) -> None:
    models = client.get(f"{A}/sd-models").json()
    assert models == [
        {
            "title": tiny_model_dir.name,
            "model_name": tiny_model_dir.name,
            "hash": None,
            "sha256": None,
            "filename": str(tiny_model_dir),
            "config": None,
        }
    ]
    loras = client.get(f"{A}/loras").json()
    assert [(lora["name"], lora["alias"], lora["path"]) for lora in loras] == [
        ("ink", "ink", str(tiny_loras["ink"])),
        ("neon", "neon", str(tiny_loras["neon"])),
    ]
    assert all(set(lora) == {"name", "alias", "path", "metadata"} for lora in loras)
    samplers = client.get(f"{A}/samplers").json()
    assert [sampler["name"] for sampler in samplers] == ["Euler"]
    assert set(samplers[0]) == {"name", "aliases", "options"}
    schedulers = client.get(f"{A}/schedulers").json()
    assert [(s["name"], s["label"]) for s in schedulers] == [("automatic", "Automatic")]
    assert set(schedulers[0]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    upscalers = client.get(f"{A}/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None"]
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert client.get(f"{A}/latent-upscale-modes").json() == []
    assert client.get(f"{A}/sd-vae").json() == []
    assert client.get(f"{A}/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.post(f"{A}/refresh-checkpoints").json() is None


def test_unknown_paths_and_methods_are_a1111_shaped(client: TestClient) -> None:
    assert_a1111_error(client.get(f"{A}/extra-single-image"), 404, "/sdapi/v1/extra-single-image")
    assert_a1111_error(client.get(TXT2IMG), 405, "GET")


def test_openapi_documents_the_a1111_routes_with_their_422_and_basic_auth(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"][TXT2IMG]["post"]
    assert operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/A1111Error")
    assert {"basicAuth": []} in operation["security"]
    # The statuses its requests really meet, the retryable ones with their delay, and no more.
    assert {"401", "408", "422", "429", "500", "503", "504"} <= set(operation["responses"])
    assert {"retry-after", "retry-after-ms"} <= set(operation["responses"]["429"]["headers"])
    assert set(schema["paths"][f"{A}/options"]["post"]["responses"]) == {"200", "401", "422"}
    assert "422" not in schema["paths"][GEN]["post"]["responses"]
    # Every reference resolves (ReDoc refuses to render a document with a dangling one).
    text = json.dumps(schema)
    for name in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert name in schema["components"]["schemas"], name


# --- txt2img ----------------------------------------------------------------------


def test_txt2img_answers_in_a1111s_shape_and_info_says_what_was_used(client: TestClient) -> None:
    # What webuiapi sends, plus SillyTavern's own url and auth fields.
    body = {
        **FAST,
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "seed": 40,
        "batch_size": 2,
        "n_iter": 2,
        "sampler_name": "DPM++ 2M",
        "scheduler": "karras",
        "cfg_scale": 1.5,
        "enable_hr": True,
        "hr_upscaler": "Latent",
        "denoising_strength": 0.7,
        "restore_faces": True,
        "styles": ["cinematic"],
        "script_name": None,
        "script_args": [],
        "alwayson_scripts": {},
        "override_settings": {"CLIP_stop_at_last_layers": 2},
        "eta": 1.0,
        "url": "http://localhost:7860",
        "auth": "user:secret",
    }
    response = client.post(TXT2IMG, json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"images", "parameters", "info"}
    images = [Image.open(io.BytesIO(base64.b64decode(image))) for image in payload["images"]]
    assert [(image.format, image.size) for image in images] == [("PNG", (256, 256))] * 4
    info = json.loads(payload["info"])
    assert info["seed"] == 40 and info["all_seeds"] == [40, 41, 42, 43]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (256, 256, 2, 1.5)
    assert info["batch_size"] == 2 and info["sampler_name"] == "Euler"
    assert info["prompt"] == "a lighthouse" and info["negative_prompt"] == "fog"
    assert info["denoising_strength"] is None, "txt2img has no denoising strength without hires fix"
    extra = info["extra_generation_params"]
    assert extra["Sampler requested"] == "DPM++ 2M"
    for ignored in ("enable_hr", "restore_faces", "styles", "override_settings.CLIP_stop_at_last_layers"):
        assert ignored in extra["Ignored"]
    assert len(info["infotexts"]) == 4 and "Seed: 41," in info["infotexts"][1]
    assert info["infotexts"][0].startswith("a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: Euler")
    parameters = payload["parameters"]
    assert parameters["prompt"] == "a lighthouse" and parameters["batch_size"] == 2
    assert "auth" not in parameters and "url" not in parameters, "unknown fields (credentials!) are not echoed"


def test_seed_minus_one_draws_a_seed_that_info_reports_and_that_gives_the_same_image(client: TestClient) -> None:
    first, info, _ = txt2img(client, prompt="a fox", seed=-1)
    _, other, _ = txt2img(client, prompt="a fox")
    assert info["seed"] != other["seed"], "each request draws its own seed"
    again, same, _ = txt2img(client, prompt="a fox", seed=info["seed"])
    assert same["all_seeds"] == info["all_seeds"]
    assert np.array_equal(again[0], first[0]), "the reported seed reproduces the image exactly"


def test_txt2img_is_the_openai_routes_engine_and_batch_images_are_their_seeds_alone(client: TestClient) -> None:
    alone, _, _ = txt2img(client, prompt="a harbour", seed=7)
    assert np.array_equal(alone[0], openai_image(client, prompt="a harbour", seed=7))
    # Kernels differ slightly with the batch size: ±1/255 (the engine's batching contract).
    images, _, _ = txt2img(client, prompt="a harbour", seed=7, batch_size=2)
    assert np.abs(images[0] - alone[0]).max() <= 1
    assert np.abs(images[1] - openai_image(client, prompt="a harbour", seed=8)).max() <= 1


def test_send_images_false_answers_without_images(client: TestClient) -> None:
    response = client.post(TXT2IMG, json={**FAST, "prompt": "a boat", "seed": 1, "send_images": False})
    assert response.status_code == 200 and response.json()["images"] == []
    assert json.loads(response.json()["info"])["all_seeds"] == [1]


# --- LoRA: prompt tags and checkpoints ----------------------------------------------


def test_a_lora_tag_selects_the_adapter_at_its_weight_and_leaves_the_prompt(client: TestClient) -> None:
    images, info, _ = txt2img(client, prompt="a lighthouse <lora:ink:0.5>", seed=3)
    assert np.array_equal(images[0], openai_image(client, prompt="a lighthouse", seed=3, model="ink", lora_scale=0.5))
    assert info["extra_generation_params"]["Lora"] == "ink:0.5"
    assert info["prompt"] == "a lighthouse <lora:ink:0.5>", "info repeats the prompt as sent, as AUTOMATIC1111 does"
    # Without a weight, the adapter's configured scale (neon=...@0.5).
    plain, info, _ = txt2img(client, prompt="<lora:neon> a lighthouse", seed=3)
    assert info["extra_generation_params"]["Lora"] == "neon:0.5"
    assert np.array_equal(plain[0], openai_image(client, prompt="a lighthouse", seed=3, model="neon"))
    base, _, _ = txt2img(client, prompt="a lighthouse", seed=3)
    assert np.abs(base[0] - images[0]).mean() > 1, "the adapter changed the image"


@pytest.mark.parametrize(
    ("prompt", "mention"),
    [
        ("a cat <lora:nope:1>", "'nope'"),
        ("a cat <lora:ink:3>", "from 0 to 2"),
        ("a cat <lora:ink:x>", "from 0 to 2"),
        ("<lora:ink:1> a cat <lora:neon:1>", "one LoRA"),
    ],
)
def test_a_bad_lora_tag_is_a_422_naming_it(client: TestClient, prompt: str, mention: str) -> None:
    assert_a1111_error(client.post(TXT2IMG, json={**FAST, "prompt": prompt}), 422, "'prompt'", mention)


def test_sd_model_checkpoint_selects_the_base_model_or_an_adapter(client: TestClient, tiny_model_dir: Path) -> None:
    base = tiny_model_dir.name
    options = client.get(f"{A}/options").json()
    assert options["sd_model_checkpoint"] == base
    try:
        response = client.post(f"{A}/options", json={"sd_model_checkpoint": "neon"})
        assert response.status_code == 200 and response.json() is None
        assert client.get(f"{A}/options").json()["sd_model_checkpoint"] == "neon"
        images, info, _ = txt2img(client, prompt="a tower", seed=5)
        assert info["sd_model_name"] == "neon"
        assert np.array_equal(images[0], openai_image(client, prompt="a tower", seed=5, model="neon"))
        # override_settings chooses for one request
        base_images, info, _ = txt2img(
            client, prompt="a tower", seed=5, override_settings={"sd_model_checkpoint": base}
        )
        assert info["sd_model_name"] == base
        assert np.array_equal(base_images[0], openai_image(client, prompt="a tower", seed=5))
        assert_a1111_error(
            client.post(TXT2IMG, json={**FAST, "override_settings": {"sd_model_checkpoint": "sdxl.safetensors"}}),
            422,
            "'override_settings.sd_model_checkpoint'",
            "'sdxl.safetensors'",
        )
    finally:
        # Open WebUI posts the whole options object back with the model changed.
        restored = client.post(f"{A}/options", json={**options, "sd_model_checkpoint": base})
        assert restored.status_code == 200
    assert client.get(f"{A}/options").json() == options
    assert_a1111_error(
        client.post(f"{A}/options", json={"sd_model_checkpoint": "v1-5-pruned.ckpt"}), 422, "'sd_model_checkpoint'"
    )
    assert_a1111_error(client.post(f"{A}/options", json=["not", "an", "object"]), 422)


# --- img2img ------------------------------------------------------------------------


def test_img2img_without_a_mask_keeps_the_input_size_and_runs_part_of_the_steps(client: TestClient) -> None:
    source = photo(320, 256, seed=4)
    body = {"prompt": "a moon", "init_images": [b64(source)], "steps": 4, "denoising_strength": 0.5, "seed": 2}
    response = client.post(IMG2IMG, json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert pixels(payload["images"][0]).shape == (256, 320, 3)
    assert list(engine().steps_run)[-1] == 2, "strength 0.5 of 4 steps runs 2"
    info = json.loads(payload["info"])
    assert info["denoising_strength"] == 0.5 and info["extra_generation_params"]["Mask"] == "none"
    assert payload["parameters"]["init_images"] is None, "inputs are echoed only with include_init_images"
    # a data: URI works too, and include_init_images echoes it
    uri = f"data:image/png;base64,{b64(source)}"
    again = client.post(IMG2IMG, json={**body, "init_images": [uri], "include_init_images": True})
    assert again.status_code == 200 and again.json()["parameters"]["init_images"] == [uri]
    assert np.array_equal(pixels(again.json()["images"][0]), pixels(payload["images"][0]))


def _mask(left: Image.Image | None = None, *, rgba: bool = False) -> str:
    """White (or, with alpha, opaque) on the left half: AUTOMATIC1111 repaints there."""
    if rgba:
        alpha = np.zeros((256, 256), np.uint8)
        alpha[:, :128] = 255
        return b64(Image.fromarray(np.dstack([np.zeros((256, 256, 3), np.uint8), alpha]), "RGBA"))
    gray = np.zeros((256, 256), np.uint8)
    gray[:, :128] = 255
    return b64(Image.fromarray(gray, "L"))


@pytest.mark.parametrize(
    ("mask", "invert", "kept"),
    [
        (_mask(), 0, slice(128, 256)),
        (_mask(), 1, slice(0, 128)),
        (_mask(rgba=True), 0, slice(128, 256)),
    ],
    ids=["white-repaints", "inverted", "opaque-repaints"],
)
def test_img2img_with_a_mask_repaints_as_a1111_does(client: TestClient, mask: str, invert: int, kept: slice) -> None:
    source = photo(256, 256, seed=6)
    body = {"prompt": "a door", "init_images": [b64(source)], "mask": mask, "inpainting_mask_invert": invert, "seed": 1}
    response = client.post(IMG2IMG, json={**body, "steps": 4, "denoising_strength": 1.0})
    assert response.status_code == 200, response.text
    result = pixels(response.json()["images"][0])
    original = np.asarray(source, dtype=np.int16)
    repainted = slice(0, 128) if kept.start else slice(128, 256)
    assert np.array_equal(result[:, kept], original[:, kept]), "what the mask keeps is the input, exactly"
    assert np.abs(result[:, repainted] - original[:, repainted]).mean() > 5, "what it marks is painted anew"


def test_a_large_img2img_body_is_an_upload_not_a_json_body(client: TestClient) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (640, 640, 3), dtype=np.uint8))
    image = b64(noise)
    assert len(image) > 1 << 20, "bigger than MAX_BODY_BYTES"
    body = {"prompt": "x", "init_images": [image], "width": 256, "height": 256, "steps": 2, "seed": 1}
    assert client.post(IMG2IMG, json=body).status_code == 200
    too_large = client.post(TXT2IMG, json={"prompt": "x", "styles": [image]})
    assert_a1111_error(too_large, 422, "MAX_BODY_BYTES")


# --- limits and validation -------------------------------------------------------------

INIT = b64(photo(256, 256))


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (TXT2IMG, {"steps": 0}, "'steps'"),
        (TXT2IMG, {"steps": 51}, "'steps'"),
        (TXT2IMG, {"steps": "many"}, "'steps'"),
        (TXT2IMG, {"cfg_scale": 20.5}, "'cfg_scale'"),
        (TXT2IMG, {"width": 1000}, "'width'"),
        (TXT2IMG, {"height": 64}, "'height'"),
        (TXT2IMG, {"width": 2048, "height": 2048}, "'width'"),
        (TXT2IMG, {"batch_size": 5}, "'batch_size'"),
        (TXT2IMG, {"batch_size": 0}, "'batch_size'"),
        (TXT2IMG, {"batch_size": 4, "n_iter": 17}, "'n_iter'"),
        (TXT2IMG, {"seed": -2}, "'seed'"),
        (TXT2IMG, {"seed": 2**64}, "'seed'"),
        (TXT2IMG, {"prompt": "x" * 4097}, "'prompt'"),
        (TXT2IMG, {"negative_prompt": ["not", "text"]}, "'negative_prompt'"),
        (TXT2IMG, {"override_settings": "sd35"}, "'override_settings'"),
        (IMG2IMG, {}, "'init_images'"),
        (IMG2IMG, {"init_images": []}, "'init_images'"),
        (IMG2IMG, {"init_images": ["!!!"]}, "'init_images[0]'"),
        (IMG2IMG, {"init_images": ["http://169.254.169.254/latest/meta-data"]}, "URLs"),
        (IMG2IMG, {"init_images": [base64.b64encode(b"GIF89a....").decode()]}, "'init_images[0]'"),
        (IMG2IMG, {"init_images": [INIT], "mask": "bm90IGFuIGltYWdl"}, "'mask'"),
        (IMG2IMG, {"init_images": [INIT], "denoising_strength": 0}, "'denoising_strength'"),
        (IMG2IMG, {"init_images": [INIT], "denoising_strength": 1.5}, "'denoising_strength'"),
        (IMG2IMG, {"init_images": [INIT], "inpainting_mask_invert": 2}, "'inpainting_mask_invert'"),
        (IMG2IMG, {"init_images": [INIT], "resize_mode": 7}, "'resize_mode'"),
    ],
)
def test_an_invalid_field_is_a_422_whose_detail_names_it(
    client: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    assert_a1111_error(client.post(path, json={"prompt": "a cat", **FAST, **body}), 422, field)


def test_batch_size_follows_the_batch_size_the_memory_plan_resolved(client: TestClient, monkeypatch) -> None:
    """One iteration is one pipeline call: never larger than MAX_BATCH_IMAGES as the engine resolved it (the memory
    plan lowers it where a full batch would not fit the GPU), not as it was configured."""
    running = engine()
    monkeypatch.setattr(running, "settings", replace(running.settings, max_batch_images=2))
    response = client.post(TXT2IMG, json={"prompt": "a cat", **FAST, "batch_size": 3})
    assert_a1111_error(response, 422, "'batch_size'", "MAX_BATCH_IMAGES=2")


def test_img2img_inputs_are_decoded_on_the_decoding_pool(client: TestClient, monkeypatch) -> None:
    """As edits' uploads are: a large input never holds the threads that encode everyone's responses."""
    from sd35.a1111 import translate

    threads: list[str] = []
    plan_img2img = translate.plan_img2img

    def recorded(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return plan_img2img(*args)

    monkeypatch.setattr(translate, "plan_img2img", recorded)
    response = client.post(IMG2IMG, json={"prompt": "a cat", **FAST, "init_images": [INIT]})
    assert response.status_code == 200, response.text
    assert len(threads) == 1 and threads[0].startswith("sd35-decode"), threads


def test_a_timeout_names_request_timeout_not_what_an_iteration_had_left(client: TestClient, monkeypatch) -> None:
    from sd35.errors import RequestTimeoutError

    waits: list[float] = []

    async def late(job: Any, timeout: float) -> Any:
        """The first iteration takes 0.2 s, the second times out with what was left of the request's time."""
        running.abandon(job)
        waits.append(timeout)
        if len(waits) == 1:
            await asyncio.sleep(0.2)
            return [np.zeros((256, 256, 3), np.uint8)] * job.images
        raise RequestTimeoutError(f"The request did not finish within {timeout:g} seconds (REQUEST_TIMEOUT).")

    running = engine()
    monkeypatch.setattr(running, "result", late)
    response = client.post(TXT2IMG, json={"prompt": "a cat", **FAST, "n_iter": 2})
    assert_a1111_error(response, 504, "within 300 seconds (REQUEST_TIMEOUT)")
    assert len(waits) == 2 and waits[1] < 299.9, waits


def _queue_full_for_the_second_iteration(monkeypatch, refusals: int | None) -> list[int]:
    """engine.submit refuses the second iteration ``refusals`` times (None: always) with the queue full."""
    from sd35.errors import QueueFullError

    running = engine()
    submit = running.submit
    calls: list[int] = []

    def crowded(params: Any) -> Any:
        calls.append(params.seed)
        if len(set(calls)) == 2 and (refusals is None or calls.count(params.seed) <= refusals):
            raise QueueFullError("The queue is full (MAX_QUEUE_IMAGES=1).", retry_after=1)
        return submit(params)

    monkeypatch.setattr(running, "submit", crowded)
    return calls


def test_a_later_iteration_that_finds_the_queue_full_waits_for_room(client: TestClient, monkeypatch) -> None:
    calls = _queue_full_for_the_second_iteration(monkeypatch, refusals=3)
    images, info, _ = txt2img(client, prompt="a cat", seed=40, n_iter=2)
    assert len(images) == 2 and info["all_seeds"] == [40, 41]
    assert calls == [40, 41, 41, 41, 41], "the first iteration once, the second refused three times, then queued"


def test_a_later_iteration_waits_for_room_no_longer_than_request_timeout(client: TestClient, monkeypatch) -> None:
    import service

    serving = service.app.state.serving
    monkeypatch.setattr(serving, "deadline", lambda: asyncio.get_running_loop().time() + 1.0)
    calls = _queue_full_for_the_second_iteration(monkeypatch, refusals=None)
    response = client.post(TXT2IMG, json={"prompt": "a cat", **FAST, "seed": 7, "n_iter": 2})
    assert_a1111_error(response, 504, "REQUEST_TIMEOUT")
    assert calls[0] == 7 and set(calls[1:]) == {8} and len(calls) > 3
    assert engine().queued_images == 0


@pytest.mark.parametrize("content", [b"", b"not json", b"[1, 2]", b'"text"', b"null"])
def test_a_body_that_is_not_a_json_object_is_a_422(client: TestClient, content: bytes) -> None:
    response = client.post(TXT2IMG, content=content, headers={"content-type": "application/json"})
    assert_a1111_error(response, 422, "JSON")


def test_engine_errors_keep_their_status_and_retry_after_in_a1111s_shape() -> None:
    status, body, headers = error_payload(RateLimitError("Too many images are queued.", retry_after=3), "a1111")
    assert (status, body, headers["retry-after"]) == (429, {"detail": "Too many images are queued."}, "3")
    status, body, _ = error_payload(ValidationError("Invalid value for 'steps'.", param="steps"), "a1111")
    assert (status, body) == (422, {"detail": "Invalid value for 'steps'."})
    status, body, _ = error_payload(KeyError("secret path /x/y"), "a1111")
    assert status == 500 and "secret" not in body["detail"]


# --- progress, interrupt, skip: the worker held step by step ------------------------------


class SteppedPipeline:
    """The loaded pipeline, each denoising step held (while ``holding``) until the test lets it go on."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.calls: list[list[str]] = []
        self.arrived: queue.Queue[int] = queue.Queue()
        self.permits = threading.Semaphore(0)
        self.holding = False
        # Only calls with this prompt in them are held (None: every call).
        self.only: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(list(kwargs["prompt"]))
        callback = kwargs["callback_on_step_end"]
        chosen = self.only is None or self.only in kwargs["prompt"]

        def held(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if self.holding and chosen:
                self.arrived.put(step + 1)  # step + 1 is computed; the engine has not seen it yet
                assert self.permits.acquire(timeout=60)
            return callback(pipe, step, timestep, tensors)

        return self.pipe(**{**kwargs, "callback_on_step_end": held})

    def hold(self, only: str | None = None) -> None:
        self.permits = threading.Semaphore(0)
        self.only = only
        self.holding = True

    def step(self) -> int:
        """Let the held step be seen by the engine; the number of the next step, once it is held."""
        self.permits.release()
        return self.arrived.get(timeout=60)

    def release(self) -> None:
        self.holding = False
        self.permits.release(1000)


@pytest.fixture
def stepped(client: TestClient) -> Iterator[SteppedPipeline]:
    running = engine()
    wrapper = SteppedPipeline(running.pipeline)
    running.pipeline = wrapper
    try:
        yield wrapper
    finally:
        wrapper.release()
        running.pipeline = wrapper.pipe


def idle(client: TestClient) -> dict[str, Any]:
    progress = client.get(f"{A}/progress").json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0, progress
    return progress


def test_progress_follows_the_job_and_interrupt_answers_with_what_was_made(
    client: TestClient, stepped: SteppedPipeline
) -> None:
    idle(client)
    body = {**FAST, "prompt": "a slow one", "seed": 11, "steps": 5, "n_iter": 2}
    stepped.hold()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.post, TXT2IMG, json=body)
        assert stepped.arrived.get(timeout=60) == 1
        assert stepped.step() == 2  # the engine has seen step 1 of 5
        progress = client.get(f"{A}/progress").json()
        state = progress["state"]
        assert (state["sampling_step"], state["sampling_steps"], state["job_count"], state["job_no"]) == (1, 5, 2, 0)
        assert progress["progress"] == pytest.approx((1 / 5) / 2), "step 1 of 5 of the first of two iterations"
        assert progress["eta_relative"] > 0 and state["job"] == "scripts_txt2img"
        assert client.post(f"{A}/interrupt").json() == {}
        stepped.release()
        response = answer.result(timeout=60)
    assert response.status_code == 200, response.text
    payload = response.json()
    info = json.loads(payload["info"])
    assert len(payload["images"]) == 1 and info["all_seeds"] == [11]
    assert info["extra_generation_params"]["Interrupted"] == "after 2 of 5 steps; 1 iteration not run"
    assert list(engine().steps_run)[-1] == 2, "the call stopped at the step after the interrupt"
    finished, _, _ = txt2img(client, prompt="a slow one", seed=11, steps=5)
    partial = pixels(payload["images"][0])
    assert np.abs(partial - finished[0]).mean() > 1, "what was made is the image after 2 steps, not the final one"
    idle(client)


def test_skip_ends_the_current_iteration_and_the_next_one_runs(client: TestClient, stepped: SteppedPipeline) -> None:
    body = {**FAST, "prompt": "two of them", "seed": 21, "steps": 3, "n_iter": 2}
    stepped.hold()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.post, TXT2IMG, json=body)
        assert stepped.arrived.get(timeout=60) == 1
        assert client.post(f"{A}/skip").json() is None
        stepped.release()
        response = answer.result(timeout=60)
    payload = response.json()
    info = json.loads(payload["info"])
    assert len(payload["images"]) == 2 and info["all_seeds"] == [21, 22]
    assert info["extra_generation_params"]["Skipped"] == "after 1 of 3 steps"
    alone, _, _ = txt2img(client, prompt="two of them", seed=22, steps=3)
    assert np.array_equal(pixels(payload["images"][1]), alone[0]), "the second iteration ran in full"
    idle(client)


def test_openai_and_a1111_requests_arriving_together_share_a_batch(
    client: TestClient, stepped: SteppedPipeline
) -> None:
    bearer = {"Authorization": f"Bearer {KEY}"}
    blocker = {"prompt": "blocker", "size": "512x512", "num_inference_steps": 2}
    openai_body = {"prompt": "from openai", "size": "256x256", "num_inference_steps": 2, "seed": 31}
    a1111_body = {**FAST, "prompt": "from a1111", "seed": 32}
    running = engine()
    stepped.hold()
    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(client.post, GEN, json=blocker, auth=None, headers=bearer)
        assert stepped.arrived.get(timeout=60) == 1
        from_openai = pool.submit(client.post, GEN, json=openai_body, auth=None, headers=bearer)
        from_a1111 = pool.submit(client.post, TXT2IMG, json=a1111_body)
        deadline = time.monotonic() + 60
        while running.queued_images < 2:  # nothing to await: the engine's queue is polled
            assert time.monotonic() < deadline and not from_openai.done() and not from_a1111.done()
            time.sleep(0.005)
        stepped.release()
        responses = [held.result(60), from_openai.result(60), from_a1111.result(60)]
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    assert sorted(stepped.calls[-1]) == ["from a1111", "from openai"], stepped.calls
    assert list(running.batch_sizes)[-1] == 2
    batched = pixels(responses[2].json()["images"][0])
    alone, _, _ = txt2img(client, prompt="from a1111", seed=32)
    assert np.abs(batched - alone[0]).max() <= 1, "batched with an OpenAI request, still its own image"


def test_a_job_ended_early_is_answered_at_its_next_step_while_its_batch_neighbour_finishes(
    tiny_model_dir: Path,
) -> None:
    """The engine side of interrupt and skip, with no HTTP: one job of a batch ends, the other does not notice."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from tests.test_engine import _hold_worker, params, running_engine

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    stepped = SteppedPipeline(pipe)

    async def scenario(engine: Any) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
        blocker = await _hold_worker(engine)
        early = engine.submit(params(1, "ended early", steps=4))
        late = engine.submit(params(2, "goes on", steps=4))
        queued = engine.submit(params(3, "never runs", size=128))
        stepped.hold(only="ended early")
        engine.pipeline.gate.set()
        await blocker
        assert await asyncio.to_thread(stepped.arrived.get, True, 60) == 1
        assert engine.progress(early).state == "running" and engine.progress(queued).state == "queued"
        assert engine.end_early(queued) is True, "a queued job is dropped"
        assert engine.queued_images == 0, "and its place in the queue is free"
        assert engine.end_early(early) is False, "a running one ends at its next step"
        stepped.release()
        with pytest.raises(asyncio.CancelledError):
            await engine.result(queued)
        return early, await engine.result(early), await engine.result(late)

    with running_engine(stepped) as engine:
        early, ended, finished = asyncio.run(scenario(engine))
        progress = engine.progress(early)
        assert (progress.state, progress.steps_done, progress.steps_total) == ("done", 1, 4)
        assert list(engine.batch_sizes)[-1] == 2 and list(engine.steps_run)[-1] == 4, "the call ran to its end"
        alone = asyncio.run(engine.generate(params(2, "goes on", steps=4)))
        ended_alone = asyncio.run(engine.generate(params(1, "ended early", steps=4)))
    assert len(ended) == 1 and len(finished) == 1
    assert np.abs(finished[0].astype(int) - alone[0]).max() <= 1, "the neighbour's image is the one it gets alone"
    assert np.abs(ended[0].astype(int) - ended_alone[0]).mean() > 1, "the ended job got its image after 1 step"
