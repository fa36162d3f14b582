"""API-key authentication as a plain ASGI middleware: Bearer, and HTTP Basic for AUTOMATIC1111's API.

It is installed at the BentoML level (``add_asgi_middleware``) rather than on
the FastAPI app, because BentoML answers paths the app has no route for before
the app sees them, and those must be refused the same way.

AUTOMATIC1111's clients (Open WebUI, SillyTavern, ``webuiapi``) authenticate
with HTTP Basic (``--api-auth user:password``), so under ``/sdapi`` the
password of a Basic header is taken as the API key, whatever the user name.
"""

from __future__ import annotations

import binascii
import hmac
from collections.abc import Iterable

import pybase64
from starlette.types import ASGIApp, Receive, Scope, Send

from sd35.errors import AuthenticationError, error_bytes, surface_of
from sd35.middleware.replies import body_pending

PROTECTED_PREFIXES = ("/v1", "/sdapi")
# Images returned as URLs: the unguessable name is the credential, as with
# OpenAI's own image URLs, so that an <img> tag can load them.
PUBLIC_PREFIXES = ("/v1/images/files/",)

MISSING_HEADER = "Authorization header is required"
BAD_FORMAT = "Invalid Authorization header format. Expected 'Bearer <token>'"
BAD_FORMAT_BASIC = (
    "Invalid Authorization header format. Expected 'Basic <base64 of user:api-key>' (any user name, "
    "an API key as the password) or 'Bearer <token>'"
)
WRONG_KEY = "Invalid API key"


def is_protected(path: str, public_prefixes: Iterable[str] = PUBLIC_PREFIXES) -> bool:
    """Every ``/v1`` and ``/sdapi`` route needs a key, except capability URLs under ``public_prefixes``."""
    if not any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES):
        return False
    return not any(path.startswith(prefix) for prefix in public_prefixes)


def _basic_password(credentials: bytes) -> bytes | None:
    """The password of HTTP Basic credentials (base64 of ``user:password``), or None when malformed."""
    try:
        decoded = pybase64.b64decode(credentials, validate=True)
    except (binascii.Error, ValueError):
        return None
    _, colon, password = decoded.partition(b":")
    return password if colon else None


def check_authorization(header: bytes | None, keys: tuple[bytes, ...], basic: bool = False) -> str | None:
    """The 401 message for this ``Authorization`` header value, or None when it is accepted.

    With ``basic``, HTTP Basic is accepted too, its password being the key.
    """
    if header is None:
        return MISSING_HEADER
    bad_format = BAD_FORMAT_BASIC if basic else BAD_FORMAT
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    if not token or b" " in token:
        return bad_format
    if basic and scheme.lower() == b"basic":
        password = _basic_password(token)
        if password is None:
            return bad_format
        token = password
    elif scheme.lower() != b"bearer":
        return bad_format
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
        a1111 = surface_of(scope["path"]) == "a1111"
        problem = check_authorization(header, self.keys, basic=a1111)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, body, headers = error_bytes(AuthenticationError(problem), scope["path"])
        # Under /sdapi a browser then asks for a user name and password (the key), as AUTOMATIC1111 does.
        headers.append((b"www-authenticate", b'Basic realm="sd35", charset="UTF-8"' if a1111 else b"Bearer"))
        if body_pending(scope):  # refused on the headers: the body is never read, nor the connection kept
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
