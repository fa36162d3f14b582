"""The HTTP surface: FastAPI routes and the handlers that turn every error into OpenAI's shape.

Routes only translate between HTTP and :class:`~sd35.serving.ImageServing`; the
engine never sees FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError as PydanticValidationError
from starlette.datastructures import UploadFile
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
from sd35.protocol import (
    ErrorResponse,
    HealthResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageStreamEvent,
    ImageVariationRequest,
    ModelList,
    StreamErrorEvent,
)
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


_STREAMING = {
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


def json_body(body: bytes) -> Response:
    """A JSON body built elsewhere as bytes (:mod:`sd35.responses`), sent as it is."""
    return Response(body, media_type="application/json")


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


def validation_error(request: Request, exc: RequestValidationError | PydanticValidationError) -> ValidationError:
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


async def _until_disconnected(request: Request, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Relay ``events``, cancelling them as soon as the client goes away, even while nothing is being sent."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            step = asyncio.ensure_future(anext(events))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        watcher.cancel()
        await events.aclose()  # type: ignore[attr-defined]


def event_stream(request: Request, events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        _until_disconnected(request, events),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


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


MAX_UPLOAD_FILES = 16


def _multipart_schema(model: type, files: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    """OpenAPI for a multipart form: the model's fields plus the files (FastAPI cannot infer it from a raw form)."""
    schema = model.model_json_schema()
    properties = {**files, **schema["properties"]}
    form = {"type": "object", "properties": properties, "required": required + schema.get("required", [])}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


BINARY = {"type": "string", "format": "binary"}
EDIT_FILES = {
    "image": {
        **BINARY,
        "description": "The image to edit (PNG, JPEG or WebP). Also accepted as `image[]`, "
        "several times: the first is edited.",
    },
    "mask": {
        **BINARY,
        "description": "PNG of the same size: transparent pixels (or, without alpha, white pixels) "
        "are repainted. Without it the edit is image-to-image over the whole picture.",
    },
}
VARIATION_FILES = {"image": {**BINARY, "description": "The image to vary (PNG, JPEG or WebP)."}}


async def read_form(request: Request, model: type[ImageEditRequest] | type[ImageVariationRequest]):
    """Form fields validated by ``model``, the uploaded images (name, bytes) and the mask bytes."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ValidationError("The request body must be multipart/form-data, with the image as a file field 'image'.")
    form = await request.form(max_files=MAX_UPLOAD_FILES + 1, max_fields=100)
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    for name in ("image", "image[]", "mask"):
        if isinstance(fields.get(name), str):
            raise ValidationError(f"'{name}' must be a file upload, not a text field.", param=name.rstrip("[]"))
    try:
        parsed = model.model_validate(fields)
    except PydanticValidationError as exc:
        raise validation_error(request, exc) from None
    uploads = [value for name in ("image", "image[]") for value in form.getlist(name) if isinstance(value, UploadFile)]
    if len(uploads) > MAX_UPLOAD_FILES:
        raise ValidationError(f"At most {MAX_UPLOAD_FILES} images can be sent.", param="image")
    images = [(f"image[{i}]" if len(uploads) > 1 else "image", await upload.read()) for i, upload in enumerate(uploads)]
    mask = form.get("mask")
    mask_bytes = await mask.read() if isinstance(mask, UploadFile) else None
    return parsed, images, mask_bytes


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
        schemas = components.setdefault("schemas", {})
        for model in (ImageStreamEvent, StreamErrorEvent):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(definition.pop("$defs", {}))
            schemas[model.__name__] = definition
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
        responses={**_STREAMING, **_ERRORS},
        tags=["images"],
        summary="Create images from a prompt",
    )
    async def create_images(body: ImageGenerationRequest, request: Request) -> Response:
        serving = _serving(request)
        if body.stream:
            return event_stream(request, serving.stream(serving.params_for(body), body, "image_generation"))
        base_url = public_base_url(request, serving.settings.public_base_url)
        return json_body(await unless_disconnected(request, serving.generate(body, base_url)))

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses={**_STREAMING, **_ERRORS},
        tags=["images"],
        summary="Edit an image: image-to-image, or inpainting with a mask",
        openapi_extra=_multipart_schema(ImageEditRequest, EDIT_FILES, ["image"]),
    )
    async def edit_images(request: Request) -> Response:
        serving = _serving(request)
        parsed, images, mask = await read_form(request, ImageEditRequest)
        if parsed.stream:
            params = await serving.decode_edit(parsed, images, mask)
            return event_stream(request, serving.stream(params, parsed, "image_edit"))
        base_url = public_base_url(request, serving.settings.public_base_url)
        return json_body(await unless_disconnected(request, serving.edit(parsed, images, mask, base_url)))

    @app.post(
        "/v1/images/variations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        tags=["images"],
        summary="Create variations of an image",
        openapi_extra=_multipart_schema(ImageVariationRequest, VARIATION_FILES, ["image"]),
    )
    async def image_variations(request: Request) -> Response:
        serving = _serving(request)
        parsed, images, _ = await read_form(request, ImageVariationRequest)
        base_url = public_base_url(request, serving.settings.public_base_url)
        return json_body(await unless_disconnected(request, serving.edit(parsed, images[:1], None, base_url)))

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
                memory_mode=serving.engine.memory_mode,
                weight_bytes=serving.engine.weight_bytes if status.loaded else None,
            )
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if body.model_loaded else 503)

    return app
