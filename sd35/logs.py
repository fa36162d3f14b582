"""Log lines of the ``sd35`` package, in BentoML's format, each with its request id and the caller's key name."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from contextvars import ContextVar

# Set per request by sd35.middleware.EdgeMiddleware; "-" outside requests.
REQUEST_ID: ContextVar[str] = ContextVar("sd35_request_id", default="-")
# The name of the caller's API key (never the key), set by authentication; "-" when auth is off or the route is public.
KEY_NAME: ContextVar[str] = ContextVar("sd35_key_name", default="-")

_FORMAT = "%(asctime)s [%(levelname)s] [sd35] [req=%(request_id)s key=%(key_name)s] %(message)s"


class _RequestFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.key_name = KEY_NAME.get()
        return True


class _AccessLogFilter(logging.Filter):
    """Adds the request id and the key name to each line of BentoML's access log.

    The line is written while the response is sent, inside the request's
    context, so both are known there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:  # BentoML's lines: a format and its values
            record.msg = f"{record.msg} (req=%s,key=%s)"
            record.args = (*record.args, REQUEST_ID.get(), KEY_NAME.get())
        return True


def configure_logging(level: str) -> None:
    """Send ``sd35`` records to stderr; idempotent, as every worker imports the service."""
    logger = logging.getLogger("sd35")
    logger.setLevel(level)
    if not any(getattr(handler, "_sd35", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S%z"))
        handler.addFilter(_RequestFilter())
        handler._sd35 = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    # BentoML's root configuration would print every record a second time.
    logger.propagate = False
    access = logging.getLogger("bentoml.access")
    if not any(isinstance(existing, _AccessLogFilter) for existing in access.filters):
        access.addFilter(_AccessLogFilter())


def listening_address(host: str, port: int) -> tuple[str, int]:
    """The address this worker's server really listens on; ``(host, port)`` when it cannot be told.

    BentoML's arbiter binds the socket (``bentoml serve --host/--port``,
    ``BENTOML_PORT``, the service's ``http`` config, in that order of
    precedence) and hands each worker its file descriptor as ``--fd N``: the
    socket itself says where it listens, whichever of those won.
    """
    args = sys.argv
    fd = None
    for index, arg in enumerate(args):
        if arg == "--fd" and index + 1 < len(args):
            fd = args[index + 1]
        elif arg.startswith("--fd="):
            fd = arg.removeprefix("--fd=")
    if fd is None or not fd.isdigit():
        return host, port
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(int(fd))) as listening:
        bound = listening.getsockname()
        if isinstance(bound, tuple):
            return bound[0], bound[1]
    return host, port


def ready_line(host: str, port: int, seconds: float) -> str:
    """What a person needs once the service is ready: where to click."""
    shown = "localhost" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
    base = f"http://{shown}:{port}"
    return f"ready in {seconds:.1f} s: playground {base}/ , API docs {base}/docs , OpenAI base URL {base}/v1"
