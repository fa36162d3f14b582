"""Log lines of the ``sd35`` package, in BentoML's format, each with its request id."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

# Set per request by sd35.middleware.RequestIdMiddleware; "-" outside requests.
REQUEST_ID: ContextVar[str] = ContextVar("sd35_request_id", default="-")
# The name of the caller's API key (never the key itself), set by
# sd35.auth.BearerAuthMiddleware; "-" when authentication is off or the route is public.
KEY_NAME: ContextVar[str] = ContextVar("sd35_key_name", default="-")

_FORMAT = "%(asctime)s [%(levelname)s] [sd35] [req=%(request_id)s key=%(key_name)s] %(message)s"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.key_name = KEY_NAME.get()
        return True


def configure_logging(level: str) -> None:
    """Send ``sd35`` records to stderr; idempotent, as every worker imports the service."""
    logger = logging.getLogger("sd35")
    logger.setLevel(level)
    if not any(getattr(handler, "_sd35", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S%z"))
        handler.addFilter(_RequestIdFilter())
        handler._sd35 = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    # BentoML's root configuration would print every record a second time.
    logger.propagate = False


def ready_line(host: str, port: int, seconds: float) -> str:
    """What a person needs once the service is ready: where to click."""
    shown = "localhost" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
    base = f"http://{shown}:{port}"
    return f"ready in {seconds:.1f} s: playground {base}/ , API docs {base}/docs , OpenAI base URL {base}/v1"
