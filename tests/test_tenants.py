"""Teams sharing one GPU, against real `bentoml serve` processes: fair queueing, weights, quotas, key reloads.

Two servers for the module: one worker for the scheduling tests (whose shares
are those of one queue), and two workers for what must hold across workers
(quotas, reloads). Latency bounds are loose multiples, as this runs on a
shared 2-core machine; `python -m bench.fairness` measures them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.fairness import CHAT_KEY, FLOOD_KEY, Outcome, flood_and_trickle, solo
from tests.conftest import ROOT
from tests.server import Server, failed_start, running_server

pytestmark = pytest.mark.server

BODY = {"prompt": "a lighthouse at dawn", "size": "256x256", "num_inference_steps": 4}
KEYS = {
    "batch-job": FLOOD_KEY,
    "chat": CHAT_KEY,
    "heavy": "sk-test-heavy-3",
    "light": "sk-test-light-1",
    "slow-lane": "sk-test-slow-lane",
    "capped": "sk-test-capped-6",
    "ops": "sk-test-ops-admin",
}
FILE = f"""\
[keys.batch-job]
key = "{KEYS["batch-job"]}"

[keys.chat]
key = "{KEYS["chat"]}"

[keys.heavy]
key = "{KEYS["heavy"]}"
weight = 3

[keys.light]
key = "{KEYS["light"]}"

[keys.slow-lane]
key = "{KEYS["slow-lane"]}"
weight = 0.1

[keys.capped]
key = "{KEYS["capped"]}"
images_per_minute = 6

[keys.ops]
key = "{KEYS["ops"]}"
admin = true
"""


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def samples(server: Server, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric
    }


def by_key(server: Server, metric: str) -> dict[str, float]:
    return {dict(labels).get("key", ""): value for labels, value in samples(server, metric).items()}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "keys.toml"
    path.write_text(FILE)
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "API_KEYS_FILE": str(keys_file),
        "WARMUP": "false",
        "MAX_BATCH_IMAGES": "4",
        "MAX_QUEUE_IMAGES": "128",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    with running_server(env, tmp_path_factory.mktemp("tenants-server")) as running:
        yield running


def test_a_key_sending_single_images_is_not_stuck_behind_a_flood(server: Server) -> None:
    outcome = Outcome()
    args = argparse.Namespace(flood_clients=8, flood_n=4, chat_requests=8)
    asyncio.run(solo(server.url, BODY, 5, outcome))
    asyncio.run(flood_and_trickle(server.url, BODY, args, outcome))
    alone, chat, flood = (statistics.median(s) for s in (outcome.chat_solo, outcome.chat, outcome.flood))
    assert outcome.refused == 0
    # FIFO measured here: chat ≈ flood and ≈ 27× alone (bench/results); fair: ≈ 0.2 of the flood, ≈ 4× alone.
    assert chat < 0.5 * flood, (chat, flood)
    assert chat < 10 * alone, (chat, alone)
    waits = samples(server, "sd35_key_queue_wait_seconds_sum")
    counts = samples(server, "sd35_key_queue_wait_seconds_count")
    mean_wait = {dict(labels)["key"]: waits[labels] / counts[labels] for labels in waits}
    assert mean_wait["chat"] < mean_wait["batch-job"] / 2, mean_wait


async def _flood(url: str, clients: dict[str, int], seconds: float, watch: float) -> tuple[dict, dict]:
    """Keys flooding single images for ``seconds``; the per-key image counters ``watch`` s in and at the end."""
    stop = asyncio.Event()

    async def client(name: str, index: int, http: httpx.AsyncClient) -> None:
        seed = index
        while not stop.is_set():
            seed += 1000
            response = await http.post("/v1/images/generations", json={**BODY, "seed": seed}, headers=auth(name))
            assert response.status_code == 200, response.text

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=32)) as http:
        tasks = [
            asyncio.ensure_future(client(name, index, http))
            for name, count in clients.items()
            for index in range(count)
        ]
        await asyncio.sleep(watch)
        before = (await http.get("/metrics")).text
        await asyncio.sleep(seconds - watch)
        after = (await http.get("/metrics")).text
        stop.set()
        await asyncio.gather(*tasks)
    return _images(before), _images(after)


def _images(text: str) -> dict[str, float]:
    return {
        sample.labels["key"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sd35_key_images_total"
    }


def test_weights_set_the_shares_of_two_flooding_keys(server: Server) -> None:
    # Twice as many clients per key as a call holds images, so that both keys stay backlogged while a call runs
    # (a key whose every request is in the running call or on its way back has nothing queued: not its turn).
    before, after = asyncio.run(_flood(server.url, {"heavy": 8, "light": 8}, seconds=6, watch=1.5))
    heavy = after["heavy"] - before.get("heavy", 0)
    light = after["light"] - before.get("light", 0)
    assert light > 0 and 2 <= heavy / light <= 4.5, (heavy, light)


def test_a_lone_key_gets_the_whole_gpu_whatever_its_weight(server: Server) -> None:
    calls = samples(server, "sd35_batch_images_count")[()]
    images = samples(server, "sd35_batch_images_sum")[()]
    before, after = asyncio.run(_flood(server.url, {"slow-lane": 8}, seconds=4, watch=0.5))
    calls = samples(server, "sd35_batch_images_count")[()] - calls
    images = samples(server, "sd35_batch_images_sum")[()] - images
    # Work-conserving: nothing else waits, so its weight of 0.1 does not hold it back; calls are full (4 images).
    assert images / calls >= 3, (images, calls)
    assert after["slow-lane"] - before.get("slow-lane", 0) > 0


def test_metrics_and_logs_name_keys_never_the_keys(server: Server) -> None:
    images = by_key(server, "sd35_key_images_total")
    assert {"chat", "batch-job", "heavy", "light"} <= set(images)
    seconds = by_key(server, "sd35_key_gpu_seconds_total")
    assert seconds["batch-job"] > seconds["chat"] > 0
    text = httpx.get(f"{server.url}/metrics", timeout=10).text + server.log_text()
    for key in KEYS.values():
        assert key not in text


def test_the_grafana_dashboard_reads_metrics_the_server_exports(server: Server) -> None:
    # the series that only exist once something was refused
    capped = [
        httpx.post(f"{server.url}/v1/images/generations", json={**BODY, "n": 2}, headers=auth("capped"), timeout=60)
        for _ in range(4)
    ]
    assert [response.status_code for response in capped] == [200, 200, 200, 429]
    exported = {
        sample.name
        for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text)
        for sample in family.samples
    }
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "sd35-dashboard.json").read_text())
    assert [entry["name"] for entry in dashboard["__inputs"]] == ["DS_PROMETHEUS"], "importable: asks for its source"
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries.append(dashboard["templating"]["list"][0]["query"]["query"])
    assert len(queries) > 10
    for query in queries:
        for name in re.findall(r"\bsd35_[a-z_]+", query):
            assert name in exported, f"{name} (in {query!r}) is not on /metrics"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"


# --- what must hold with several workers ---------------------------------------------------------


@pytest.fixture(scope="module")
def workers(tiny_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("tenants-workers")
    path = directory / "keys.toml"
    path.write_text(keys_file.read_text())
    env = {"MODEL_ID": str(tiny_model_dir), "API_KEYS_FILE": str(path), "WARMUP": "false", "WORKERS": "2"}
    with running_server(env, directory) as running:
        deadline = time.monotonic() + 60
        while running.log_text().count("ready on cpu") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield running


def answering_workers(server: Server, attempts: int = 60) -> set[int]:
    """Which workers answer fresh connections (each request below opens its own)."""
    seen: set[int] = set()
    for _ in range(attempts):
        seen.add(httpx.get(f"{server.url}/v1/queue", headers=auth("ops"), timeout=10).json()["worker"])
        if seen == {1, 2}:
            break
    return seen


def test_a_quota_holds_for_the_whole_server_not_per_worker(workers: Server) -> None:
    assert answering_workers(workers) == {1, 2}, "both workers must be taking requests for this to mean anything"

    async def burst() -> list[httpx.Response]:
        async def one(seed: int) -> httpx.Response:
            async with httpx.AsyncClient(base_url=workers.url, timeout=120) as http:  # a connection each
                body = {**BODY, "seed": seed, "num_inference_steps": 1}
                return await http.post("/v1/images/generations", json=body, headers=auth("capped"))

        return await asyncio.gather(*(one(seed) for seed in range(12)))

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(limited)) == (6, 6), [r.status_code for r in responses]
    # what is left when each response starts: by then the other admitted requests have been counted too
    assert all(0 <= int(r.headers["x-ratelimit-remaining-images"]) <= 5 for r in ok)
    for response in limited:
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert response.headers["x-ratelimit-limit-images"] == "6"
        assert response.headers["x-ratelimit-reset-images"].endswith("s")

    sdk = openai.OpenAI(base_url=f"{workers.url}/v1", api_key=KEYS["capped"], max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.images.generate(prompt="one more", size="256x256", extra_body={"num_inference_steps": 1})
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) <= 60
    rejected = by_key(workers, "sd35_key_rejected_total")
    assert rejected.get("capped") == 7
    # the workers' one ledger, where BentoML keeps their shared metrics
    assert (workers.log.parent / "bentoml" / "prometheus_multiproc_dir" / "sd35-quotas.sqlite3").is_file()


def _status(server: Server, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10).status_code


def _within(seconds: float, condition: object) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_keys_file_edits_apply_in_every_worker_without_a_restart(workers: Server, tmp_path: Path) -> None:
    path = workers.log.parent / "keys.toml"
    original = path.read_text()
    try:
        path.write_text(original + '\n[keys.newcomer]\nkey = "sk-test-newcomer"\n')
        # every worker must have it: a fresh connection each time lands on either
        assert _within(5, lambda: all(_status(workers, "sk-test-newcomer") == 200 for _ in range(8)))

        path.write_text(original.replace(f'[keys.light]\nkey = "{KEYS["light"]}"\n', ""))
        assert _within(5, lambda: all(_status(workers, KEYS["light"]) == 401 for _ in range(8)))
        assert _status(workers, "sk-test-newcomer") == 401

        path.write_text(original + "\n[keys.broken]\nsha256 = 'not-a-hash'\n")
        assert _within(5, lambda: workers.log_text().count(f"API_KEYS_FILE {path}, line ") >= 2)
        error = next(line for line in workers.log_text().splitlines() if f"API_KEYS_FILE {path}, line " in line)
        assert "keys.broken.sha256" in error and "stay in force" in error
        # the last good set is still in force: light is still removed, chat still works
        assert all(_status(workers, KEYS["chat"]) == 200 for _ in range(8))
        assert _status(workers, KEYS["light"]) == 401
        log = workers.log_text()
        assert "reloaded" in log and "added: newcomer" in log and "removed: light" in log
        assert "sk-test-newcomer" not in log and KEYS["light"] not in log
    finally:
        path.write_text(original)


def test_an_invalid_keys_file_refuses_the_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[keys.alice]\nkey = "sk-x"\nimages_per_minute = "lots"\n')
    env = {**os.environ, "API_KEYS_FILE": str(path), "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    assert failed_start(env, mentioning="API_KEYS_FILE") == [
        f"sd35: configuration error: API_KEYS_FILE {path}, line 3: keys.alice.images_per_minute must be a whole "
        "number from 0 (unlimited) to 1000000"
    ]
