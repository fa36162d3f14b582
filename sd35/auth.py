"""API-key authentication as a plain ASGI middleware: Bearer, and HTTP Basic for AUTOMATIC1111's API.

It is installed at the BentoML level (``add_asgi_middleware``) rather than on
the FastAPI app, because BentoML answers paths the app has no route for before
the app sees them, and those must be refused the same way.

AUTOMATIC1111's clients (Open WebUI, SillyTavern, ``webuiapi``) authenticate
with HTTP Basic (``--api-auth user:password``), so under ``/sdapi`` the
password of a Basic header is taken as the API key, whatever the user name.

Keys are named (:mod:`sd35.keys`): the caller's key name goes into the request's
context (:data:`sd35.logs.KEY_NAME` for logs and metrics, :data:`sd35.keys.CURRENT_KEY`
for its quota), and a key with a quota gets ``x-ratelimit-*-images`` headers on
every response.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable

import pybase64
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd35.errors import AuthenticationError, error_bytes, surface_of
from sd35.keys import CURRENT_KEY, ApiKey, KeyRing, KeySource
from sd35.logs import KEY_NAME
from sd35.middleware.replies import body_pending
from sd35.quotas import QuotaLedger

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


def authenticate(header: bytes | None, ring: KeyRing, basic: bool = False) -> ApiKey:
    """The key this ``Authorization`` header value presents; :class:`AuthenticationError` with the exact message.

    With ``basic``, HTTP Basic is accepted too, its password being the key.
    """
    if header is None:
        raise AuthenticationError(MISSING_HEADER)
    bad_format = BAD_FORMAT_BASIC if basic else BAD_FORMAT
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    if not token or b" " in token:
        raise AuthenticationError(bad_format)
    if basic and scheme.lower() == b"basic":
        password = _basic_password(token)
        if password is None:
            raise AuthenticationError(bad_format)
        token = password
    elif scheme.lower() != b"bearer":
        raise AuthenticationError(bad_format)
    key = ring.lookup(token)
    if key is None:
        raise AuthenticationError(WRONG_KEY)
    return key


class BearerAuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeySource | None = None,
        quotas: QuotaLedger | None = None,
        public_prefixes: Iterable[str] = PUBLIC_PREFIXES,
    ) -> None:
        self.app = app
        self.keys = keys or KeySource()
        self.quotas = quotas
        self.public_prefixes = tuple(public_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys.enabled or scope["type"] != "http" or not is_protected(scope["path"], self.public_prefixes):
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        a1111 = surface_of(scope["path"]) == "a1111"
        try:
            key = authenticate(header, self.keys.ring, basic=a1111)
        except AuthenticationError as refusal:
            status, body, headers = error_bytes(refusal, scope["path"])
            # Under /sdapi a browser then asks for a user name and password (the key), as AUTOMATIC1111 does.
            headers.append((b"www-authenticate", b'Basic realm="sd35", charset="UTF-8"' if a1111 else b"Bearer"))
            if body_pending(scope):  # refused on the headers: the body is never read, nor the connection kept
                headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        name_token, key_token = KEY_NAME.set(key.name), CURRENT_KEY.set(key)
        try:
            await self.app(scope, receive, self._with_quota_headers(key, send))
        finally:
            KEY_NAME.reset(name_token)
            CURRENT_KEY.reset(key_token)

    def _with_quota_headers(self, key: ApiKey, send: Send) -> Send:
        """``send`` that adds the key's ``x-ratelimit-*-images`` headers, as they stand when the response starts."""
        if self.quotas is None or not key.images_per_minute:
            return send
        quotas = self.quotas

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                state = quotas.peek(key.name, key.images_per_minute)
                message["headers"] = [*message.get("headers", []), *state.headers()]
            await send(message)

        return send_with_headers
