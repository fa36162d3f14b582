"""Per-key quotas (``images_per_minute``), shared by every worker of the server.

Each key has a leaky bucket measured in images: a request for *n* images adds
*n* to it, it drains at ``images_per_minute / 60`` images a second, and a
request that would overflow ``images_per_minute`` is refused (429
``rate_limit_exceeded``) with the seconds until it would fit. A key may thus
spend its whole minute at once, and an idle key has it all again within 60 s;
a refusal never asks to wait longer than that.

Where the buckets live: with several workers (one per GPU), BentoML gives them
all one directory for their Prometheus samples (``PROMETHEUS_MULTIPROC_DIR``,
emptied at each start); the buckets are rows of a small SQLite database there,
and each request updates its key's row in one transaction, so the quota holds
for the whole server, whichever worker answers. Without that directory (one
process: tests, benchmarks) the database is in memory.

``x-ratelimit-*-images`` response headers, as OpenAI's own ``x-ratelimit-*``:
the limit, what is left now, and when the bucket will be empty again.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sd35.errors import RateLimitError, ValidationError
from sd35.shared_sqlite import connect, immediate, multiprocess_file

WINDOW_SECONDS = 60.0
DATABASE_NAME = "sd35-quotas.sqlite3"
_EPSILON = 1e-9


@dataclass(frozen=True)
class QuotaState:
    """A key's bucket as its response headers say it."""

    limit: int
    remaining: int
    # Seconds until the bucket is empty (the whole quota available again).
    reset_seconds: float

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-ratelimit-limit-images", str(self.limit).encode()),
            (b"x-ratelimit-remaining-images", str(self.remaining).encode()),
            (b"x-ratelimit-reset-images", duration(self.reset_seconds).encode()),
        ]


def duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``0s``, ``120ms``, ``8.5s``, ``1m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def default_database() -> Path | None:
    """The database all workers of this server share, or None (in memory) outside a multi-process server."""
    return multiprocess_file(DATABASE_NAME)


class QuotaLedger:
    """The buckets of every key with a quota; safe to use from several threads and processes."""

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        # CLOCK_MONOTONIC is one clock for every process of the machine, and never jumps.
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        # Opened on first use, in the worker (the arbiter imports the service too).
        if self._db is None:
            db = connect(self.path)
            db.execute(
                "CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, level REAL NOT NULL, at REAL NOT NULL)"
            )
            self._db = db
        return self._db

    def _now(self) -> float:
        return self._clock()

    def _level(self, db: sqlite3.Connection, name: str, limit: int, now: float) -> float:
        row = db.execute("SELECT level, at FROM buckets WHERE name = ?", (name,)).fetchone()
        if row is None:
            return 0.0
        level, at = row
        return max(0.0, level - max(0.0, now - at) * limit / WINDOW_SECONDS)

    @staticmethod
    def _state(limit: int, level: float) -> QuotaState:
        return QuotaState(limit, max(0, math.floor(limit - level + _EPSILON)), level * WINDOW_SECONDS / limit)

    def take(self, name: str, limit: int, images: int, asked: str | None = None) -> QuotaState:
        """Count ``images`` against the key's quota, or raise 429 ``rate_limit_exceeded`` (nothing counted).

        ``asked`` names what was asked for in the 400 for more than a minute's images (default ``n=<images>``).
        """
        if images > limit:
            raise ValidationError(
                f"{asked or f'n={images}'} is more than this API key may generate in a minute "
                f"(images_per_minute={limit}); ask for fewer images.",
                param="n",
            )
        with self._lock, immediate(self._connection()) as db:
            now = self._now()
            level = self._level(db, name, limit, now)
            fits = level + images <= limit + _EPSILON
            if fits:
                level += images
                db.execute(
                    "INSERT INTO buckets (name, level, at) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET level = excluded.level, at = excluded.at",
                    (name, level, now),
                )
        if not fits:
            # Whole seconds, rounded up: a client retrying on time must find room.
            wait = math.ceil((level + images - limit) * WINDOW_SECONDS / limit - _EPSILON)
            remaining = self._state(limit, level).remaining
            raise RateLimitError(
                f"This API key may generate {limit} images per minute (images_per_minute); {remaining} can be "
                f"asked for now, {images} were. Retry after {wait} s.",
                retry_after=max(1, min(wait, int(WINDOW_SECONDS))),
            )
        return self._state(limit, level)

    def give_back(self, name: str, limit: int, images: int) -> None:
        """Uncount images that were never queued (the queue was full, the server not ready)."""
        with self._lock, immediate(self._connection()) as db:
            now = self._now()
            level = max(0.0, self._level(db, name, limit, now) - images)
            db.execute("UPDATE buckets SET level = ?, at = ? WHERE name = ?", (level, now, name))

    def peek(self, name: str, limit: int) -> QuotaState:
        with self._lock:
            return self._state(limit, self._level(self._connection(), name, limit, self._now()))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
