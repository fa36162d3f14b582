"""Multipart forms of the upload routes (edits, variations): fields validated, files read within limits."""

from __future__ import annotations

from fastapi import Request
from pydantic import ValidationError as PydanticValidationError
from starlette.datastructures import UploadFile

from sd35.api.errors import validation_error
from sd35.errors import ValidationError
from sd35.protocol import ImageEditRequest, ImageVariationRequest

MAX_UPLOAD_FILES = 16


async def read_form(
    request: Request, model: type[ImageEditRequest] | type[ImageVariationRequest]
) -> tuple[ImageEditRequest | ImageVariationRequest, list[tuple[str, bytes]], bytes | None]:
    """Form fields validated by ``model``, the uploaded images (name, bytes) and the mask bytes."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ValidationError("The request body must be multipart/form-data, with the image as a file field 'image'.")
    form = await request.form(max_files=MAX_UPLOAD_FILES + 1, max_fields=100)
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    for name in ("image", "image[]", "mask"):
        if isinstance(fields.get(name), str):
            raise ValidationError(f"'{name}' must be a file upload, not a text field.", param=name.rstrip("[]"))
    try:
        parsed = model.model_validate(fields)
    except PydanticValidationError as exc:
        raise validation_error(request, exc) from None
    uploads = [value for name in ("image", "image[]") for value in form.getlist(name) if isinstance(value, UploadFile)]
    if len(uploads) > MAX_UPLOAD_FILES:
        raise ValidationError(f"At most {MAX_UPLOAD_FILES} images can be sent.", param="image")
    images = [(f"image[{i}]" if len(uploads) > 1 else "image", await upload.read()) for i, upload in enumerate(uploads)]
    mask = form.get("mask")
    mask_bytes = await mask.read() if isinstance(mask, UploadFile) else None
    return parsed, images, mask_bytes
