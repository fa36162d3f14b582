"""Domain exceptions and the one mapping from an exception to an OpenAI error body.

Every error the service returns, from any layer (routes, ASGI middleware, the
engine), goes through :func:`error_payload`, so clients always see OpenAI's
shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

from sd35 import metrics

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    # The openai SDKs retry 5xx twice by default; for failures that a retry
    # cannot fix that would triple the GPU work, so say so explicitly.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


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


class MethodNotAllowedError(APIError):
    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"


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
    status = 500
    code = "image_store_failed"


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


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and headers for any exception; unknown ones become a bare 500."""
    if not isinstance(exc, APIError):
        # Log the details for the operator; the client gets no traceback or path.
        logger.error("unexpected error", exc_info=exc)
        exc = InternalError("The server had an unexpected error while processing the request.")
    metrics.ERRORS.labels(exc.code).inc()
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    headers = {"x-should-retry": "true" if exc.retryable else "false"}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    return exc.status, body, headers


def error_bytes(exc: BaseException) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """:func:`error_payload` encoded for a raw ASGI response."""
    status, body, headers = error_payload(exc)
    content = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    raw_headers += [(name.encode(), value.encode()) for name, value in headers.items()]
    return status, content, raw_headers
