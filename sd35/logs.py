"""Log lines of the ``sd35`` package, in the same format as BentoML's own."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s [%(levelname)s] [sd35] %(message)s"


def configure_logging(level: str) -> None:
    """Send ``sd35`` records to stderr; idempotent, as every worker imports the service."""
    logger = logging.getLogger("sd35")
    logger.setLevel(level)
    if not any(getattr(handler, "_sd35", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S%z"))
        handler._sd35 = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    # BentoML's root configuration would print every record a second time.
    logger.propagate = False
