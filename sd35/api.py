"""The HTTP surface: FastAPI routes and the handlers that turn every error into OpenAI's shape.

Routes only translate between HTTP and :class:`~sd35.serving.ImageServing`; the
engine never sees FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd35.errors import (
    APIError,
    ClientDisconnectedError,
    MethodNotAllowedError,
    ModelNotLoadedError,
    NotFoundError,
    ValidationError,
    error_payload,
)
from sd35.protocol import ErrorResponse, HealthResponse, ImageGenerationRequest, ImagesResponse, ModelList
from sd35.serving import ImageServing
from sd35.web import add_browser_routes

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request (`validation_error`); `param` names the field.",
        401: "Missing or wrong API key (`authentication_error`).",
        429: "Too much queued work (`rate_limit_exceeded`); see `Retry-After`.",
        500: "`gpu_out_of_memory`, `generation_failed` or `internal_error`.",
        503: "The model is loading or failed to load (`model_not_loaded`).",
        504: "The request outlived REQUEST_TIMEOUT (`timeout`).",
    }.items()
}


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


def validation_error(request: Request, exc: RequestValidationError) -> ValidationError:
    """The first problem of a failed validation, phrased for a person, with the field as ``param``."""
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return ValidationError(f"The request body is not valid JSON: {error.get('msg', '')}.")
    if not loc:
        if not _is_json(request):
            return ValidationError("The request body must be JSON, sent with 'Content-Type: application/json'.")
        if error.get("type") == "missing":
            return ValidationError('The request body is empty; send a JSON object such as {"prompt": "..."}.')
        return ValidationError('The request body must be a JSON object such as {"prompt": "..."}.')
    param = ".".join(loc)
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        return ValidationError(f"Missing required parameter: '{param}'.", param=param)
    if error.get("type") == "extra_forbidden":
        return ValidationError(f"Unrecognized parameter: '{param}'.", param=param)
    return ValidationError(f"Invalid value for '{param}': {message[0].lower()}{message[1:]}.", param=param)


T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first.

    Cancelling drops the request from the engine's queue, so a client that
    gives up frees its place instead of having its images made for nobody.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # Let the cancellation reach the engine (its queue) before answering.
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnectedError("The client closed the connection before the images were ready.")


_HOST_RE = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~\-]+)*$")


def _first(value: str | None) -> str | None:
    return value.split(",")[0].strip() if value else None


def public_base_url(request: Request, configured: str | None) -> str:
    """Where clients reach this service: PUBLIC_BASE_URL, else what the proxy forwarded, else the Host header."""
    if configured:
        return configured
    headers = request.headers
    forwarded: dict[str, str] = {}
    for pair in (_first(headers.get("forwarded")) or "").split(";"):
        key, _, value = pair.partition("=")
        forwarded[key.strip().lower()] = value.strip().strip('"')
    scheme = forwarded.get("proto") or _first(headers.get("x-forwarded-proto")) or request.url.scheme
    host = forwarded.get("host") or _first(headers.get("x-forwarded-host")) or headers.get("host", "")
    prefix = (_first(headers.get("x-forwarded-prefix")) or "").rstrip("/")
    # Header values end up in URLs handed to clients: take only well-formed ones.
    if scheme not in ("http", "https"):
        scheme = request.url.scheme
    if not _HOST_RE.match(host):
        host = headers.get("host", "") if _HOST_RE.match(headers.get("host", "")) else request.url.netloc
    if not _PREFIX_RE.match(prefix):
        prefix = ""
    return f"{scheme}://{host}{prefix}"


def _serving(request: Request) -> ImageServing:
    serving: ImageServing | None = getattr(request.app.state, "serving", None)
    if serving is None:
        raise ModelNotLoadedError("The service is starting.", retry_after=5)
    return serving


def _document(app: FastAPI) -> None:
    """The OpenAPI document as the service really behaves.

    FastAPI documents a 422 for every body it validates; sd35 answers 400 in
    OpenAI's shape instead. The Bearer scheme is declared on the ``/v1``
    routes so that Swagger UI's "Authorize" sends the key.
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
        components["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "The server's API_KEY (if set)."}
        }
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if path.startswith("/v1"):
                    operation["security"] = [{"bearerAuth": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app() -> FastAPI:
    """The OpenAI-compatible app; ``app.state.serving`` is attached when the service starts."""
    app = FastAPI(
        title="sd35 — OpenAI-compatible image generation",
        summary="Stable Diffusion 3.5 Large Turbo behind the OpenAI Images API.",
        version="1.0.0",
        # Served by sd35.web from local assets instead of a CDN.
        docs_url=None,
        redoc_url=None,
    )
    add_browser_routes(app)

    _document(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(request, exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowedError(f"Method {request.method} is not allowed for {request.url.path}.")
            )
        if exc.status_code == 404:
            return error_response(NotFoundError(f"No route {request.method} {request.url.path}."))
        if exc.status_code == 400:
            return error_response(ValidationError(str(exc.detail)))
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        tags=["images"],
        summary="Create images from a prompt",
    )
    async def create_images(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        serving = _serving(request)
        base_url = public_base_url(request, serving.settings.public_base_url)
        return await unless_disconnected(request, serving.generate(body, base_url))

    @app.get(
        "/v1/images/files/{name}",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "The image."},
            404: {"model": ErrorResponse, "description": "Unknown, malformed or expired (`not_found`)."},
        },
        tags=["images"],
        summary="Fetch an image returned as a URL (no API key: the URL is the credential)",
    )
    async def image_file(name: str, request: Request) -> Response:
        stored = await asyncio.to_thread(_serving(request).store.get, name)
        if stored is None:
            raise NotFoundError("No such image: it never existed, or it expired.")
        return Response(
            stored.data,
            media_type=stored.content_type,
            headers={"cache-control": f"private, max-age={stored.seconds_left}", "x-content-type-options": "nosniff"},
        )

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]}, tags=["models"])
    async def list_models(request: Request) -> ModelList:
        return _serving(request).models()

    @app.get(
        "/health",
        response_model=HealthResponse,
        response_model_exclude_none=True,
        responses={503: {"model": HealthResponse, "description": "Loading, or the load failed."}},
        tags=["health"],
    )
    async def health(request: Request) -> JSONResponse:
        serving: ImageServing | None = getattr(request.app.state, "serving", None)
        if serving is None:
            body = HealthResponse(status="degraded", model_loaded=False, model="", detail="the service is starting")
        else:
            status = serving.engine.status
            body = HealthResponse(
                status="healthy" if status.loaded else "degraded",
                model_loaded=status.loaded,
                model=serving.settings.model_id,
                detail=status.detail,
            )
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if body.model_loaded else 503)

    return app
