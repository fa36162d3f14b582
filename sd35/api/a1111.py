"""AUTOMATIC1111's web UI API under ``/sdapi/v1``: what Open WebUI, SillyTavern and ``webuiapi`` call.

Every route answers JSON in AUTOMATIC1111's shapes (``modules/api/models.py``),
describing sd35 as it is (one checkpoint, its LoRA adapters, one sampler).
Errors are AUTOMATIC1111's ``{"detail": ...}``, 422 for validation
(:mod:`sd35.api.errors`); authentication is HTTP Basic with an API key as the
password, or Bearer (:mod:`sd35.auth`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from sd35.a1111.board import Board, shared_database
from sd35.a1111.protocol import (
    A1111Error,
    ImagesResponse,
    Img2ImgRequest,
    LatentUpscalerModeItem,
    LoraItem,
    Options,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    SDVaeItem,
    Txt2ImgRequest,
    UpscalerItem,
)
from sd35.a1111.serving import A1111Serving
from sd35.api.deps import Serving
from sd35.api.disconnects import unless_disconnected
from sd35.api.openapi import RETRY_HEADERS

PREFIX = "/sdapi/v1"

router = APIRouter(prefix=PREFIX, tags=["AUTOMATIC1111"])


async def get_a1111(serving: Serving, request: Request) -> A1111Serving:
    """The worker's AUTOMATIC1111 state (options, running requests), made with its serving layer (on the event
    loop, never in a thread, so that two first requests cannot both make one)."""
    state = request.app.state
    current: A1111Serving | None = getattr(state, "a1111", None)
    if current is None or current.serving is not serving:
        if current is not None:
            current.close()
        board = Board(shared_database(serving.settings.workers), serving.engine.worker_index)
        current = state.a1111 = A1111Serving(serving, board)
    return current


A1111 = Annotated[A1111Serving, Depends(get_a1111)]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": A1111Error, "description": description}
    for status, description in {
        401: "Missing or wrong credentials: HTTP Basic with an API key as the password, or Bearer.",
        408: "The request body stopped arriving, or arrived too slowly (BODY_READ_TIMEOUT, BODY_MIN_RATE).",
        422: "Invalid request; `detail` names the field.",
        429: "The API key is over its `images_per_minute` (batch_size × n_iter images, counted once), or the queue "
        "is full; `retry-after` / `retry-after-ms` say when to retry.",
        500: "Generation failed, or the GPU ran out of memory.",
        503: "The model is loading or failed to load, too many request bodies are being read at once, or the "
        "server is shutting down.",
        504: "The request outlived REQUEST_TIMEOUT.",
    }.items()
}
for _status in (429, 503):
    ERRORS[_status]["headers"] = RETRY_HEADERS
AUTH_ONLY = {401: ERRORS[401]}
NULL = {200: {"description": "`null`, as AUTOMATIC1111 answers.", "content": {"application/json": {}}}}


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


@router.get("/options", response_model=Options, responses={**AUTH_ONLY, 503: ERRORS[503]})
async def get_options(a1111: A1111) -> Options:
    return a1111.options()


@router.post("/options", response_model=None, responses={**NULL, **AUTH_ONLY, 422: ERRORS[422]})
async def set_options(a1111: A1111, options: Annotated[dict[str, Any], Body()]) -> None:
    """Only `sd_model_checkpoint` is honoured: the base model's title, or a LoRA adapter's name, for your
    later requests (per API key). Other settings are accepted and ignored."""
    a1111.set_options(options)


@router.get("/sd-models", response_model=list[SDModelItem], responses=AUTH_ONLY)
async def sd_models(a1111: A1111) -> list[SDModelItem]:
    return a1111.sd_models()


@router.get("/loras", response_model=list[LoraItem], responses=AUTH_ONLY)
async def loras(a1111: A1111) -> list[LoraItem]:
    """The LoRA adapters (`LORA_ADAPTERS`): `<lora:NAME:WEIGHT>` in a prompt selects one."""
    return a1111.loras()


@router.get("/samplers", response_model=list[SamplerItem], responses=AUTH_ONLY)
async def samplers() -> list[SamplerItem]:
    """`Euler`: the model's flow-matching Euler scheduler. Any other `sampler_name` runs as Euler."""
    return A1111Serving.samplers()


@router.get("/schedulers", response_model=list[SchedulerItem], responses=AUTH_ONLY)
async def schedulers() -> list[SchedulerItem]:
    return A1111Serving.schedulers()


@router.get("/upscalers", response_model=list[UpscalerItem], responses=AUTH_ONLY)
async def upscalers() -> list[UpscalerItem]:
    return A1111Serving.upscalers()


@router.get("/latent-upscale-modes", response_model=list[LatentUpscalerModeItem], responses=AUTH_ONLY)
async def latent_upscale_modes() -> list[LatentUpscalerModeItem]:
    return A1111Serving.latent_upscale_modes()


@router.get("/sd-vae", response_model=list[SDVaeItem], responses=AUTH_ONLY)
async def sd_vae() -> list[SDVaeItem]:
    return A1111Serving.sd_vaes()


@router.get("/scripts", response_model=ScriptsList, responses=AUTH_ONLY)
async def scripts() -> ScriptsList:
    return A1111Serving.scripts()


@router.post("/refresh-checkpoints", response_model=None, responses={**NULL, **AUTH_ONLY})
async def refresh_checkpoints() -> None:
    """Nothing to rescan: the model and the adapters are fixed when the server starts."""


@router.get("/progress", response_model=ProgressResponse, responses={**AUTH_ONLY, 422: ERRORS[422]})
async def progress(a1111: A1111, skip_current_image: bool = False) -> ProgressResponse:
    """Your txt2img / img2img requests (per API key): the running job's steps, the jobs not yet answered."""
    return a1111.progress()


@router.post("/interrupt", responses=AUTH_ONLY)
async def interrupt(a1111: A1111) -> dict[str, Any]:
    """End your requests now: a running job at its next step, answered with what was made; queued ones unrun."""
    a1111.interrupt()
    return {}


@router.post("/skip", response_model=None, responses={**NULL, **AUTH_ONLY})
async def skip(a1111: A1111) -> None:
    """End your running job at its next step (answered with what was made); later iterations still run."""
    a1111.skip()


@router.post("/txt2img", response_model=ImagesResponse, responses=ERRORS)
async def txt2img(body: Txt2ImgRequest, request: Request, a1111: A1111) -> Response:
    return _json(await unless_disconnected(request, a1111.generate(body)))


@router.post("/img2img", response_model=ImagesResponse, responses=ERRORS)
async def img2img(body: Img2ImgRequest, request: Request, a1111: A1111) -> Response:
    return _json(await unless_disconnected(request, a1111.generate(body)))
