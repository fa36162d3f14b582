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
    """Relay ``events``, stopping them as soon as the client goes away, even while nothing is being sent.

    One task, the pump, is the only one ever to advance ``events``: an async
    generator advanced or closed from two tasks at once fails ("aclose():
    asynchronous generator is already running") and is left for the garbage
    collector to finish, and with it the job. When the client leaves, the pump
    is cancelled at once, from the watcher's callback, wherever this relay is
    suspended: the cancellation reaches ``events`` at its await, whose cleanup
    gives the job up (out of the queue, or its batch stopped at the next step
    when nobody else waits for it). The relay then ends quietly: nobody is
    there to read an error.
    """
    relayed: asyncio.Queue[bytes | object] = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for item in events:
                await relayed.put(item)
        await relayed.put(_END)

    pumping = asyncio.ensure_future(pump())
    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(lambda _: pumping.cancel())
    getting: asyncio.Future[bytes | object] | None = None
    try:
        while True:
            getting = asyncio.ensure_future(relayed.get())
            await asyncio.wait({getting, pumping, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getting.done():
                item = getting.result()
                if item is _END:
                    return
                yield item  # type: ignore[misc]
            elif watcher.done() or pumping.cancelled():
                return
            else:  # the pump ended without its end marker: events raised, and so does the relay
                getting.cancel()
                pumping.result()
                return
    finally:
        if getting is not None:
            getting.cancel()
        watcher.cancel()
        if not pumping.done():
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping


_END = object()


def event_stream(request: Request, events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        _until_disconnected(request, events),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
