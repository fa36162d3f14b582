"""Bearer-key authentication as a plain ASGI middleware.

It is installed at the BentoML level (``add_asgi_middleware``) rather than on
the FastAPI app, because BentoML answers paths the app has no route for before
the app sees them, and those must be refused the same way.

Keys are named (:mod:`sd35.keys`): the caller's key name goes into the request's
context (:data:`sd35.logs.KEY_NAME` for logs and metrics, :data:`sd35.keys.CURRENT_KEY`
for its quota), and a key with a quota gets ``x-ratelimit-*-images`` headers on
every response.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd35.errors import AuthenticationError, error_bytes
from sd35.keys import CURRENT_KEY, ApiKey, KeyRing, KeySource
from sd35.logs import KEY_NAME
from sd35.quotas import QuotaLedger

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


def authenticate(header: bytes | None, ring: KeyRing) -> ApiKey:
    """The key this ``Authorization`` header value presents; :class:`AuthenticationError` with the exact message."""
    if header is None:
        raise AuthenticationError(MISSING_HEADER)
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or b" " in token:
        raise AuthenticationError(BAD_FORMAT)
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
        try:
            key = authenticate(header, self.keys.ring)
        except AuthenticationError as refusal:
            status, body, headers = error_bytes(refusal)
            headers.append((b"www-authenticate", b"Bearer"))
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
