"""Bearer-key authentication as a plain ASGI middleware.

It is installed at the BentoML level (``add_asgi_middleware``) rather than on
the FastAPI app, because BentoML answers paths the app has no route for before
the app sees them, and those must be refused the same way.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from sd35.errors import AuthenticationError, error_bytes
from sd35.middleware.replies import body_pending

PROTECTED_PREFIX = "/v1"
# Images returned as URLs: the unguessable name is the credential, as with
# OpenAI's own image URLs, so that an <img> tag can load them.
PUBLIC_PREFIXES = ("/v1/images/files/",)

MISSING_HEADER = "Authorization header is required"
BAD_FORMAT = "Invalid Authorization header format. Expected 'Bearer <token>'"
WRONG_KEY = "Invalid API key"


def is_protected(path: str, public_prefixes: Iterable[str] = PUBLIC_PREFIXES) -> bool:
    """Every ``/v1`` route needs the key, except capability URLs under ``public_prefixes``."""
    if path != PROTECTED_PREFIX and not path.startswith(PROTECTED_PREFIX + "/"):
        return False
    return not any(path.startswith(prefix) for prefix in public_prefixes)


def check_authorization(header: bytes | None, keys: tuple[bytes, ...]) -> str | None:
    """The 401 message for this ``Authorization`` header value, or None when it is accepted."""
    if header is None:
        return MISSING_HEADER
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or b" " in token:
        return BAD_FORMAT
    # Compare with every key, without stopping early, so timing says nothing
    # about which key (or how much of one) matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return None if matched else WRONG_KEY


class BearerAuthMiddleware:
    def __init__(
        self, app: ASGIApp, api_keys: Iterable[str] = (), public_prefixes: Iterable[str] = PUBLIC_PREFIXES
    ) -> None:
        self.app = app
        self.keys = tuple(key.encode() for key in api_keys)
        self.public_prefixes = tuple(public_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys or scope["type"] != "http" or not is_protected(scope["path"], self.public_prefixes):
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        problem = check_authorization(header, self.keys)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, body, headers = error_bytes(AuthenticationError(problem), scope["path"])
        headers.append((b"www-authenticate", b"Bearer"))
        if body_pending(scope):  # refused on the headers: the body is never read, nor the connection kept
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
