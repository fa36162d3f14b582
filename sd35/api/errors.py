"""The one place where the app turns exceptions into error responses.

Every error raised by a route, a dependency or request validation ends here
and leaves in the shape of the path's API (:func:`sd35.errors.error_payload`):
OpenAI's, or under ``/sdapi`` AUTOMATIC1111's ``{"detail": ...}`` (422 for
validation). FastAPI's own 422 bodies and plain-text errors never reach a client.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sd35.errors import (
    APIError,
    InvalidURLError,
    MethodNotAllowedError,
    ValidationError,
    error_payload,
    surface_of,
)


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    status, body, headers = error_payload(exc, surface_of(request.url.path))
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
        example = ' such as {"prompt": "..."}' if surface_of(request.url.path) == "openai" else ""
        if not _is_json(request):
            return ValidationError("The request body must be JSON, sent with 'Content-Type: application/json'.")
        if error.get("type") == "missing":
            return ValidationError(f"The request body is empty; send a JSON object{example}.")
        return ValidationError(f"The request body must be a JSON object{example}.")
    param = ".".join(loc)
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        return ValidationError(f"Missing required parameter: '{param}'.", param=param)
    if error.get("type") == "extra_forbidden":
        return ValidationError(f"Unrecognized parameter: '{param}'.", param=param)
    return ValidationError(f"Invalid value for '{param}': {message[0].lower()}{message[1:]}.", param=param)


def _http_error(request: Request, exc: StarletteHTTPException) -> BaseException:
    # Rare here: sd35.middleware.RouteGate answers paths and methods of no route
    # before the app; what remains is, e.g., a missing file under a static mount.
    if exc.status_code == 405:
        allow = tuple(method.strip() for method in (exc.headers or {}).get("Allow", "").split(",") if method.strip())
        return MethodNotAllowedError.for_route(request.method, request.url.path, allow)
    if exc.status_code == 404:
        return InvalidURLError(request.method, request.url.path)
    if exc.status_code == 400:
        return ValidationError(str(exc.detail))
    return exc


def install_error_handlers(app: FastAPI) -> None:
    async def on_invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request, validation_error(request, exc))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(request, _http_error(request, exc))

    async def on_any(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)
    # Its own handler: Starlette's catch-all for Exception answers, then re-raises into the log.
    app.add_exception_handler(APIError, on_any)
    # Anything unexpected: a bare 500, no traceback or path in the body.
    app.add_exception_handler(Exception, on_any)
