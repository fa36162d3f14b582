"""What route functions share: the serving layer as a dependency, and where clients reach the service."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Request

from sd35.errors import ModelNotLoadedError
from sd35.serving import ImageServing


def get_serving(request: Request) -> ImageServing:
    serving: ImageServing | None = getattr(request.app.state, "serving", None)
    if serving is None:
        raise ModelNotLoadedError("The service is starting.", retry_after=5)
    return serving


Serving = Annotated[ImageServing, Depends(get_serving)]

_HOST_RE = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~\-]+)*$")


def _first(value: str | None) -> str | None:
    return value.split(",")[0].strip() if value else None


def public_base_url(request: Request, configured: str | None) -> str:
    """Where clients reach this service: PUBLIC_BASE_URL, else what the proxy forwarded, else the Host header."""
    if configured:
        return configured
    headers = request.headers
    forwarded: dict[str, str] = {}
    for pair in (_first(headers.get("forwarded")) or "").split(";"):
        key, _, value = pair.partition("=")
        forwarded[key.strip().lower()] = value.strip().strip('"')
    scheme = forwarded.get("proto") or _first(headers.get("x-forwarded-proto")) or request.url.scheme
    host = forwarded.get("host") or _first(headers.get("x-forwarded-host")) or headers.get("host", "")
    prefix = (_first(headers.get("x-forwarded-prefix")) or "").rstrip("/")
    # Header values end up in URLs handed to clients: take only well-formed ones.
    if scheme not in ("http", "https"):
        scheme = request.url.scheme
    if not _HOST_RE.match(host):
        host = headers.get("host", "") if _HOST_RE.match(headers.get("host", "")) else request.url.netloc
    if not _PREFIX_RE.match(prefix):
        prefix = ""
    return f"{scheme}://{host}{prefix}"
