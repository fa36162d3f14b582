"""Graceful shutdown: on SIGTERM, stop taking work before the server stops.

uvicorn (inside each BentoML worker) installs its own SIGTERM/SIGINT handlers
before the service starts; these are chained in front of them, so the engine
refuses new requests (503) and lets queued ones finish while uvicorn drains
open connections and exits.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType


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
