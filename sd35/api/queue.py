"""``GET /v1/queue``: the queue per API key name, without secrets (an sd35 extension).

It needs a key like every ``/v1`` route. An admin key (``admin = true`` in
API_KEYS_FILE, and API_KEY's keys) sees every key; any other key sees its own
line only, so key names do not leak between tenants. With authentication off
everything is shown, as everything is open.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from sd35.api.deps import Serving
from sd35.api.openapi import ERRORS, STARTING
from sd35.keys import CURRENT_KEY
from sd35.serving import ImageServing

router = APIRouter(tags=["queue"])


class KeyQueueView(BaseModel):
    name: str = Field(description="The key's name (`-` with authentication off); never the key.")
    weight: float = Field(description="Its share of the GPU under contention.")
    queued_images: int = Field(description="Images waiting on this worker.")
    queued_requests: int
    running_images: int = Field(description="Images in the pipeline call running now on this worker.")
    max_queue_images: int = Field(description="Most images it may have queued at once.")
    images_per_minute: int | None = Field(default=None, description="Its quota, if it has one.")
    remaining_images: int | None = Field(
        default=None, description="Images it may still ask for now under its quota (for the whole server)."
    )


class QueueView(BaseModel):
    object: Literal["queue"] = "queue"
    worker: int = Field(description="The worker that answered: each worker (GPU) has its own queue.")
    policy: Literal["fair", "fifo"] = Field(description="QUEUE_POLICY.")
    queued_images: int = Field(description="Images waiting on this worker, every key together.")
    max_queue_images: int
    keys: list[KeyQueueView]


def queue_view(serving: ImageServing) -> QueueView:
    caller = CURRENT_KEY.get()
    engine, ring = serving.engine, serving.keys.ring
    lines = {line.key: line for line in engine.queues()}
    # Every configured name, idle ones too, then whoever else has work here (a key removed since it queued).
    names = list(dict.fromkeys([*ring.names, *lines]))
    if caller is not None and not caller.admin:
        names = [caller.name]
    keys = []
    for name in names:
        line, key = lines.get(name), ring.get(name)
        quota = key.images_per_minute if key is not None else 0
        keys.append(
            KeyQueueView(
                name=name,
                weight=serving.keys.weight(name),
                queued_images=line.queued_images if line else 0,
                queued_requests=line.queued_requests if line else 0,
                running_images=line.running_images if line else 0,
                max_queue_images=serving.keys.queue_limit(name),
                images_per_minute=quota or None,
                remaining_images=serving.quotas.peek(name, quota).remaining if quota else None,
            )
        )
    return QueueView(
        worker=engine.worker_index,
        policy=serving.settings.queue_policy,  # type: ignore[arg-type]
        queued_images=engine.queued_images,
        max_queue_images=serving.settings.max_queue_images,
        keys=keys,
    )


@router.get(
    "/v1/queue",
    response_model=QueueView,
    response_model_exclude_none=True,
    responses={401: ERRORS[401], **STARTING},
    summary="The queue per API key name (sd35 extension; admins see every key, others their own)",
)
async def get_queue(serving: Serving) -> QueueView:
    return queue_view(serving)
