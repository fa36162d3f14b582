"""BentoML's own 429 and 504 replies, in the API's error shape."""

from __future__ import annotations

from typing import Any

from starlette.types import Receive, Scope, Send

from sd35.errors import APIError, InternalError, QueueFullError, RequestTimeoutError, error_bytes
from sd35.middleware.edge import real_path


def adopt_bentoml_traffic_errors() -> None:
    """Make BentoML's own 429 and 504 replies OpenAI-shaped (the path's shape: :func:`sd35.errors.error_bytes`).

    BentoML's traffic middlewares (``traffic.max_concurrency`` → 429,
    ``traffic.timeout`` → 504) sit outside every middleware a service can add
    and answer ``{"error": "<text>"}``, which the openai SDKs cannot parse into
    ``.code``. sd35 normally answers first (its queue gives 429s, its
    REQUEST_TIMEOUT fires before BentoML's), but operators can set those limits
    (BentoCloud's ``config_overrides``): this swaps the response class that
    BentoML's traffic module builds its replies with. The body is chosen when
    the reply is sent, as only then is the request's path known.
    """
    from bentoml._internal.server.http import traffic
    from starlette.responses import Response

    class OpenAIShapedTrafficResponse(Response):
        def __init__(self, content: Any, status_code: int = 200, **kwargs: Any) -> None:
            super().__init__(b"", status_code=status_code)
            detail = str(content.get("error", "")) if isinstance(content, dict) else ""
            message = f"{detail or 'The request failed'}."
            self.error: APIError
            if status_code == 429:
                self.error = QueueFullError(message, retry_after=1)  # traffic.max_concurrency: the server is full
            elif status_code == 504:
                self.error = RequestTimeoutError(message)
            else:
                self.error = InternalError(message)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            status, body, headers = error_bytes(self.error, real_path(scope))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    traffic.JSONResponse = OpenAIShapedTrafficResponse
