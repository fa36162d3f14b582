"""What sd35 answers, validated against OpenAI's own OpenAPI document (tests/openai_openapi/README.md).

Each success is checked against the schema OpenAI documents for that
operation and content type; each error against OpenAI's ``ErrorResponse``
(OpenAI documents no error responses per path: every error has that shape).
Beyond validity, a body may carry only the fields OpenAI declares, plus the
few sd35 extensions named here (and in the README).

One deliberate difference is allowed, and only where a test says so: OpenAI's
schemas list three sizes (1024x1024, 1024x1536, 1536x1024) for a response's
``size``, and sd35 echoes any size it made (the README says so). One test
makes 1024x1024 and allows nothing; the rest make 256x256 images, which a
2-core test machine makes many times faster.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.testclient import TestClient

from sd35 import errors
from tests.conftest import service_client
from tests.test_edits import photo, png
from tests.test_streaming import read_events

SPEC_PATH = Path(__file__).parent / "openai_openapi" / "openapi.images.json"
SPEC = json.loads(SPEC_PATH.read_text())
SCHEMAS = SPEC["components"]["schemas"]
REGISTRY = Registry().with_resource("urn:openai", Resource.from_contents(SPEC, default_specification=DRAFT202012))
KEY = "sk-conformance"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"num_inference_steps": "1"}
# sd35's extensions: which of the request's images a stream event is about; where a model's weights come from.
EXTENSIONS = {"ImageGenPartialImageEvent": {"image_index"}, "ImageGenCompletedEvent": {"image_index"}}
EXTENSIONS |= {"ImageEditPartialImageEvent": {"image_index"}, "ImageEditCompletedEvent": {"image_index"}}
EXTENSIONS |= {"Model": {"root", "parent"}}


def _resolve(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = schema["$ref"].rsplit("/", 1)[1]
    return name, SCHEMAS[name]


def response_schema(path: str, method: str, content_type: str = "application/json") -> dict[str, Any]:
    """The schema OpenAI documents for a 200 of ``method path`` in ``content_type``."""
    return SPEC["paths"][path][method]["responses"]["200"]["content"][content_type]["schema"]


def _is_size_outside_openais_list(error: jsonschema.ValidationError) -> bool:
    return list(error.absolute_path) == ["size"] and error.validator == "enum"


def assert_conforms(instance: Any, schema: dict[str, Any], *, any_size: bool = False) -> None:
    """``instance`` is valid under ``schema`` (a ``$ref`` into OpenAI's document) and adds no undeclared field;
    with ``any_size``, a ``size`` outside OpenAI's three is the one difference allowed."""
    schema = _branch(instance, schema)
    validator = jsonschema.Draft202012Validator(
        {"$ref": "urn:openai" + schema["$ref"]}, registry=REGISTRY, format_checker=jsonschema.FormatChecker()
    )
    problems = [
        f"{list(error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(instance)
        if not (any_size and _is_size_outside_openais_list(error))
    ]
    assert not problems, problems
    _assert_only_declared(instance, schema)


def _branch(instance: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """For a union with a ``type`` discriminator (the stream events), the member the instance's type names."""
    name, definition = _resolve(schema)
    if "discriminator" not in definition:
        return schema
    branches = definition.get("anyOf") or definition.get("oneOf")
    chosen = [b for b in branches if instance.get("type") in _resolve(b)[1]["properties"]["type"]["enum"]]
    assert len(chosen) == 1, (name, instance.get("type"))
    return chosen[0]


def _assert_only_declared(instance: Any, schema: dict[str, Any]) -> None:
    name, definition = _resolve(schema)
    properties = definition.get("properties", {})
    extra = set(instance) - set(properties) - EXTENSIONS.get(name, set())
    assert not extra, f"{name}: fields OpenAI does not declare: {extra}"
    for field, value in instance.items():
        declared = properties.get(field, {})
        if "$ref" in declared and isinstance(value, dict):
            _assert_only_declared(value, declared)
        items = declared.get("items", {})
        if "$ref" in items and isinstance(value, list):
            for item in value:
                _assert_only_declared(item, items)


ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, tiny_loras: dict[str, Path]) -> Iterator[TestClient]:
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "API_KEY": KEY,
        "WARMUP": "false",
        "LORA_ADAPTERS": f"ink={tiny_loras['ink']}",
    }
    with service_client(env) as test_client:
        yield test_client


def test_openai_document_is_the_named_version() -> None:
    assert SPEC["openapi"] == "3.1.0" and SPEC["info"]["version"] == "2.3.0"
    assert "f85dbe223d40e1a31cba812ab2d755c7e98a92a3" in SPEC["info"]["x-sd35-source"]
    jsonschema.Draft202012Validator.check_schema(SCHEMAS["ImagesResponse"])


def test_a_1024_generation_conforms_with_no_exception(client: TestClient) -> None:
    body = {"prompt": "a lighthouse", "model": "gpt-image-2", "size": "1024x1024", "num_inference_steps": 1}
    response = client.post("/v1/images/generations", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "1024x1024" and response.json()["usage"]["output_tokens"] == 64 * 64
    assert_conforms(response.json(), response_schema("/images/generations", "post"))


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-image-2", "n": 2},
        {"model": "gpt-image-1.5", "output_format": "webp", "output_compression": 80},
        {"model": "gpt-image-1-mini", "quality": "high", "background": "opaque", "moderation": "low"},
        {"model": "dall-e-3", "quality": "hd", "style": "natural"},  # a URL, as OpenAI answers dall-e-3
        {"model": "dall-e-2", "response_format": "b64_json"},
        {"model": "ink"},
        {},
    ],
    ids=["gpt-image-2", "gpt-image-1.5-webp", "gpt-image-1-mini", "dall-e-3-url", "dall-e-2-b64", "adapter", "bare"],
)
def test_generation_conforms(client: TestClient, body: dict) -> None:
    request = {"prompt": "a lighthouse", "size": "256x256", "num_inference_steps": 1, **body}
    response = client.post("/v1/images/generations", json=request, headers=AUTH)
    assert response.status_code == 200, response.text
    assert_conforms(response.json(), response_schema("/images/generations", "post"), any_size=True)


def test_edit_and_variation_conform(client: TestClient) -> None:
    files = [("image", ("in.png", png(photo()), "image/png"))]
    edit = client.post(
        "/v1/images/edits",
        files=files,
        data={"prompt": "a boat", "model": "gpt-image-2", "input_fidelity": "high", **FAST},
        headers=AUTH,
    )
    assert edit.status_code == 200, edit.text
    assert edit.json()["usage"]["input_tokens_details"]["image_tokens"] == 16 * 16
    assert_conforms(edit.json(), response_schema("/images/edits", "post"), any_size=True)
    variation = client.post("/v1/images/variations", files=files, data={"n": "2", **FAST}, headers=AUTH)
    assert variation.status_code == 200, variation.text
    assert_conforms(variation.json(), response_schema("/images/variations", "post"), any_size=True)


@pytest.mark.parametrize("kind", ["image_generation", "image_edit"])
def test_stream_events_conform(client: TestClient, kind: str) -> None:
    path = "/images/generations" if kind == "image_generation" else "/images/edits"
    fields = {"prompt": "a heron", "stream": True, "partial_images": 1, "n": 2, "num_inference_steps": 2}
    if kind == "image_edit":
        files = [("image", ("in.png", png(photo()), "image/png"))]
        data = {name: str(value).lower() for name, value in fields.items()}
        context = client.stream("POST", f"/v1{path}", files=files, data=data, headers=AUTH)
    else:
        context = client.stream("POST", f"/v1{path}", json={**fields, "size": "256x256"}, headers=AUTH)
    with context as response:
        assert response.status_code == 200
        events = read_events(response)
    assert [name for name, _ in events] == [f"{kind}.partial_image"] * 2 + [f"{kind}.completed"] * 2
    schema = response_schema(path, "post", "text/event-stream")
    for name, data in events:
        assert data["type"] == name
        assert_conforms(data, schema, any_size=True)


def test_models_conform(client: TestClient) -> None:
    listed = client.get("/v1/models", headers=AUTH).json()
    assert_conforms(listed, response_schema("/models", "get"))
    for card in listed["data"]:
        assert_conforms(
            client.get(f"/v1/models/{card['id']}", headers=AUTH).json(), response_schema("/models/{model}", "get")
        )


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", "/v1/images/generations", {"json": {"prompt": "a", "quality": "ultra"}}, 400, "validation_error"),
        ("POST", "/v1/images/generations", {"json": {"prompt": "a", "n": 99}}, 400, "validation_error"),
        ("POST", "/v1/images/edits", {"data": {"prompt": "a"}}, 400, "validation_error"),
        ("GET", "/v1/models/gpt-image-2", {}, 404, "model_not_found"),
        ("GET", "/v1/images/files/nothing-here.png", {}, 404, "not_found"),
        ("GET", "/v1/images/generations", {}, 405, "method_not_allowed"),
    ],
)
def test_http_errors_conform(client: TestClient, method: str, path: str, kwargs: dict, status: int, code: str) -> None:
    if path.startswith("/v1/images/edits"):
        kwargs = {**kwargs, "files": {"mask": ("m.png", png(photo()), "image/png")}}
    response = client.request(method, path, headers=AUTH, **kwargs)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert_conforms(response.json(), ERROR_SCHEMA)


def test_authentication_error_conforms(client: TestClient) -> None:
    response = client.post("/v1/images/generations", json={"prompt": "a"})
    assert response.status_code == 401
    assert_conforms(response.json(), ERROR_SCHEMA)


def _all_errors(kind: type[errors.APIError]) -> Iterator[type[errors.APIError]]:
    for sub in kind.__subclasses__():
        yield sub
        yield from _all_errors(sub)


def _example(kind: type[errors.APIError]) -> errors.APIError:
    if kind is errors.InvalidURLError:  # OpenAI's own words: made from the request line
        return errors.InvalidURLError("GET", "/v1/nope")
    if kind is errors.MethodNotAllowedError:
        return errors.MethodNotAllowedError.for_route("GET", "/v1/images/generations", ("POST",))
    return kind("A message.", param="n")


@pytest.mark.parametrize("kind", sorted(set(_all_errors(errors.APIError)), key=lambda k: k.__name__))
def test_every_error_sd35_can_raise_conforms(kind: type[errors.APIError]) -> None:
    status, body, raw_headers = errors.error_bytes(_example(kind))
    assert_conforms(json.loads(body), ERROR_SCHEMA)
    headers = {name.decode(): value.decode() for name, value in raw_headers}
    assert headers["x-should-retry"] in ("true", "false")
    if status in (429, 503) and kind.retryable:
        assert 1 <= int(headers["retry-after"]) <= 59 and int(headers["retry-after-ms"]) >= 1
