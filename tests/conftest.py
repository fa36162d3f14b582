"""Shared fixtures: the tiny model, in-process service clients, image helpers."""

from __future__ import annotations

import base64
import importlib
import io
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from bench.harness import forget_bentoml_metrics

ROOT = Path(__file__).resolve().parent.parent

# Variables the service reads; cleared so the developer's shell cannot leak in.
CONFIG_VARS = (
    "MODEL_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "API_KEY",
    "API_KEYS_FILE",
    "HOST",
    "PORT",
    "ENABLE_CACHE_DIT",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "DEFAULT_GUIDANCE_SCALE",
    "DEVICE",
    "MAX_QUEUE_IMAGES",
    "MAX_QUEUE_IMAGES_PER_KEY",
    "QUEUE_POLICY",
    "MAX_BATCH_IMAGES",
    "MAX_IMAGES_PER_REQUEST",
    "REQUEST_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_UPLOAD_BYTES",
    "MAX_BUFFERED_BYTES",
    "BODY_READ_TIMEOUT",
    "BODY_MIN_RATE",
    "LOG_LEVEL",
    "MEMORY_MODE",
    "TORCH_COMPILE",
    "VAE_CHANNELS_LAST",
    "WARMUP",
    "WORKERS",
    "CORS_ALLOW_ORIGINS",
    "SHUTDOWN_GRACE_SECONDS",
    "PUBLIC_BASE_URL",
    "IMAGE_STORE",
    "IMAGE_STORE_DIR",
    "IMAGE_TTL_SECONDS",
    "IMAGE_STORE_MAX_BYTES",
    "IMAGE_STORE_S3_BUCKET",
    "IMAGE_STORE_S3_PREFIX",
    "IMAGE_STORE_S3_ENDPOINT_URL",
    "IMAGE_STORE_TIMEOUT",
    "LORA_ADAPTERS",
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd35.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random LoRAs for the tiny model, made with peft: ``ink`` (rank 4) and ``neon`` (rank 8)."""
    from sd35.tiny import write_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return {
        "ink": write_tiny_lora(root / "ink", seed=1, rank=4),
        "neon": write_tiny_lora(root / "neon", seed=2, rank=8),
    }


def wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise AssertionError(f"service not ready after {timeout} s: {client.get('/health').json()}")
        time.sleep(0.05)


@contextmanager
def service_client(env: dict[str, str], *, ready: bool = True) -> Iterator[TestClient]:
    """The whole BentoML service in-process, configured by ``env`` alone."""
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as images:
        for name in CONFIG_VARS:
            patch.delenv(name, raising=False)
        for name, value in {"IMAGE_STORE_DIR": images, **env}.items():
            patch.setenv(name, value)
        import service

        service = importlib.reload(service)
        try:
            with TestClient(service.SD35.to_asgi()) as client:
                if ready:
                    wait_ready(client)
                yield client
        finally:
            forget_bentoml_metrics()


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    """A ready service on the tiny model, authentication off."""
    with service_client({"MODEL_ID": str(tiny_model_dir)}) as test_client:
        yield test_client


def decode_image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_image(b64).convert("RGB"), dtype=np.int16)


def assert_openai_error(response, status: int, code: str, param: str | None = None) -> dict:
    """The body is OpenAI's error shape with this status, code and param."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"] and "/sd35/" not in error["message"], error
    return error
