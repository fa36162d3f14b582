"""The outermost layer of every request, ahead of BentoML's own middleware: ids, timing, labels, last resort.

BentoML builds each worker's middleware stack as its request metrics, its
OpenTelemetry span and its access log first, then its traffic limits, and only
then the service's own middleware (``add_asgi_middleware``). Whatever must
hold for BentoML's layers too is done here, in front of them:

- the request id: a sane ``x-request-id`` sent by a proxy or client is kept,
  otherwise one is made; every log line of the request carries it and every
  response (BentoML's own 429/504 too) sends it back, with
  ``openai-processing-ms``, as OpenAI does;
- bounded labels: BentoML's metrics and access log label a request by
  ``scope["path"]``, which would make every url image's secret name, and every
  random path a scanner tries, a label of its own. They are shown the route's
  template instead (``/v1/images/files/{name}``, or one label for every path
  of no route); :class:`RealPath`, the first of the service's middleware,
  gives the real path back to everything below;
- the last resort: an exception that escaped every layer, or the cancellation
  of a request still open at the end of the shutdown grace, is answered in the
  API's error shape instead of uvicorn's plain-text 500.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd35.errors import ServiceUnavailableError, error_bytes
from sd35.logs import REQUEST_ID
from sd35.middleware.routes import route_of

# What a proxy's id may look like to be kept: a token, never anything that
# could break a log line or a header (spaces, quotes, control characters).
_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9._:=+/-]{0,127}$")
_REAL_PATH = "sd35.path"
_REAL_RAW_PATH = "sd35.raw_path"


def real_path(scope: Scope) -> str:
    """The request's path, also where BentoML's layers are shown only its template."""
    return scope.get(_REAL_PATH) or scope.get("path", "")


def request_id_of(scope: Scope) -> str:
    """The caller's ``x-request-id`` when it is a sane token, else a new random one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and _SANE_REQUEST_ID.match(value):
            return value.decode()
    return uuid.uuid4().hex


class EdgeMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope)
        token = REQUEST_ID.set(request_id)
        path = scope["path"]
        label = route_of(scope).label
        inner = {**scope, "path": label, "raw_path": label.encode(), _REAL_PATH: path}
        if "raw_path" in scope:
            inner[_REAL_RAW_PATH] = scope["raw_path"]
        response_started = False

        async def stamped_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                milliseconds = round((time.perf_counter() - started) * 1000)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                    (b"openai-processing-ms", str(milliseconds).encode()),
                ]
            await send(message)

        try:
            await self.app(inner, receive, stamped_send)
        except asyncio.CancelledError:
            # uvicorn cancels what is still open when the shutdown grace is over.
            if response_started:
                raise
            await self._last_word(send=stamped_send, path=path, exc=_ended_by_shutdown())
        except Exception as exc:
            if response_started:
                raise
            await self._last_word(send=stamped_send, path=path, exc=exc)
        finally:
            REQUEST_ID.reset(token)

    @staticmethod
    async def _last_word(send: Send, path: str, exc: BaseException) -> None:
        status, body, headers = error_bytes(exc, path)
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _ended_by_shutdown() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "The server shut down before this request finished (the shutdown grace, SHUTDOWN_GRACE_SECONDS, "
        "was over); retry it, another replica may answer.",
        retry_after=1,
    )


class RealPath:
    """Gives the app the real path again, after BentoML's layers saw only the route's template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _REAL_PATH in scope:
            scope = {**scope, "path": scope[_REAL_PATH]}
            if _REAL_RAW_PATH in scope:
                scope["raw_path"] = scope[_REAL_RAW_PATH]
            else:
                scope.pop("raw_path", None)
        await self.app(scope, receive, send)


def install_edge() -> None:
    """Put :class:`EdgeMiddleware` in front of BentoML's own middleware, in every app BentoML builds.

    BentoML has no hook for that (``add_asgi_middleware`` adds behind its
    layers), so its app factory's middleware list is extended. Idempotent:
    tests import the service more than once.
    """
    from _bentoml_impl.server.app import ServiceAppFactory

    original: property = ServiceAppFactory.__dict__.get("_sd35_middlewares", ServiceAppFactory.middlewares)

    def middlewares(self: ServiceAppFactory) -> list[Middleware]:
        return [Middleware(EdgeMiddleware), *original.fget(self)]  # type: ignore[misc]

    ServiceAppFactory._sd35_middlewares = original  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)  # type: ignore[method-assign,assignment]
