"""Error replies written straight to ASGI, in the shape of the path's API (:func:`sd35.errors.error_bytes`)."""

from __future__ import annotations

from starlette.types import Scope, Send

from sd35.errors import APIError, error_bytes


def body_pending(scope: Scope) -> bool:
    """Whether the request announced a body (which a refusal leaves unread)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


async def send_error(send: Send, scope: Scope, exc: APIError, *, close: bool) -> None:
    """Answer ``exc``; ``close``: end the connection after it (a body left unread is not worth reading)."""
    status, content, headers = error_bytes(exc, scope.get("path", ""))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
