"""Model loading: probes answer while loading, failures become a reason users can act on, the real model is
not served on a CPU by accident, and the engine's modules import each other without a circle."""

from __future__ import annotations

import ast
import os
import threading
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

import sd35.engine
import sd35.engine.loading
from sd35.config import Settings
from sd35.engine.loading import describe_load_error
from sd35.engine.memory import GIB
from sd35.engine.refusal import LoadRefusedError
from tests.conftest import assert_openai_error, service_client
from tests.server import failed_start

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


# --- the engine's imports ----------------------------------------------------------


def _engine_imports() -> dict[str, set[str]]:
    """Which sd35.engine modules each one imports, at the top or inside a function."""
    package = Path(sd35.engine.__file__).parent
    modules = {f"sd35.engine.{path.stem}": path for path in package.glob("*.py") if path.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = (found & modules.keys()) - {name}
    return graph


def test_the_engine_modules_import_each_other_without_a_circle() -> None:
    graph = _engine_imports()
    assert "sd35.engine.adapters" in graph["sd35.engine.loading"], "the graph sees imports inside functions"

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    circles = sorted(f"{a} -> {b}" for a in graph for b in graph[a] if reaches(b, a, {b}))
    assert circles == []


# --- the real model without a GPU ---------------------------------------------------


@pytest.fixture(scope="module")
def full_size_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD3.5 Large as a diffusers directory of sparse safetensors files: the real names and shapes, no data."""
    from bench.gpu.arch import DEFAULT_ARCH, load_arch, write_sparse_checkpoint

    directory = tmp_path_factory.mktemp("sd35-large-sparse")
    weights = write_sparse_checkpoint(load_arch(DEFAULT_ARCH), directory)
    assert weights > 25 * GIB
    return directory


def test_the_sparse_checkpoint_says_full_size_and_occupies_almost_nothing(full_size_model: Path) -> None:
    files = list(full_size_model.rglob("*.safetensors"))
    assert {path.parent.name for path in files} == {
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    }
    assert sd35.engine.loading.weight_bytes_on_disk(str(full_size_model)) > 25 * GIB
    assert sum(path.stat().st_blocks * 512 for path in files) < 8 << 20
    from safetensors import safe_open

    with safe_open(full_size_model / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert weights.get_slice("pos_embed.proj.weight").get_shape() == [2432, 16, 2, 2]


def test_the_real_model_on_auto_without_a_gpu_refuses_to_start(full_size_model: Path, tmp_path: Path) -> None:
    env = {
        **{key: value for key, value in os.environ.items() if key != "DEVICE"},
        "MODEL_ID": str(full_size_model),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    started = time.monotonic()
    [line] = failed_start(env, mentioning="--gpus all")
    assert time.monotonic() - started < 60, "refused before anything loads"
    assert line.startswith(f"sd35: refusing to start: no CUDA GPU is visible and MODEL_ID={full_size_model} holds")
    assert "DEVICE=cpu" in line


def test_the_refusal_names_the_way_out_and_spares_what_may_run_on_a_cpu(
    full_size_model: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    refuse = sd35.engine.loading.refuse_cpu_fallback
    with pytest.raises(LoadRefusedError, match=r"holds 2\d\.\d GiB of weights.*--gpus all.*DEVICE=cpu") as raised:
        refuse(Settings(model_id=str(full_size_model)))
    assert describe_load_error(raised.value, Settings(model_id=str(full_size_model))) == str(raised.value)
    refuse(Settings(model_id=str(full_size_model), device="cpu"))  # asked for: allowed
    refuse(Settings(model_id=str(tiny_model_dir)))  # small: fine on a CPU
    # A Hub id not downloaded yet: the SD3.5 checkpoints are known to be large, others are unknown.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LoadRefusedError, match="is a full-size model"):
        refuse(Settings())
    refuse(Settings(model_id="someone/small-sd3"))
    # The engine's own loader refuses too (the benchmark and tests call it without service.py).
    with pytest.raises(LoadRefusedError):
        sd35.engine.loading.load_pipeline(Settings(model_id=str(full_size_model)))
