"""Model loading: probes answer while loading, failures become a reason users can act on."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

import sd35.engine.loading
from sd35.config import Settings
from sd35.engine.loading import describe_load_error
from tests.conftest import assert_openai_error, service_client

GEN = "/v1/images/generations"
BODY = {"prompt": "a", "size": "256x256", "num_inference_steps": 1}


def test_probes_answer_while_loading_then_ready(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_loader = sd35.engine.loading.load_pipeline

    def slow_loader(settings: Settings, worker_index: int):
        assert release.wait(60), "test never released the loader"
        return real_loader(settings, worker_index)

    monkeypatch.setattr(sd35.engine.loading, "load_pipeline", slow_loader)
    with service_client({"MODEL_ID": str(tiny_model_dir), "API_KEY": "k"}, ready=False) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 503
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json() == {
            "status": "degraded",
            "model_loaded": False,
            "model": str(tiny_model_dir),
            "detail": "the model is loading",
            "memory_mode": "full",  # decided before the weights are read: auto is full on a CPU
        }
        response = client.post(GEN, json=BODY, headers={"Authorization": "Bearer k"})
        error = assert_openai_error(response, 503, "model_not_loaded")
        assert "loading" in error["message"]
        assert response.headers["retry-after"] == "10" and response.headers["retry-after-ms"] == "10000"
        assert response.headers["x-should-retry"] == "true"
        release.set()
        from tests.conftest import wait_ready

        wait_ready(client)
        assert client.get("/health").json()["status"] == "healthy"
        assert client.post(GEN, json=BODY, headers={"Authorization": "Bearer k"}).status_code == 200


@pytest.mark.parametrize(
    ("model_id", "words"),
    [
        ("/nonexistent/models/sd35", "no such directory exists"),
        ("EMPTY_DIR", "has no model_index.json"),
    ],
)
def test_failed_load_is_reported_not_crashed(tmp_path: Path, model_id: str, words: str) -> None:
    if model_id == "EMPTY_DIR":
        model_id = str(tmp_path)
    with service_client({"MODEL_ID": model_id}, ready=False) as client:
        deadline = 200
        while client.get("/health").json().get("detail") == "the model is loading" and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded" and health.json()["model_loaded"] is False
        assert words in health.json()["detail"]
        assert client.get("/livez").status_code == 200, "a failed load must not kill the process"
        assert client.get("/readyz").status_code == 503
        response = client.post(GEN, json=BODY)
        error = assert_openai_error(response, 503, "model_not_loaded")
        assert "failed to load" in error["message"] and words in error["message"]
        assert "retry-after" not in response.headers, "retrying cannot fix a failed load"
        assert "retry-after-ms" not in response.headers
        assert response.headers["x-should-retry"] == "false", "the openai SDKs would retry a 503 twice otherwise"


def test_offline_hub_download_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(Exception) as raised:
        sd35.engine.loading.load_pipeline(
            Settings(model_id="stabilityai/stable-diffusion-3.5-large-turbo", device="cpu")
        )
    reason = describe_load_error(raised.value, Settings(model_id="stabilityai/stable-diffusion-3.5-large-turbo"))
    assert "unreachable" in reason and "HF_HOME" in reason


def _hub_error(kind: type[Exception]) -> OSError:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/x")
    try:
        raise OSError("Cannot load model x") from kind("denied", response=httpx2.Response(403, request=request))
    except OSError as exc:
        return exc


def test_gated_model_reason_names_the_token() -> None:
    settings = Settings(model_id="stabilityai/stable-diffusion-3.5-large-turbo")
    reason = describe_load_error(_hub_error(GatedRepoError), settings)
    assert "gated" in reason and "HF_TOKEN" in reason and "no token is set" in reason
    with_token = Settings(model_id=settings.model_id, hf_token="hf_x")
    assert "the token given has no access" in describe_load_error(_hub_error(GatedRepoError), with_token)


def test_unknown_repo_reason_names_model_id() -> None:
    reason = describe_load_error(_hub_error(RepositoryNotFoundError), Settings(model_id="nobody/nothing"))
    assert "not found" in reason and "MODEL_ID" in reason


def test_cuda_requested_without_gpu_is_explained(tiny_model_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        sd35.engine.loading.load_pipeline(Settings(model_id=str(tiny_model_dir), device="cuda"))
