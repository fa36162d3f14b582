"""Images returned as URLs: fetched without the API key, the unguessable name being the credential."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from sd35.api.deps import Serving
from sd35.errors import NotFoundError
from sd35.protocol import ErrorResponse

router = APIRouter(tags=["images"])


@router.get(
    "/v1/images/files/{name}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "The image."},
        404: {"model": ErrorResponse, "description": "Unknown, malformed or expired (`not_found`)."},
    },
    summary="Fetch an image returned as a URL (no API key: the URL is the credential)",
)
async def image_file(name: str, serving: Serving) -> Response:
    stored = await asyncio.to_thread(serving.store.get, name)
    if stored is None:
        raise NotFoundError("No such image: it never existed, or it expired.")
    return Response(
        stored.data,
        media_type=stored.content_type,
        headers={"cache-control": f"private, max-age={stored.seconds_left}", "x-content-type-options": "nosniff"},
    )
