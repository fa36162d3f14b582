"""OpenAI's models routes: the base model and every LoRA adapter served as a model."""

from __future__ import annotations

from fastapi import APIRouter

from sd35.api.deps import Serving
from sd35.api.openapi import ERRORS
from sd35.protocol import ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
async def list_models(serving: Serving) -> ModelList:
    return serving.models()
