"""AUTOMATIC1111's global state with two workers: whichever worker a client reaches, it sees and stops its work.

A real `bentoml serve` with WORKERS=2. Each httpx client below holds one keep-alive connection, so it talks to
one worker; `/v1/queue` says which.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from tests.server import Server, running_server
from tests.test_lora import adapters_env

pytestmark = pytest.mark.server

KEY = "sk-a1111-workers"
A = "/sdapi/v1"


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("a1111-workers")
    keys = directory / "keys.toml"
    keys.write_text(f'[keys.painter]\nkey = "{KEY}"\nadmin = true  # /v1/queue names the worker to admins\n')
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "API_KEYS_FILE": str(keys),
        "LORA_ADAPTERS": adapters_env(tiny_loras),
        "WARMUP": "false",
        "WORKERS": "2",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    with running_server(env, directory) as running:
        deadline = time.monotonic() + 60
        while running.log_text().count("ready on cpu") < 2:
            assert time.monotonic() < deadline, "both workers should be ready within 60 s"
            time.sleep(0.2)
        yield running


def client_on(server: Server, *, not_worker: int | None = None) -> tuple[httpx.Client, int]:
    """A client (HTTP Basic, the key as the password, as AUTOMATIC1111's clients send it) whose one connection
    reaches some worker, or a worker other than ``not_worker``; and that worker's number."""
    for _ in range(200):
        http = httpx.Client(
            base_url=server.url, auth=("webui", KEY), timeout=120, limits=httpx.Limits(max_connections=1)
        )
        # Bearer: the /v1 routes take no Basic.
        worker = http.get("/v1/queue", headers={"Authorization": f"Bearer {KEY}"}, auth=None).json()["worker"]
        if worker != not_worker:
            return http, worker
        http.close()
    pytest.fail(f"no fresh connection reached a worker other than {not_worker}")


def test_an_option_set_on_one_worker_holds_on_the_other(server: Server) -> None:
    setter, worker = client_on(server)
    reader, _ = client_on(server, not_worker=worker)
    with closing(setter), closing(reader):
        base = reader.get(f"{A}/options").json()["sd_model_checkpoint"]
        try:
            assert setter.post(f"{A}/options", json={"sd_model_checkpoint": "neon"}).status_code == 200
            assert reader.get(f"{A}/options").json()["sd_model_checkpoint"] == "neon"
            response = reader.post(f"{A}/txt2img", json={"prompt": "a tower", "steps": 1, "width": 256, "height": 256})
            assert response.status_code == 200, response.text
            assert json.loads(response.json()["info"])["sd_model_name"] == "neon"
        finally:
            assert setter.post(f"{A}/options", json={"sd_model_checkpoint": base}).status_code == 200


def test_progress_and_interrupt_reach_a_request_running_on_another_worker(server: Server) -> None:
    runner, worker = client_on(server)
    other, _ = client_on(server, not_worker=worker)
    body = {"prompt": "a long one", "seed": 3, "steps": 50, "width": 1024, "height": 1024, "n_iter": 2}
    with closing(runner), closing(other), ThreadPoolExecutor(1) as pool:
        assert other.get(f"{A}/progress").json()["state"]["job_count"] == 0
        answer = pool.submit(runner.post, f"{A}/txt2img", json=body)
        deadline = time.monotonic() + 60
        while True:
            assert not answer.done(), "the request ended before the other worker saw it run"
            assert time.monotonic() < deadline, "the other worker never saw the request run"
            progress = other.get(f"{A}/progress").json()
            if progress["state"]["sampling_step"] >= 2:
                break
            time.sleep(0.05)
        assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] == 2, progress
        assert progress["state"]["sampling_steps"] == 50 and progress["state"]["job"] == "scripts_txt2img"
        assert other.post(f"{A}/interrupt").status_code == 200
        response = answer.result(timeout=120)
    assert response.status_code == 200, response.text
    payload = response.json()
    interrupted = json.loads(payload["info"])["extra_generation_params"]["Interrupted"]
    assert "of 50 steps" in interrupted and "1 iteration not run" in interrupted, interrupted
    assert len(payload["images"]) == 1, "the images of the iteration stopped early, none of the one not run"
    with closing(client_on(server, not_worker=worker)[0]) as after:
        deadline = time.monotonic() + 10
        while after.get(f"{A}/progress").json()["state"]["job_count"]:
            assert time.monotonic() < deadline, "a finished request stays on the board"
            time.sleep(0.1)
