"""ASGI middleware installed at the BentoML level, where every path is seen.

BentoML answers paths that the mounted FastAPI app has no route for with its
own plain-text 404 before the app sees them; :class:`OpenAIErrorMiddleware`
turns such replies on ``/v1`` into OpenAI's error shape. The body limit is
enforced before anything parses a body.
"""

from __future__ import annotations

import json
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd35.errors import (
    APIError,
    AuthenticationError,
    InternalError,
    MethodNotAllowedError,
    ModelNotLoadedError,
    NotFoundError,
    RateLimitError,
    RequestTimeoutError,
    ValidationError,
    error_bytes,
    error_payload,
)
from sd35.logs import REQUEST_ID

_BY_STATUS: dict[int, type[APIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: ValidationError,
    422: ValidationError,
    429: RateLimitError,
    503: ModelNotLoadedError,
    504: RequestTimeoutError,
}


def _is_openai_error(body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


def _replacement(status: int, method: str, path: str) -> APIError:
    if status == 404:
        return NotFoundError(f"No route {method} {path}.")
    if status == 405:
        return MethodNotAllowedError(f"Method {method} is not allowed for {path}.")
    error_class = _BY_STATUS.get(status, InternalError)
    return error_class(f"The request failed with HTTP status {status}.")


class OpenAIErrorMiddleware:
    """Rewrites any error reply on ``/v1`` that is not already in OpenAI's shape."""

    def __init__(self, app: ASGIApp, prefix: str = "/v1") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def checked_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None:
                await send(message)
                return
            if message["type"] != "http.response.body":
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            if _is_openai_error(body):
                await send(held)
                await send({"type": "http.response.body", "body": body})
                return
            status, content, headers = error_bytes(_replacement(held["status"], scope["method"], path))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": content})

        await self.app(scope, receive, checked_send)


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_body_bytes`` with a 400, before any parsing.

    The body is read up front (at most the limit) and replayed, so a chunked
    upload that grows past the limit is refused as cleanly as one whose
    ``Content-Length`` already says so.
    """

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int = 0, upload_paths: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_paths = upload_paths

    async def _refuse(self, send: Send, limit: int, setting: str) -> None:
        status, content, headers = error_bytes(
            ValidationError(f"The request body is larger than the limit of {limit} bytes ({setting}).")
        )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in self.upload_paths
        limit = self.max_upload_bytes if upload else self.max_body_bytes
        setting = "MAX_UPLOAD_BYTES" if upload else "MAX_BODY_BYTES"
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit, setting)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, limit, setting)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _trace_id() -> str | None:
    """The OpenTelemetry trace id of this request (BentoML's access log prints it as ``trace=``)."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


class RequestIdMiddleware:
    """Gives every request an id: in sd35's log lines and the ``x-request-id`` response header.

    The id is the request's trace id, so BentoML's access log line for the
    request (``trace=...``) carries the same one; the openai SDKs expose it as
    ``.request_id``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _trace_id() or uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def adopt_bentoml_traffic_errors() -> None:
    """Make BentoML's own 429 and 504 replies OpenAI-shaped.

    BentoML's traffic middlewares (``traffic.max_concurrency`` → 429,
    ``traffic.timeout`` → 504) sit outside every middleware a service can add
    and answer ``{"error": "<text>"}``, which the openai SDKs cannot parse into
    ``.code``. sd35 normally answers first (its queue gives 429s, its
    REQUEST_TIMEOUT fires before BentoML's), but operators can set those limits
    (BentoCloud's ``config_overrides``): this swaps the response class that
    BentoML's traffic module builds its replies with.
    """
    from bentoml._internal.server.http import traffic
    from starlette.responses import JSONResponse

    class OpenAIShapedTrafficResponse(JSONResponse):
        def __init__(self, content: dict, status_code: int = 200, **kwargs: object) -> None:
            error_class = _BY_STATUS.get(status_code, InternalError)
            detail = str(content.get("error", "")) if isinstance(content, dict) else ""
            exc = error_class(f"{detail or 'The request failed'}.")
            if status_code == 429:
                exc.retry_after = 1
            status, body, headers = error_payload(exc)
            super().__init__(body, status_code=status, headers=headers)

    traffic.JSONResponse = OpenAIShapedTrafficResponse
