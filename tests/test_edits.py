"""Edits (image-to-image, inpainting) and variations: uploads checked, masks the right way round, same weights."""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image
from starlette.testclient import TestClient

from tests.conftest import assert_openai_error, pixels, service_client
from tests.server import running_server

EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
FAST = {"num_inference_steps": "2"}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(width: int = 256, height: int = 256, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.BICUBIC)


def mask(width: int, height: int, transparent: np.ndarray) -> bytes:
    """An RGBA mask, alpha 0 (repaint) where ``transparent`` is True."""
    alpha = np.where(transparent, 0, 255).astype(np.uint8)
    rgba = np.dstack([np.full((height, width, 3), 255, np.uint8), alpha])
    return png(Image.fromarray(rgba, "RGBA"))


# Tests that start their own service come first: one in-process service at a time.


def test_upload_over_the_limit_is_400(tiny_model_dir: Path) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "WARMUP": "false", "MAX_UPLOAD_BYTES": "100000"}
    with service_client(env) as limited:
        files = [("image", ("big.png", png(photo(1024, 1024, seed=3)) + b"\x00" * 200_000, "image/png"))]
        error = assert_openai_error(limited.post(EDITS, files=files, data={"prompt": "a"}), 400, "validation_error")
        assert "MAX_UPLOAD_BYTES" in error["message"]


def test_cache_dit_edits_stay_reproducible_with_other_requests_between(tiny_model_dir: Path) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "WARMUP": "false", "ENABLE_CACHE_DIT": "true"}
    files = [("image", ("in.png", png(photo()), "image/png"))]
    with service_client(env) as cached:
        first = edit(cached, files, seed="8", num_inference_steps="4").json()["data"][0]["b64_json"]
        cached.post("/v1/images/generations", json={"prompt": "x", "size": "512x256", "num_inference_steps": 4})
        edit(cached, [("image", ("b.png", png(photo(384, 256, 5)), "image/png"))], seed="2", num_inference_steps="4")
        again = edit(cached, files, seed="8", num_inference_steps="4").json()["data"][0]["b64_json"]
        assert first == again


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    with service_client({"MODEL_ID": str(tiny_model_dir), "WARMUP": "false"}) as test_client:
        yield test_client


def edit(client: TestClient, files: list, **data: str):
    return client.post(EDITS, files=files, data={"prompt": "a watercolor harbour", **FAST, **data})


def test_edit_without_mask_is_image_to_image(client: TestClient) -> None:
    source = photo(320, 256)
    response = edit(client, [("image", ("in.png", png(source), "image/png"))], n="2", seed="5")
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["size"] == "320x256" and len(payload["data"]) == 2
    first, second = (pixels(item["b64_json"]) for item in payload["data"])
    assert first.shape == (256, 320, 3)
    assert np.abs(first - np.asarray(source, dtype=np.int16)).mean() > 1, "the image was edited"
    assert np.abs(first - second).mean() > 0.5, "image i uses seed + i"
    again = edit(client, [("image", ("in.png", png(source), "image/png"))], n="2", seed="5").json()["data"][0]
    assert np.array_equal(pixels(again["b64_json"]), first), "same seed and parameters, same edit"


def test_strength_controls_how_far_the_edit_goes(client: TestClient) -> None:
    source = np.asarray(photo(), dtype=np.int16)
    files = [("image", ("in.png", png(photo()), "image/png"))]
    near = pixels(edit(client, files, seed="1", strength="0.25", num_inference_steps="4").json()["data"][0]["b64_json"])
    far = pixels(edit(client, files, seed="1", strength="1.0", num_inference_steps="4").json()["data"][0]["b64_json"])
    assert np.abs(near - source).mean() < np.abs(far - source).mean()


def test_opaque_mask_keeps_the_image_and_transparent_mask_repaints_it(client: TestClient) -> None:
    source = photo()
    original = np.asarray(source, dtype=np.int16)
    files = [("image", ("in.png", png(source), "image/png"))]
    keep = mask(256, 256, np.zeros((256, 256), bool))
    kept = edit(client, [*files, ("mask", ("m.png", keep, "image/png"))], seed="3")
    assert np.array_equal(pixels(kept.json()["data"][0]["b64_json"]), original), "nothing to repaint: unchanged"
    everything = mask(256, 256, np.ones((256, 256), bool))
    repainted = edit(client, [*files, ("mask", ("m.png", everything, "image/png"))], seed="3")
    assert np.abs(pixels(repainted.json()["data"][0]["b64_json"]) - original).mean() > 5


def test_half_mask_repaints_only_the_transparent_half(client: TestClient) -> None:
    source = photo()
    original = np.asarray(source, dtype=np.int16)
    left = np.zeros((256, 256), bool)
    left[:, :128] = True
    files = [("image", ("in.png", png(source), "image/png")), ("mask", ("m.png", mask(256, 256, left), "image/png"))]
    result = pixels(edit(client, files, seed="4").json()["data"][0]["b64_json"])
    assert np.array_equal(result[:, 128:], original[:, 128:]), "opaque half: exactly the original"
    assert np.abs(result[:, :128] - original[:, :128]).mean() > 5, "transparent half: repainted"


def test_a_transparent_image_without_mask_repaints_its_transparent_part(client: TestClient) -> None:
    rgba = np.dstack([np.asarray(photo()), np.full((256, 256), 255, np.uint8)])
    rgba[:, :128, 3] = 0
    result = pixels(
        edit(client, [("image", ("in.png", png(Image.fromarray(rgba, "RGBA")), "image/png"))]).json()["data"][0][
            "b64_json"
        ]
    )
    assert np.array_equal(result[:, 128:], rgba[:, 128:, :3].astype(np.int16))


def test_several_images_edit_the_first(client: TestClient) -> None:
    first, second = png(photo(256, 256, seed=1)), png(photo(512, 256, seed=2))
    files = [("image[]", ("a.png", first, "image/png")), ("image[]", ("b.png", second, "image/png"))]
    response = edit(client, files, size="512x512", output_format="webp")
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "512x512" and response.json()["output_format"] == "webp"


def test_variations(client: TestClient) -> None:
    data = {"n": "3", "size": "256x256", "seed": "9", **FAST}
    response = client.post(VARIATIONS, files=[("image", ("in.png", png(photo(400, 400)), "image/png"))], data=data)
    assert response.status_code == 200, response.text
    images = [pixels(item["b64_json"]) for item in response.json()["data"]]
    assert len(images) == 3 and all(image.shape == (256, 256, 3) for image in images)


def _gif() -> bytes:
    buffer = io.BytesIO()
    photo(32, 32).save(buffer, format="GIF")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A 30000x30000 one-bit PNG of a few kilobytes."""
    width = height = 30_000
    raw = b"".join(b"\x00" + b"\x00" * (width // 8) for _ in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


BAD_UPLOADS = [
    # (files, data, param, words)
    ([("image", ("a.txt", b"not an image at all", "text/plain"))], {}, "image", "not a readable"),
    ([("image", ("a.png", png(photo())[:300], "image/png"))], {}, "image", "not a readable"),
    ([("image", ("a.png", b"", "image/png"))], {}, "image", "empty"),
    ([("image", ("a.gif", _gif(), "image/gif"))], {}, "image", "is a GIF file"),
    ([("image", ("big.png", _bomb(), "image/png"))], {}, "image", "more than 16777216 pixels"),
    (
        [("image", ("a.png", png(photo()), "image/png")), ("mask", ("m.png", png(photo(128, 128)), "image/png"))],
        {},
        "mask",
        "must be the same size",
    ),
    (
        [("image", ("a.png", png(photo()), "image/png")), ("mask", ("m.png", b"junk", "image/png"))],
        {},
        "mask",
        "not a readable",
    ),
    ([], {}, "image", "Missing required file"),
    ([("image", ("a.png", png(photo()), "image/png"))], {"prompt": ""}, "prompt", "at least 1"),
    ([("image", ("a.png", png(photo()), "image/png"))], {"strength": "0"}, "strength", "greater than 0"),
    ([("image", ("a.png", png(photo()), "image/png"))], {"strength": "1.5"}, "strength", "less than or equal to 1"),
    ([("image", ("a.png", png(photo()), "image/png"))], {"n": "5"}, "n", "(MAX_IMAGES_PER_REQUEST=4)"),
    ([("image", ("a.png", png(photo()), "image/png"))], {"size": "1000x1000"}, "size", "multiple of 16"),
]


@pytest.mark.parametrize(("files", "data", "param", "words"), BAD_UPLOADS)
def test_bad_uploads_are_400_naming_the_field(client: TestClient, files, data, param, words) -> None:
    fields = {"prompt": "a harbour", **data}
    response = client.post(EDITS, files=files or {"unrelated": ("x", b"x")}, data=fields)
    error = assert_openai_error(response, 400, "validation_error", param)
    assert words in error["message"], error["message"]


def test_image_as_text_field_and_wrong_content_type(client: TestClient) -> None:
    as_text = client.post(EDITS, files={"other": ("o", b"o")}, data={"prompt": "a", "image": "x"})
    error = assert_openai_error(as_text, 400, "validation_error", "image")
    assert "file upload" in error["message"]
    error = assert_openai_error(client.post(EDITS, json={"prompt": "a"}), 400, "validation_error")
    assert "multipart/form-data" in error["message"]


def test_edits_share_the_loaded_weights(client: TestClient) -> None:
    import service

    engine = service.app.state.serving.engine
    edit(client, [("image", ("in.png", png(photo()), "image/png"))])
    edit(
        client,
        [
            ("image", ("in.png", png(photo()), "image/png")),
            ("mask", ("m.png", mask(256, 256, np.ones((256, 256), bool)), "image/png")),
        ],
    )
    for edit_pipe in engine.runner._edit_pipelines.values():
        assert edit_pipe.transformer is engine.pipeline.transformer and edit_pipe.vae is engine.pipeline.vae
    assert engine.pipeline.transformer.dtype == engine.pipeline.dtype


@pytest.mark.server
def test_openai_sdk_edits_and_variations(tiny_model_dir: Path, tmp_path: Path) -> None:
    with running_server({"MODEL_ID": str(tiny_model_dir), "API_KEY": "k", "WARMUP": "false"}, tmp_path) as server:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        source = png(photo(256, 384))
        plain = sdk.images.edit(
            image=("in.png", source, "image/png"), prompt="a harbour", n=2, extra_body={"num_inference_steps": 2}
        )
        assert len(plain.data) == 2 and Image.open(
            io.BytesIO(__import__("base64").b64decode(plain.data[0].b64_json))
        ).size == (256, 384)
        masked = sdk.images.edit(
            image=("in.png", source, "image/png"),
            mask=("m.png", mask(256, 384, np.ones((384, 256), bool)), "image/png"),
            prompt="a harbour",
            size="512x512",
            response_format="url",
        )
        assert masked.data[0].url.startswith(f"{server.url}/v1/images/files/")
        several = sdk.images.edit(
            image=[("a.png", source, "image/png"), ("b.png", png(photo(seed=4)), "image/png")],
            prompt="two",
            output_format="jpeg",
        )
        assert several.output_format == "jpeg" and len(several.data) == 1
        variation = sdk.images.create_variation(image=("in.png", source, "image/png"), n=2, size="256x256")
        assert len(variation.data) == 2
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.images.edit(image=("in.txt", b"hello", "text/plain"), prompt="x")
        assert raised.value.code == "validation_error" and raised.value.param == "image"
