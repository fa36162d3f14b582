"""OpenAI image response bodies as bytes, built once.

A 1024² PNG is ~3.5 MB of base64. Going through ``str``, pydantic and a JSON
encoder copies (and scans) it several times; here the base64 bytes are spliced
into the body as they are, in one join. Base64 needs no JSON escaping; every
other value goes through :func:`json.dumps`. The shapes are those of
:class:`sd35.protocol.ImagesResponse` and :class:`sd35.protocol.ImageStreamEvent`
without their ``None`` fields.
"""

from __future__ import annotations

import json
from typing import Any

Parts = list[bytes]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def b64_item(b64: bytes) -> Parts:
    """One ``data`` entry holding an image inline."""
    return [b'{"b64_json":"', b64, b'"}']


def url_item(url: str) -> Parts:
    """One ``data`` entry pointing at a stored image."""
    return [_dumps({"url": url})]


def images_body(created: int, items: list[Parts], **fields: Any) -> bytes:
    """``{"created": …, "data": [items], **fields}``; fields that are ``None`` are left out."""
    parts = [b'{"created":', _dumps(created), b',"data":[']
    for index, item in enumerate(items):
        if index:
            parts.append(b",")
        parts += item
    parts.append(b"]")
    rest = {name: value for name, value in fields.items() if value is not None}
    if rest:
        parts += [b",", _dumps(rest)[1:-1]]
    parts.append(b"}")
    return b"".join(parts)


def event(name: str, payload: dict[str, Any], b64: bytes | None = None) -> bytes:
    """One server-sent event: ``{"type": name, "b64_json": b64, **payload}`` as its data."""
    head = _dumps({"type": name})[:-1]
    rest = _dumps(payload)[1:-1] if payload else b""
    image = [b',"b64_json":"', b64, b'"'] if b64 is not None else []
    return b"".join([b"event: ", name.encode(), b"\ndata: ", head, *image, b"," if rest else b"", rest, b"}\n\n"])
