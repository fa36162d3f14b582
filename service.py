"""BentoML wiring for sd35: configuration, the engine, the OpenAI app, middleware. No logic here."""

from __future__ import annotations

import logging
import os
import sys

import bentoml

from sd35.api import create_app
from sd35.auth import BearerAuthMiddleware
from sd35.config import ConfigError, load_settings
from sd35.engine.loading import refuse_cpu_fallback
from sd35.engine.refusal import LoadRefusedError
from sd35.keys import KeyFileError, KeySource
from sd35.lifecycle import (
    SHUTDOWN_MARGIN_SECONDS,
    Stopping,
    bound_graceful_shutdown,
    exit_with_parent,
    on_termination,
)
from sd35.logs import configure_logging, listening_address, ready_line
from sd35.middleware import (
    BodySizeLimitMiddleware,
    BufferBudget,
    RealPath,
    RouteGate,
    adopt_bentoml_traffic_errors,
    install_edge,
)
from sd35.quotas import QuotaLedger, default_database

try:
    settings = load_settings()
    # The keys in force (API_KEY, API_KEYS_FILE reloaded while serving).
    keys = KeySource.from_settings(settings)
except (ConfigError, KeyFileError) as exc:
    sys.exit(f"sd35: configuration error: {exc}")
configure_logging(settings.log_level)
adopt_bentoml_traffic_errors()
install_edge()
bound_graceful_shutdown(settings.shutdown_grace_seconds + SHUTDOWN_MARGIN_SECONDS)
if bentoml.server_context.worker_index is not None:  # a worker, not the arbiter importing the service
    exit_with_parent()
# Set on SIGTERM: request bodies still arriving are answered 503 at once.
stopping = Stopping()
# The quotas, which all workers share.
quotas = QuotaLedger(default_database())

app = create_app()


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="sd35",
    # One worker per GPU; worker N drives GPU N-1 (see sd35.engine.loading.resolve_device).
    workers=settings.workers,
    resources={"gpu": settings.workers},
    http={"host": settings.host, "port": settings.port},
    traffic={"timeout": settings.request_timeout + 30},
)
class SD35:
    """Stable Diffusion 3.5 behind the OpenAI Images API."""

    def __init__(self) -> None:
        from sd35.engine import GenerationEngine
        from sd35.serving import ImageServing
        from sd35.storage import Sweeper, make_image_store

        host, port = listening_address(settings.host, int(os.environ.get("BENTOML_PORT") or settings.port))
        self.engine = GenerationEngine(
            settings,
            worker_index=bentoml.server_context.worker_index or 1,
            on_ready=lambda seconds: logging.getLogger("sd35").info(ready_line(host, port, seconds)),
            policy=keys,
        )
        self.engine.start()
        keys.start()
        store = make_image_store(settings)
        self.sweeper = Sweeper(store)
        self.sweeper.start()
        self.serving = ImageServing(settings, self.engine, store, quotas, keys)
        app.state.serving = self.serving
        on_termination(self.terminate)

    @bentoml.on_deployment
    def refuse_without_gpu() -> None:
        """The real model on a machine without a visible GPU stops `bentoml serve` before any worker starts.

        A hook, not module code: `bentoml build` imports this module too, on build hosts without GPUs.
        """
        try:
            refuse_cpu_fallback(settings)
        except LoadRefusedError as exc:
            sys.exit(f"sd35: refusing to start: {exc}")

    def terminate(self) -> None:
        stopping.set()
        self.engine.drain(settings.shutdown_grace_seconds)

    def __is_ready__(self) -> bool:
        return self.engine.ready

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.engine.close(wait_seconds=settings.shutdown_grace_seconds)
        self.serving.close()
        self.sweeper.stop()
        keys.stop()
        quotas.close()


# The first added is the outermost (sd35.middleware lists the whole stack,
# BentoML's layers included): the real path back from the route templates
# BentoML's metrics saw; CORS answers preflights and decorates every reply
# (401s too); then the route, then the key are decided on the request line and
# headers, and only then is a body read.
SD35.add_asgi_middleware(RealPath)
if settings.cors_allow_origins:
    from starlette.middleware.cors import CORSMiddleware

    SD35.add_asgi_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_allow_origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["authorization", "content-type"],
        expose_headers=[
            "x-request-id",
            "openai-processing-ms",
            "retry-after",
            "retry-after-ms",
            "x-should-retry",
            "x-ratelimit-limit-images",
            "x-ratelimit-remaining-images",
            "x-ratelimit-reset-images",
        ],
        max_age=600,
    )
SD35.add_asgi_middleware(RouteGate)
SD35.add_asgi_middleware(BearerAuthMiddleware, keys=keys, quotas=quotas)
SD35.add_asgi_middleware(
    BodySizeLimitMiddleware,
    max_body_bytes=settings.max_body_bytes,
    max_upload_bytes=settings.max_upload_bytes,
    # AUTOMATIC1111 sends its input images base64 inside the JSON body of img2img.
    upload_paths=("/v1/images/edits", "/v1/images/variations", "/sdapi/v1/img2img"),
    read_timeout=settings.body_read_timeout,
    min_rate=settings.body_min_rate,
    budget=BufferBudget(settings.max_buffered_bytes),
    stopping=stopping,
)
