"""OpenAI's image routes: generations, edits, variations."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sd35.api.deps import Serving, public_base_url
from sd35.api.disconnects import event_stream, unless_disconnected
from sd35.api.forms import read_form
from sd35.api.openapi import BINARY, ERRORS, STREAMING, multipart_schema
from sd35.protocol import ImageEditRequest, ImageGenerationRequest, ImagesResponse, ImageVariationRequest

router = APIRouter(tags=["images"])

EDIT_FILES = {
    "image": {
        **BINARY,
        "description": "The image to edit (PNG, JPEG or WebP). Also accepted as `image[]`, "
        "several times: the first is edited.",
    },
    "mask": {
        **BINARY,
        "description": "PNG of the same size: transparent pixels (or, without alpha, white pixels) "
        "are repainted. Without it the edit is image-to-image over the whole picture.",
    },
}
VARIATION_FILES = {"image": {**BINARY, "description": "The image to vary (PNG, JPEG or WebP)."}}


def json_body(body: bytes) -> Response:
    """A JSON body built elsewhere as bytes (:mod:`sd35.responses`), sent as it is."""
    return Response(body, media_type="application/json")


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={**STREAMING, **ERRORS},
    summary="Create images from a prompt",
)
async def create_images(body: ImageGenerationRequest, request: Request, serving: Serving) -> Response:
    if body.stream:
        return event_stream(request, serving.stream(serving.params_for(body), body, "image_generation"))
    base_url = public_base_url(request, serving.settings.public_base_url)
    return json_body(await unless_disconnected(request, serving.generate(body, base_url)))


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={**STREAMING, **ERRORS},
    summary="Edit an image: image-to-image, or inpainting with a mask",
    openapi_extra=multipart_schema(ImageEditRequest, EDIT_FILES, ["image"]),
)
async def edit_images(request: Request, serving: Serving) -> Response:
    parsed, images, mask = await read_form(request, ImageEditRequest)
    if parsed.stream:
        params = await serving.decode_edit(parsed, images, mask)
        return event_stream(request, serving.stream(params, parsed, "image_edit"))
    base_url = public_base_url(request, serving.settings.public_base_url)
    return json_body(await unless_disconnected(request, serving.edit(parsed, images, mask, base_url)))


@router.post(
    "/v1/images/variations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Create variations of an image",
    openapi_extra=multipart_schema(ImageVariationRequest, VARIATION_FILES, ["image"]),
)
async def image_variations(request: Request, serving: Serving) -> Response:
    parsed, images, _ = await read_form(request, ImageVariationRequest)
    base_url = public_base_url(request, serving.settings.public_base_url)
    return json_body(await unless_disconnected(request, serving.edit(parsed, images[:1], None, base_url)))
