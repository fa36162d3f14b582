"""The FastAPI app: routers, error handlers and the OpenAPI document, assembled."""

from __future__ import annotations

from fastapi import FastAPI

from sd35.api import a1111, docs, files, health, images, models, queue
from sd35.api.errors import install_error_handlers
from sd35.api.openapi import describe_as_served


def create_app() -> FastAPI:
    """The app; ``app.state.serving`` is attached when the service starts."""
    app = FastAPI(
        title="sd35 — OpenAI-compatible image generation",
        summary="Stable Diffusion 3.5 Large Turbo behind the OpenAI Images API and AUTOMATIC1111's web UI API.",
        version="1.0.0",
        # Served by sd35.api.docs from local assets instead of a CDN.
        docs_url=None,
        redoc_url=None,
    )
    for router in (images.router, files.router, models.router, queue.router, health.router, docs.router):
        app.include_router(router)
    app.include_router(a1111.router)
    docs.mount_assets(app)
    install_error_handlers(app)
    describe_as_served(app)
    return app
