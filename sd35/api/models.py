"""OpenAI's models routes: the base model and every LoRA adapter served as a model."""

from __future__ import annotations

from fastapi import APIRouter

from sd35.api.deps import Serving
from sd35.api.openapi import ERRORS, STARTING
from sd35.protocol import ErrorResponse, ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401], **STARTING})
async def list_models(serving: Serving) -> ModelList:
    return serving.models()


# `:path`: the base model's id is a Hugging Face id with a slash in it
# (stabilityai/stable-diffusion-3.5-large-turbo), as the SDKs send it.
@router.get(
    "/v1/models/{model:path}",
    response_model=ModelCard,
    responses={
        401: ERRORS[401],
        404: {"model": ErrorResponse, "description": "Not a model served here (`model_not_found`)."},
        **STARTING,
    },
    summary="Retrieve one model: the base model or an adapter",
)
async def retrieve_model(model: str, serving: Serving) -> ModelCard:
    return serving.model(model)
