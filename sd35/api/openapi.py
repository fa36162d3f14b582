"""The OpenAPI document as the service really behaves, and the response descriptions routes share."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from sd35.auth import is_protected
from sd35.errors import surface_of
from sd35.protocol import ErrorResponse, ImageStreamEvent, StreamErrorEvent

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request (`validation_error`); `param` names the field.",
        401: "Missing or wrong API key (`authentication_error`).",
        408: "The request body stopped arriving, or arrived too slowly "
        "(`request_timeout`; BODY_READ_TIMEOUT, BODY_MIN_RATE).",
        429: "The API key is over its quota (`rate_limit_exceeded`), or the queue is full (`queue_full`); "
        "`retry-after` / `retry-after-ms` say when to retry.",
        500: "`gpu_out_of_memory`, `generation_failed` or `internal_error`.",
        502: "A `url` image was made but the image store failed or did not answer (`image_store_failed`).",
        503: "The model is loading (`model_not_loaded`, with `retry-after`) or failed to load (`model_not_loaded`, "
        "`x-should-retry: false`); too many request bodies are being read at once (`server_busy`, with "
        "`retry-after`); or the server is shutting down (`service_unavailable`).",
        504: "The request outlived REQUEST_TIMEOUT (`timeout`).",
        507: "The image store is full of images that have not expired (`image_store_full`); use `b64_json`.",
    }.items()
}

# What every retryable 429 and 503 carries; the openai SDKs wait as told (below 60 s) before retrying.
RETRY_HEADERS = {
    "retry-after": {"description": "Seconds to wait before retrying, 1–59.", "schema": {"type": "integer"}},
    "retry-after-ms": {"description": "The same delay in milliseconds.", "schema": {"type": "integer"}},
    "x-should-retry": {
        "description": "`false` when retrying cannot help (a model that failed to load), else `true`.",
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
}
for _status in (429, 503):
    ERRORS[_status]["headers"] = RETRY_HEADERS

# What a route that needs the serving layer but not the model answers in the moment before that layer exists
# (while the model loads, such a route already answers).
STARTING: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorResponse,
        "description": "The service is starting (`model_not_loaded`, with `retry-after`).",
        "headers": RETRY_HEADERS,
    }
}

STREAMING: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The images; with `stream: true`, server-sent events "
        "(`*.partial_image` events, then one `*.completed` event per image).",
        "content": {
            "text/event-stream": {
                # One server-sent event: its name, and its data - JSON of one of the event models.
                "schema": {
                    "type": "object",
                    "properties": {
                        "event": {"type": "string"},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {
                                "anyOf": [
                                    {"$ref": "#/components/schemas/ImageStreamEvent"},
                                    {"$ref": "#/components/schemas/StreamErrorEvent"},
                                ]
                            },
                        },
                    },
                    "required": ["data"],
                }
            }
        },
    }
}

BINARY = {"type": "string", "format": "binary"}


def multipart_schema(model: type, files: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    """OpenAPI for a multipart form: the model's fields plus the files (FastAPI cannot infer it from a raw form)."""
    schema = model.model_json_schema()  # type: ignore[attr-defined]
    properties = {**files, **schema["properties"]}
    form = {"type": "object", "properties": properties, "required": required + schema.get("required", [])}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


def describe_as_served(app: FastAPI) -> None:
    """Replace FastAPI's document with one that matches what clients really get.

    FastAPI documents a 422 for every body it validates; sd35 answers 400 in
    OpenAI's shape instead (AUTOMATIC1111's routes do answer 422). The Bearer
    scheme is declared on the ``/v1`` routes that need a key, Basic and Bearer on ``/sdapi``,
    so that Swagger UI's "Authorize" sends the key.
    """
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        schemas = components.setdefault("schemas", {})
        for model in (ImageStreamEvent, StreamErrorEvent):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(definition.pop("$defs", {}))
            schemas[model.__name__] = definition
        components["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "The server's API_KEY (if set)."},
            "basicAuth": {
                "type": "http",
                "scheme": "basic",
                "description": "AUTOMATIC1111's API: any user name, an API key as the password.",
            },
        }
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                if surface_of(path) == "a1111":
                    # AUTOMATIC1111 does answer 422 (its own shape, documented by the routes).
                    operation["security"] = [{"basicAuth": []}, {"bearerAuth": []}]
                    continue
                operation.get("responses", {}).pop("422", None)
                if is_protected(path):  # not the image URLs, which are capability URLs
                    operation["security"] = [{"bearerAuth": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
