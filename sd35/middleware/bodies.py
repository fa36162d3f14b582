"""Request bodies read up front, within limits of size, time and memory, then replayed to the app.

This layer sits behind the route gate and authentication: only requests to a
real route, from a caller with the key, are buffered at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd35 import metrics
from sd35.errors import (
    APIError,
    BodyReadTimeoutError,
    ClientDisconnectedError,
    ServiceUnavailableError,
    UploadsBusyError,
    ValidationError,
)
from sd35.lifecycle import Stopping
from sd35.middleware.replies import send_error

logger = logging.getLogger(__name__)


class BufferBudget:
    """Bytes of request bodies held at once by one worker process, capped at ``limit``.

    Only the worker's event loop (one per process) touches it, so plain
    arithmetic needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def free(self) -> int:
        return self.limit - self.used

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        metrics.BUFFERED_BYTES.inc(size)
        return True

    def release(self, size: int) -> None:
        self.used -= size
        metrics.BUFFERED_BYTES.dec(size)


class _ClientGone(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The client closed the connection before its body was complete."""


class BodySizeLimitMiddleware:
    """Reads every request body up front, within limits, and replays it to the app.

    - size: over ``max_body_bytes`` (``max_upload_bytes`` on upload paths) is
      a 400, whether ``Content-Length`` says so or a chunked body grows past it;
    - time: nothing received for ``read_timeout`` seconds is a 408, and so is
      a body that trickles: it must be complete within ``read_timeout`` plus
      one second per ``min_rate`` bytes received (Apache's ``MinRate`` rule),
      so a client sending a byte now and then holds its connection for
      ``read_timeout`` seconds, not for ever;
    - memory: the bodies buffered by all requests of the process stay within
      ``budget`` (503 with ``Retry-After`` beyond it). Only bytes really
      received are counted — a declared length that would not fit now is
      refused before it is sent, but it reserves nothing, so a client that
      announces a large body and sends little of it costs one connection, not
      the budget. What is counted stays so until the request ends, as the
      parsed body lives that long;
    - shutdown: once ``stopping`` is set a body still arriving is answered 503
      at once (the engine takes no new work by then);
    - a client that leaves ends the request at once, with a reply nobody reads:
      BentoML's TimeoutMiddleware waits for a first reply, for minutes.

    Refusals close the connection, so the client cannot keep it busy.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_upload_bytes: int = 0,
        upload_paths: tuple[str, ...] = (),
        read_timeout: float = 30.0,
        min_rate: float = 0.0,
        budget: BufferBudget | None = None,
        stopping: Stopping | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_paths = upload_paths
        self.read_timeout = read_timeout
        self.min_rate = min_rate
        self.budget = budget or BufferBudget(max(max_body_bytes, max_upload_bytes))
        self.stopping = stopping or Stopping()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in self.upload_paths
        limit = self.max_upload_bytes if upload else self.max_body_bytes
        setting = "MAX_UPLOAD_BYTES" if upload else "MAX_BODY_BYTES"
        too_large = ValidationError(f"The request body is larger than the limit of {limit} bytes ({setting}).")
        header = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        declared = int(header) if header.isdigit() else 0
        if declared > limit:
            await send_error(send, scope, too_large, close=True)
            return
        reserved = 0
        try:
            try:
                if declared > self.budget.free:
                    raise self._busy()
                chunks: list[bytes] = []
                async with contextlib.aclosing(self._chunks(receive)) as body:
                    async for chunk in body:
                        if reserved + len(chunk) > limit:
                            raise too_large
                        if not self.budget.reserve(len(chunk)):
                            raise self._busy()
                        reserved += len(chunk)
                        chunks.append(chunk)
            except _ClientGone:
                gone = ClientDisconnectedError("The client left before its request body was complete.")
                await send_error(send, scope, gone, close=False)
                return
            except APIError as refusal:
                await send_error(send, scope, refusal, close=True)
                return
            # One copy of the body from here on: the app's (what is reserved).
            whole = b"".join(chunks)
            del chunks
            await self.app(scope, _replay(whole, receive), send)
        finally:
            self.budget.release(reserved)

    def _busy(self) -> UploadsBusyError:
        logger.warning(
            "refused a request body: %d bytes of bodies are being read already (MAX_BUFFERED_BYTES)", self.budget.used
        )
        return UploadsBusyError(
            f"The server is reading too many request bodies at once (MAX_BUFFERED_BYTES={self.budget.limit}); "
            "retry after the indicated delay.",
            retry_after=2,
        )

    def _too_slow(self, received: int, elapsed: float) -> BodyReadTimeoutError:
        return BodyReadTimeoutError(
            f"The request body arrived too slowly: {received} bytes in {elapsed:.0f} seconds, below "
            f"{self.min_rate:g} bytes per second after the first {self.read_timeout:g} seconds "
            "(BODY_MIN_RATE, BODY_READ_TIMEOUT)."
        )

    async def _chunks(self, receive: Receive) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive; raises when it stalls or trickles, the server stops, the client leaves."""
        stop = asyncio.ensure_future(self.stopping.wait())
        get: asyncio.Future[Message] | None = None
        started = last = time.monotonic()
        received = 0
        try:
            while True:
                stalled_at = last + self.read_timeout
                # The whole body is due by this time (never, without a minimum rate).
                due = started + self.read_timeout + received / self.min_rate if self.min_rate else float("inf")
                get = asyncio.ensure_future(receive())
                done, _ = await asyncio.wait(
                    {get, stop},
                    timeout=max(min(stalled_at, due) - time.monotonic(), 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if get not in done:
                    if stop in done:
                        raise ServiceUnavailableError.shutting_down()
                    if due < stalled_at:
                        raise self._too_slow(received, time.monotonic() - started)
                    raise BodyReadTimeoutError(
                        f"The request body stopped arriving: nothing was received for {self.read_timeout:g} seconds "
                        "(BODY_READ_TIMEOUT)."
                    )
                message = get.result()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                received += len(chunk)
                last = time.monotonic()
                yield chunk
                if not message.get("more_body", False):
                    return
        finally:
            stop.cancel()
            if get is not None:
                get.cancel()


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that first hands over the whole body, then what the client sends (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed, body
        if not replayed:
            replayed = True
            message: Message = {"type": "http.request", "body": body, "more_body": False}
            body = b""  # the app holds it now, for as long as it needs it
            return message
        return await receive()

    return replay
