"""Work that ends when the client leaves: a queued request gives its place back, a stream stops its job."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from sd35.errors import ClientDisconnectedError

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first.

    Cancelling drops the request from the engine's queue, so a client that
    gives up frees its place instead of having its images made for nobody.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # Let the cancellation reach the engine (its queue) before answering.
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnectedError("The client closed the connection before the images were ready.")


async def _until_disconnected(request: Request, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Relay ``events``, cancelling them as soon as the client goes away, even while nothing is being sent."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            step = asyncio.ensure_future(anext(events))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        watcher.cancel()
        await events.aclose()  # type: ignore[attr-defined]


def event_stream(request: Request, events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        _until_disconnected(request, events),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
