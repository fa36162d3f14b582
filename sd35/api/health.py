"""``/health``: whether the model is loaded, and why not (always open, for probes and people)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sd35.protocol import HealthResponse
from sd35.serving import ImageServing

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse, "description": "Loading, or the load failed."}},
)
async def health(request: Request) -> JSONResponse:
    # Not the Serving dependency: before the service starts this is a 503 body, not an error.
    serving: ImageServing | None = getattr(request.app.state, "serving", None)
    if serving is None:
        body = HealthResponse(status="degraded", model_loaded=False, model="", detail="the service is starting")
    else:
        status = serving.engine.status
        body = HealthResponse(
            status="healthy" if status.loaded else "degraded",
            model_loaded=status.loaded,
            model=serving.settings.model_id,
            detail=status.detail,
            memory_mode=serving.engine.memory_mode,
            weight_bytes=serving.engine.weight_bytes if status.loaded else None,
        )
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if body.model_loaded else 503)
