"""The browser face: API docs that work offline, and the playground page at ``/``.

FastAPI's own ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from a public
CDN, which an air-gapped GPU cluster cannot reach. The same assets come here
from the ``fastapi_offline`` package and are served by the service itself.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs-assets"
PLAYGROUND = Path(__file__).resolve().parent.parent / "static" / "playground.html"

router = APIRouter(include_in_schema=False)


def mount_assets(app: FastAPI) -> None:
    """Swagger UI's and ReDoc's files (a router cannot carry a mount)."""
    assets = resources.files("fastapi_offline") / "static"
    app.mount(ASSETS_PATH, StaticFiles(directory=str(assets)), name="docs-assets")


def _title(request: Request) -> str:
    return request.app.title


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{_title(request)} — Swagger UI",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        # No call to swagger.io's validator: the page must work offline.
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=request.app.openapi_url,
        title=f"{_title(request)} — ReDoc",
        redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
        with_google_fonts=False,
    )


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(PLAYGROUND, media_type="text/html", headers={"cache-control": "no-cache"})
