"""Domain exceptions and the one mapping from an exception to an error body.

Every error the service returns, from any layer (routes, ASGI middleware, the
engine), goes through :func:`error_payload`, so clients always see the shape
of the API they speak (:func:`surface_of` the path): OpenAI's
``{"error": {"message", "type", "param", "code"}}`` everywhere, except under
``/sdapi`` (AUTOMATIC1111's API), where it is FastAPI's ``{"detail": "..."}``
with validation errors as 422, as AUTOMATIC1111 answers.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, ClassVar, Literal

from sd35 import metrics

logger = logging.getLogger(__name__)

# The longest retry hint sent. The openai SDKs wait as told only below a limit
# (Python: up to 60 s; Node: under 60 s, retry-after-ms first) and otherwise
# fall back to their own short backoff; a longer hint would be ignored.
MAX_RETRY_AFTER_SECONDS = 59
# The hint of a retryable 429 or 503 that names no delay of its own.
DEFAULT_RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error code."""

    status: ClassVar[int] = 500
    # None where OpenAI sends none (an unknown URL).
    code: ClassVar[str | None] = "internal_error"
    type: ClassVar[str] = "server_error"
    # The openai SDKs retry 5xx twice by default; for failures that a retry
    # cannot fix that would triple the GPU work, so say so explicitly.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if retryable is not None:
            # This one failure differs from its kind: e.g. a model that failed
            # to load is a 503 that no retry can fix.
            self.retryable = retryable


class ValidationError(APIError):
    status = 400
    code = "validation_error"
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status = 401
    code = "authentication_error"
    type = "authentication_error"


class NotFoundError(APIError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class InvalidURLError(APIError):
    """No route has this path: OpenAI's own answer, word for word, with ``code`` null."""

    status = 404
    code = None
    type = "invalid_request_error"

    def __init__(self, method: str, path: str) -> None:
        super().__init__(f"Invalid URL ({method} {path})")


class ModelNotFoundError(APIError):
    """A model that this server does not serve was looked up (OpenAI's code for it)."""

    status = 404
    code = "model_not_found"
    type = "invalid_request_error"


class MethodNotAllowedError(APIError):
    """The path is a route, but not for this method; ``allow`` lists the methods it takes."""

    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"

    def __init__(self, message: str, *, allow: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allow = allow

    @classmethod
    def for_route(cls, method: str, path: str, allow: tuple[str, ...]) -> MethodNotAllowedError:
        return cls(f"Invalid method for URL ({method} {path}): it accepts {', '.join(allow)}.", allow=allow)


class TooManyRequestsError(APIError):
    """429: slow down. The two codes tell "you, slow down" from "the server is full"."""

    status = 429
    type = "rate_limit_error"
    retryable = True


class RateLimitError(TooManyRequestsError):
    """An API key over its ``images_per_minute`` (OpenAI's code for per-minute limits)."""

    code = "rate_limit_exceeded"


class QueueFullError(TooManyRequestsError):
    """The server's queue, or the key's share of it, is full."""

    code = "queue_full"


class GPUOutOfMemoryError(APIError):
    status = 500
    code = "gpu_out_of_memory"


class GenerationFailedError(APIError):
    status = 500
    code = "generation_failed"


class ImageStoreError(APIError):
    """The image store (disk or bucket) failed or did not answer in time: an upstream of ours, hence 502."""

    status = 502
    code = "image_store_failed"


class ImageStoreFullError(APIError):
    """The local store holds IMAGE_STORE_MAX_BYTES of images that have not expired; none is evicted early."""

    status = 507
    code = "image_store_full"


class InternalError(APIError):
    status = 500
    code = "internal_error"


class ModelNotLoadedError(APIError):
    status = 503
    code = "model_not_loaded"
    retryable = True


class ServiceUnavailableError(APIError):
    """Shutting down: the request can be retried elsewhere."""

    status = 503
    code = "service_unavailable"
    retryable = True

    @classmethod
    def shutting_down(cls) -> ServiceUnavailableError:
        """The answer to new work once SIGTERM has arrived."""
        return cls(
            "The server is shutting down and takes no new requests; retry, another replica may answer.",
            retry_after=1,
        )


class ClientDisconnectedError(APIError):
    """The client went away; nobody reads this response, but logs and metrics count it."""

    status = 499
    code = "client_disconnected"
    type = "invalid_request_error"


class BodyReadTimeoutError(APIError):
    """The request body stopped arriving (BODY_READ_TIMEOUT); the connection is closed."""

    status = 408
    code = "request_timeout"
    type = "invalid_request_error"
    retryable = True


class UploadsBusyError(APIError):
    """Too many request bodies are being buffered at once (MAX_BUFFERED_BYTES)."""

    status = 503
    code = "server_busy"
    retryable = True


class RequestTimeoutError(APIError):
    status = 504
    code = "timeout"


Surface = Literal["openai", "a1111"]
A1111_PREFIX = "/sdapi"


def surface_of(path: str) -> Surface:
    """The API a request path belongs to, which decides the shape of its errors."""
    return "a1111" if path == A1111_PREFIX or path.startswith(A1111_PREFIX + "/") else "openai"


def retry_headers(exc: APIError) -> dict[str, str]:
    """``x-should-retry``, and for a retryable error a delay both openai SDKs honour.

    Every retryable 429 and 503 carries ``retry-after`` (whole seconds) and
    ``retry-after-ms``, at most :data:`MAX_RETRY_AFTER_SECONDS`: a longer wait
    (a long queue of slow jobs) is not worth more than one retry after a minute.
    A permanent failure (a model that failed to load) says ``x-should-retry:
    false`` and gives no delay.
    """
    headers = {"x-should-retry": "true" if exc.retryable else "false"}
    delay = exc.retry_after
    if delay is None and exc.retryable and exc.status in (429, 503):
        delay = DEFAULT_RETRY_AFTER_SECONDS
    if delay is not None and exc.retryable:
        seconds = min(max(delay, 0.001), MAX_RETRY_AFTER_SECONDS)
        headers["retry-after"] = str(max(1, math.ceil(seconds)))
        headers["retry-after-ms"] = str(max(1, math.ceil(seconds * 1000)))
    return headers


def error_payload(exc: BaseException, surface: Surface = "openai") -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and headers for any exception; unknown ones become a bare 500."""
    if not isinstance(exc, APIError):
        # Log the details for the operator; the client gets no traceback or path.
        logger.error("unexpected error", exc_info=exc)
        exc = InternalError("The server had an unexpected error while processing the request.")
    metrics.ERRORS.labels(exc.code or "invalid_url").inc()
    status = exc.status
    body: dict[str, Any]
    if surface == "a1111":
        body = {"detail": exc.message}
        if isinstance(exc, ValidationError):
            status = 422
    else:
        body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    headers = retry_headers(exc)
    if isinstance(exc, MethodNotAllowedError) and exc.allow:
        headers["allow"] = ", ".join(exc.allow)
    return status, body, headers


def error_bytes(exc: BaseException, path: str = "") -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The error reply for ``path``, encoded for a raw ASGI response: the one place ASGI middleware gets its bodies.

    ``path`` picks the shape (:func:`surface_of`).
    """
    status, body, headers = error_payload(exc, surface_of(path))
    content = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    raw_headers += [(name.encode(), value.encode()) for name, value in headers.items()]
    return status, content, raw_headers
