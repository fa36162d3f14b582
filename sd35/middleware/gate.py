"""The route gate: a path that is no route gets 404, a route asked with the wrong method 405, before anything else.

A HEAD for a route that takes GET is let through as that GET; the server,
which still sees HEAD, sends its headers without the body.

Decided on the request line alone, before authentication and before a byte
of the body is read: nobody is buffered, and no layer below spends anything,
on a request that has nowhere to go. The answers are OpenAI's, word for word
(``Invalid URL (GET /v1/nope)``, ``code`` null) with ``Allow`` on a 405, for
every path — BentoML's own routes (``/livez``, ``/readyz``, ``/healthz``,
``/metrics``) keep their own replies.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from sd35.errors import InvalidURLError, MethodNotAllowedError
from sd35.middleware.replies import body_pending, send_error
from sd35.middleware.routes import route_of


class RouteGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_of(scope)
        if route.template is not None:
            if route.head_as_get:
                # A copy: the server keeps its own scope, which still says HEAD, and so sends no body.
                scope = {**scope, "method": "GET"}
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if route.allow:
            refusal: InvalidURLError | MethodNotAllowedError = MethodNotAllowedError.for_route(
                method, path, route.allow
            )
        else:
            refusal = InvalidURLError(method, path)
        await send_error(send, scope, refusal, close=body_pending(scope))
