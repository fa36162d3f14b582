"""Quotas: images_per_minute per key, the 429 and headers clients see, and one ledger for every worker process."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from sd35.errors import RateLimitError, ValidationError
from sd35.quotas import QuotaLedger, duration
from tests.conftest import ROOT, assert_openai_error, service_client

GEN = "/v1/images/generations"
BODY = {"prompt": "a cat", "size": "256x256", "num_inference_steps": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_minute_of_images_then_one_every_interval() -> None:
    clock = Clock()
    ledger = QuotaLedger(clock=clock)
    states = [ledger.take("alice", 6, 1) for _ in range(6)]
    assert [state.remaining for state in states] == [5, 4, 3, 2, 1, 0]
    assert states[-1].reset_seconds == pytest.approx(60)
    with pytest.raises(RateLimitError) as refused:
        ledger.take("alice", 6, 1)
    assert refused.value.code == "rate_limit_exceeded" and refused.value.retry_after == 10
    clock.now += 10
    assert ledger.take("alice", 6, 1).remaining == 0
    clock.now += 30
    with pytest.raises(RateLimitError) as refused:
        ledger.take("alice", 6, 4)
    assert refused.value.retry_after == 10, "4 images need 4 free; 3 are free after 30 s"
    assert ledger.peek("alice", 6).remaining == 3
    assert ledger.peek("bob", 6).remaining == 6, "every key has its own bucket"


def test_a_refusal_never_asks_to_wait_more_than_a_minute() -> None:
    clock = Clock()
    ledger = QuotaLedger(clock=clock)
    for limit in (1, 2, 7, 60, 1000):
        ledger.take(f"k{limit}", limit, limit)
        for images in {1, limit}:
            with pytest.raises(RateLimitError) as refused:
                ledger.take(f"k{limit}", limit, images)
            assert 1 <= refused.value.retry_after <= 60
            clock.now += 0.001


def test_more_images_than_the_quota_can_ever_allow_is_a_400() -> None:
    with pytest.raises(ValidationError) as never:
        QuotaLedger().take("alice", 3, 4)
    assert never.value.param == "n" and "images_per_minute=3" in never.value.message


def test_images_never_queued_are_given_back() -> None:
    ledger = QuotaLedger(clock=Clock())
    ledger.take("alice", 4, 3)
    ledger.give_back("alice", 4, 3)
    assert ledger.peek("alice", 4).remaining == 4


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (0.0004, "1ms"), (0.25, "250ms"), (1, "1s"), (8.5, "8.5s"), (60, "1m0s")]
)
def test_reset_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


TAKE_ALL = """
import sys
from pathlib import Path
from sd35.errors import RateLimitError
from sd35.quotas import QuotaLedger

ledger, admitted = QuotaLedger(Path(sys.argv[1])), 0
for _ in range(10):
    try:
        ledger.take("shared", 12, 1)
        admitted += 1
    except RateLimitError:
        pass
print(admitted)
"""


def test_several_processes_share_one_quota(tmp_path: Path) -> None:
    """What several workers do: each process its own connection to the same database; the total is the limit."""
    database = tmp_path / "sd35-quotas.sqlite3"
    processes = [
        subprocess.Popen([sys.executable, "-c", TAKE_ALL, str(database)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    admitted = [int(process.communicate(timeout=60)[0]) for process in processes]
    assert sum(admitted) == 12, admitted
    assert QuotaLedger(database).peek("shared", 12).remaining == 0


# --- through the service ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(
        "[keys.capped]\nkey = 'sk-capped'\nimages_per_minute = 3\n\n"
        "[keys.free]\nkey = 'sk-free'\n\n"
        "[keys.watcher]\nkey = 'sk-watcher'\nadmin = true\n\n"
        "[keys.painter]\nkey = 'sk-painter'\nimages_per_minute = 4\n"
    )
    env = {"MODEL_ID": str(tiny_model_dir), "API_KEYS_FILE": str(path), "WARMUP": "false"}
    with service_client({**env, "CORS_ALLOW_ORIGINS": "https://chat.example.com"}) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_over_quota_is_a_429_with_headers_on_every_response(keyed: TestClient) -> None:
    models = keyed.get("/v1/models", headers=auth("sk-capped"))
    assert models.headers["x-ratelimit-limit-images"] == "3"
    assert models.headers["x-ratelimit-remaining-images"] == "3"
    assert models.headers["x-ratelimit-reset-images"] == "0s"

    first = keyed.post(GEN, json={**BODY, "n": 2}, headers=auth("sk-capped"))
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-remaining-images"] == "1"
    assert first.headers["x-ratelimit-reset-images"].endswith("s")

    refused = keyed.post(GEN, json={**BODY, "n": 2}, headers=auth("sk-capped"))
    error = assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert "images_per_minute" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-images"] == "3"
    assert refused.headers["x-ratelimit-remaining-images"] == "1"

    never = keyed.post(GEN, json={**BODY, "n": 4}, headers=auth("sk-capped"))
    assert_openai_error(never, 400, "validation_error", param="n")

    from_a_page = keyed.get("/v1/models", headers={**auth("sk-capped"), "Origin": "https://chat.example.com"})
    assert "x-ratelimit-remaining-images" in from_a_page.headers["access-control-expose-headers"], "readable by pages"

    free = keyed.post(GEN, json=BODY, headers=auth("sk-free"))
    assert free.status_code == 200 and "x-ratelimit-limit-images" not in free.headers, "no quota, no headers"


def test_the_queue_view_shows_names_never_keys(keyed: TestClient) -> None:
    admin = keyed.get("/v1/queue", headers=auth("sk-watcher"))
    assert admin.status_code == 200, admin.text
    view = admin.json()
    assert view["object"] == "queue" and view["policy"] == "fair" and view["worker"] == 1
    names = {line["name"]: line for line in view["keys"]}
    assert set(names) == {"capped", "free", "watcher", "painter"}
    assert names["capped"]["images_per_minute"] == 3 and "remaining_images" in names["capped"]
    assert names["free"]["max_queue_images"] == 32, "several keys: half the queue each by default"
    assert "sk-" not in admin.text

    own = keyed.get("/v1/queue", headers=auth("sk-free")).json()
    assert [line["name"] for line in own["keys"]] == ["free"], "a tenant sees its own line, not the others' names"
    assert_openai_error(keyed.get("/v1/queue"), 401, "authentication_error")


def _request_count(key: str) -> float:
    from sd35 import metrics

    return next(
        sample.value
        for metric in metrics.KEY_REQUEST_SECONDS.collect()
        for sample in metric.samples
        if sample.name.endswith("_count") and sample.labels.get("key") == key
    )


def test_an_a1111_request_is_counted_once_and_refused_before_any_gpu_work(keyed: TestClient) -> None:
    """txt2img's batch_size × n_iter images meet the key's quota as one request, as an OpenAI request's n does:
    iterations queued one after another must not each be counted, or refused after others have run."""
    engine = importlib.import_module("service").app.state.serving.engine
    painter, txt2img = ("webui", "sk-painter"), "/sdapi/v1/txt2img"
    body = {"prompt": "a cat", "width": 256, "height": 256, "steps": 1}
    calls = len(engine.served)

    never = keyed.post(txt2img, json={**body, "batch_size": 2, "n_iter": 3}, auth=painter)
    assert never.status_code == 422, never.text
    assert "batch_size × n_iter = 6" in never.json()["detail"] and "images_per_minute=4" in never.json()["detail"]
    assert len(engine.served) == calls, "no iteration ran"

    assert keyed.post(GEN, json=BODY, headers=auth("sk-painter")).headers["x-ratelimit-remaining-images"] == "3"
    refused = keyed.post(txt2img, json={**body, "batch_size": 2, "n_iter": 2}, auth=painter)
    assert refused.status_code == 429 and set(refused.json()) == {"detail"}, refused.text
    assert "images_per_minute" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 59 and int(refused.headers["retry-after-ms"]) >= 1000
    assert refused.headers["x-ratelimit-remaining-images"] == "3", "nothing counted"
    assert len(engine.served) == calls + 1, "only the OpenAI request ran"

    answered = _request_count("painter")
    made = keyed.post(txt2img, json={**body, "batch_size": 1, "n_iter": 3}, auth=painter)
    assert made.status_code == 200 and len(made.json()["images"]) == 3, made.text
    assert made.headers["x-ratelimit-limit-images"] == "4" and made.headers["x-ratelimit-remaining-images"] == "0"
    assert _request_count("painter") == answered + 1, "sd35_key_request_seconds counts AUTOMATIC1111's requests too"
