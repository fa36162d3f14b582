"""Bearer-key authentication: the three exact messages, key rotation, open routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from sd35.auth import BAD_FORMAT, MISSING_HEADER, WRONG_KEY, authenticate, is_protected
from sd35.errors import AuthenticationError
from sd35.keys import KeyRing, default_keys
from tests.conftest import assert_openai_error, service_client

GEN = "/v1/images/generations"
BODY = {"prompt": "a cat", "size": "256x256", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def secured(tiny_model_dir: Path) -> Iterator[TestClient]:
    with service_client({"MODEL_ID": str(tiny_model_dir), "API_KEY": "old-key,new-key"}) as client:
        yield client


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, MISSING_HEADER),
        ({"Authorization": "new-key"}, BAD_FORMAT),
        ({"Authorization": "Basic bmV3LWtleQ=="}, BAD_FORMAT),
        ({"Authorization": "Bearer"}, BAD_FORMAT),
        ({"Authorization": "Bearer "}, BAD_FORMAT),
        ({"Authorization": "Bearer new-key extra"}, BAD_FORMAT),
        ({"Authorization": ""}, BAD_FORMAT),
        ({"Authorization": "Bearer wrong-key"}, WRONG_KEY),
        ({"Authorization": "Bearer new-key2"}, WRONG_KEY),
        ({"Authorization": "Bearer old-key,new-key"}, WRONG_KEY),
    ],
)
def test_refusals_have_the_exact_message(secured: TestClient, headers: dict, message: str) -> None:
    response = secured.post(GEN, json=BODY, headers=headers)
    error = assert_openai_error(response, 401, "authentication_error")
    assert error["message"] == message
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", ["old-key", "new-key"])
def test_every_configured_key_works(secured: TestClient, key: str) -> None:
    response = secured.post(GEN, json=BODY, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text


def test_scheme_is_case_insensitive(secured: TestClient) -> None:
    response = secured.get("/v1/models", headers={"Authorization": "bearer new-key"})
    assert response.status_code == 200


def test_auth_comes_before_validation(secured: TestClient) -> None:
    response = secured.post(GEN, content=b"{broken", headers={"content-type": "application/json"})
    assert_openai_error(response, 401, "authentication_error")


def test_unknown_v1_routes_are_404_before_any_key_is_asked(secured: TestClient) -> None:
    # The route is decided on the request line, before the headers are looked at: nothing to authenticate for.
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer new-key"}):
        error = assert_openai_error(secured.get("/v1/nope", headers=headers), 404, None)
        assert error["message"] == "Invalid URL (GET /v1/nope)"


@pytest.mark.parametrize(
    ("path", "status"),
    [("/health", 200), ("/livez", 200), ("/healthz", 200), ("/readyz", 200), ("/docs", 200), ("/redoc", 200)],
)
def test_probes_and_docs_stay_open(secured: TestClient, path: str, status: int) -> None:
    assert secured.get(path).status_code == status


def test_openapi_schema_stays_open(secured: TestClient) -> None:
    schema = secured.get("/openapi.json").json()
    assert "/v1/images/generations" in schema["paths"]


def test_authenticate_unit() -> None:
    ring = KeyRing(default_keys(["k1", "k2"]))
    assert authenticate(b"Bearer k2", ring).name == "default"
    assert authenticate(b"Bearer  k1 ", ring).name == "default"
    for header, message in [(None, MISSING_HEADER), (b"Token k1", BAD_FORMAT), (b"Bearer k3", WRONG_KEY)]:
        with pytest.raises(AuthenticationError) as refused:
            authenticate(header, ring)
        assert refused.value.message == message


def test_only_v1_is_protected() -> None:
    assert is_protected("/v1")
    assert is_protected("/v1/images/generations")
    assert not is_protected("/v1x")
    assert not is_protected("/health")
    assert not is_protected("/v1/images/files/abc.png", public_prefixes=("/v1/images/files/",))
