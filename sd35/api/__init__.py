"""The HTTP layer: one router module per surface, assembled by :func:`create_app`.

Routes only translate between HTTP and :class:`~sd35.serving.ImageServing`;
the engine never sees FastAPI.
"""

from sd35.api.app import create_app

__all__ = ["create_app"]
