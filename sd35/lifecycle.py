"""Shutdown that always ends: on SIGTERM stop taking work, then exit within the grace plus a few seconds.

uvicorn (inside each BentoML worker) installs its own SIGTERM/SIGINT handlers
before the service starts; sd35's are chained in front of them, so the engine
refuses new requests (503) and bodies still arriving are answered at once,
while uvicorn stops listening and waits for open requests. BentoML lets
uvicorn wait for them forever, and its arbiter waits a day for a worker:
:func:`bound_graceful_shutdown` caps that wait. :func:`exit_with_parent`
makes a worker shut down the same way when the arbiter itself dies.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

# After the grace, the batch running at its end stops at its next denoising
# step and its requests are answered: this is what that may take before
# uvicorn cancels whatever is still open (a client not reading its response).
SHUTDOWN_MARGIN_SECONDS = 3.0

_PR_SET_PDEATHSIG = 1


def on_termination(callback: Callable[[], None]) -> bool:
    """Run ``callback`` on SIGTERM/SIGINT, then whatever handled them before; False off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False  # in-process test clients: no signals to catch
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(number: int, frame: FrameType | None, previous=previous) -> None:
            callback()
            if callable(previous):
                previous(number, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
                signal.raise_signal(number)

        signal.signal(signum, handler)
    return True


class Stopping:
    """A flag set once, from any thread or a signal handler, that coroutines on any event loop can await.

    No lock: a signal handler runs on the main thread between two bytecodes,
    possibly while that thread is inside this object, and would deadlock on one.
    """

    def __init__(self) -> None:
        self._set = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for loop, waiter in list(self._waiters):
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, waiter)

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (loop, waiter)
        self._waiters.add(entry)
        try:
            if not self._set:
                await waiter
        finally:
            self._waiters.discard(entry)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def bound_graceful_shutdown(seconds: float) -> None:
    """Make every uvicorn server of this process give open requests at most ``seconds`` after SIGTERM.

    BentoML starts uvicorn without ``timeout_graceful_shutdown`` unless
    ``bentoml serve --timeout-graceful-shutdown`` is given (an explicit value
    is kept): one request that never ends would keep the worker, and with it
    the GPU memory, alive. When the time is up uvicorn cancels those requests.
    """
    import uvicorn

    config: Any = uvicorn.Config
    original = getattr(config.__init__, "_sd35_original", config.__init__)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.timeout_graceful_shutdown is None:
            self.timeout_graceful_shutdown = seconds

    init._sd35_original = original  # type: ignore[attr-defined]
    config.__init__ = init


def exit_with_parent() -> bool:
    """Have the kernel send this process SIGTERM when its parent (BentoML's arbiter) dies; False where unsupported.

    A worker orphaned by a killed arbiter would otherwise serve nobody while
    holding its memory and its GPU; SIGTERM starts the ordinary bounded shutdown.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
