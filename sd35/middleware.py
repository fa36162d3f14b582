"""ASGI middleware installed at the BentoML level, where every path is seen.

BentoML answers paths that the mounted FastAPI app has no route for with its
own plain-text 404 before the app sees them; :class:`OpenAIErrorMiddleware`
turns such replies on ``/v1`` into OpenAI's error shape. Bodies are read
within limits (size, time, memory across requests) before anything parses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd35 import metrics
from sd35.errors import (
    APIError,
    AuthenticationError,
    BodyReadTimeoutError,
    ClientDisconnectedError,
    InternalError,
    MethodNotAllowedError,
    ModelNotLoadedError,
    NotFoundError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UploadsBusyError,
    ValidationError,
    error_bytes,
    error_payload,
)
from sd35.lifecycle import Stopping
from sd35.logs import REQUEST_ID

logger = logging.getLogger(__name__)

_BY_STATUS: dict[int, type[APIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: ValidationError,
    422: ValidationError,
    429: QueueFullError,  # BentoML's own 429 (traffic.max_concurrency): the server is full
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


class BufferBudget:
    """Bytes of request bodies held at once by one worker process, capped at ``limit``.

    Only the worker's event loop (one per process) touches it, so plain
    arithmetic needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        metrics.BUFFERED_BYTES.inc(size)
        return True

    def release(self, size: int) -> None:
        self.used -= size
        metrics.BUFFERED_BYTES.dec(size)


class _ClientGone(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The client closed the connection before its body was complete."""


async def _answer(send: Send, exc: APIError, *, close: bool) -> None:
    status, content, headers = error_bytes(exc)
    if close:
        # The rest of the body is not worth reading: h11 closes the connection after this reply.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


class BodySizeLimitMiddleware:
    """Reads every request body up front, within limits, and replays it to the app.

    - size: over ``max_body_bytes`` (``max_upload_bytes`` on upload paths) is
      a 400, whether ``Content-Length`` says so or a chunked body grows past it;
    - time: nothing received for ``read_timeout`` seconds is a 408;
    - memory: the bodies buffered by all requests of the process stay within
      ``budget`` (503 with ``Retry-After`` beyond it). A declared length is
      reserved before the first byte is read, so an upload is refused before
      it is sent rather than halfway; the reservation lasts until the request
      ends, as the parsed body lives that long;
    - shutdown: once ``stopping`` is set a body still arriving is answered 503
      at once (the engine takes no new work by then);
    - a client that leaves ends the request at once, with a reply nobody reads:
      BentoML's TimeoutMiddleware waits for a first reply, for minutes.

    Refusals close the connection, so the client cannot keep it busy.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_upload_bytes: int = 0,
        upload_paths: tuple[str, ...] = (),
        read_timeout: float = 30.0,
        budget: BufferBudget | None = None,
        stopping: Stopping | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_paths = upload_paths
        self.read_timeout = read_timeout
        self.budget = budget or BufferBudget(max(max_body_bytes, max_upload_bytes))
        self.stopping = stopping or Stopping()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in self.upload_paths
        limit = self.max_upload_bytes if upload else self.max_body_bytes
        setting = "MAX_UPLOAD_BYTES" if upload else "MAX_BODY_BYTES"
        too_large = ValidationError(f"The request body is larger than the limit of {limit} bytes ({setting}).")
        header = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        declared = int(header) if header.isdigit() else 0
        if declared > limit:
            await _answer(send, too_large, close=True)
            return
        reserved = 0
        try:
            try:
                if not self.budget.reserve(declared):
                    raise self._busy()
                reserved = declared
                chunks: list[bytes] = []
                size = 0
                async with contextlib.aclosing(self._chunks(receive)) as body:
                    async for chunk in body:
                        size += len(chunk)
                        if size > limit:
                            raise too_large
                        if size > reserved:
                            if not self.budget.reserve(size - reserved):
                                raise self._busy()
                            reserved = size
                        chunks.append(chunk)
            except _ClientGone:
                await _answer(
                    send, ClientDisconnectedError("The client left before its request body was complete."), close=False
                )
                return
            except APIError as refusal:
                await _answer(send, refusal, close=True)
                return
            # One copy of the body from here on: the app's (what is reserved).
            whole = b"".join(chunks)
            del chunks
            await self.app(scope, _replay(whole, receive), send)
        finally:
            self.budget.release(reserved)

    def _busy(self) -> UploadsBusyError:
        logger.warning(
            "refused a request body: %d bytes of bodies are being read already (MAX_BUFFERED_BYTES)", self.budget.used
        )
        return UploadsBusyError(
            f"The server is reading too many request bodies at once (MAX_BUFFERED_BYTES={self.budget.limit}); "
            "retry after the indicated delay.",
            retry_after=2,
        )

    async def _chunks(self, receive: Receive) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive; raises when it stalls, the server stops or the client leaves."""
        stop = asyncio.ensure_future(self.stopping.wait())
        get: asyncio.Future[Message] | None = None
        try:
            while True:
                get = asyncio.ensure_future(receive())
                done, _ = await asyncio.wait(
                    {get, stop}, timeout=self.read_timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    if stop in done:
                        raise ServiceUnavailableError.shutting_down()
                    raise BodyReadTimeoutError(
                        f"The request body stopped arriving: nothing was received for {self.read_timeout:g} seconds "
                        "(BODY_READ_TIMEOUT)."
                    )
                message = get.result()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return
        finally:
            stop.cancel()
            if get is not None:
                get.cancel()


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that first hands over the whole body, then what the client sends (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed, body
        if not replayed:
            replayed = True
            message: Message = {"type": "http.request", "body": body, "more_body": False}
            body = b""  # the app holds it now, for as long as it needs it
            return message
        return await receive()

    return replay


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
