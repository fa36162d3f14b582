"""What AUTOMATIC1111 keeps for the whole server, shared by sd35's workers.

AUTOMATIC1111 is one process: the ``sd_model_checkpoint`` option, the running
job that ``progress`` reports and the job that ``interrupt`` / ``skip`` stop
are global there. sd35 runs one worker process per GPU, and a client's
``progress`` poll or ``interrupt`` may reach another worker than its
``txt2img``. So with several workers these live on a board all of them share:
a small SQLite database in the directory BentoML already gives every worker
(``PROMETHEUS_MULTIPROC_DIR``, emptied at each start), beside the quotas':

- ``checkpoints``: each key's ``sd_model_checkpoint``;
- ``runs``: each worker's snapshot of a key's running requests, refreshed a few
  times a second while they run, for the other workers' ``progress``;
- ``commands``: ``interrupt`` and ``skip`` as they were asked, which every
  worker applies to its own requests of that key that began before it.

With one worker (or outside a multi-process server) the board is in memory
and only the checkpoints use it.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sd35.shared_sqlite import connect, immediate, multiprocess_file

DATABASE_NAME = "sd35-a1111.sqlite3"
COMMAND_LIFETIME_SECONDS = 60.0

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _best_effort(default: T) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """For what other workers merely see: a board that fails (a full disk, a lock held too long) costs them a
    moment's view of this worker, never a request its answer."""

    def decorate(method: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(method)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return method(*args, **kwargs)
            except sqlite3.Error as error:
                logger.warning("AUTOMATIC1111 board (%s) failed: %s: %s", method.__name__, type(error).__name__, error)
                return default

        return guarded

    return decorate


@dataclass(frozen=True)
class Command:
    id: int
    # The worker it was asked of (which applied it at once).
    worker: int
    key: str
    action: str  # "interrupt" or "skip"
    # When it was asked, on CLOCK_MONOTONIC (one clock for every process of the machine).
    at: float


def shared_database(workers: int) -> Path | None:
    """The board's file when several workers share it, else None (in memory)."""
    return multiprocess_file(DATABASE_NAME) if workers > 1 else None


class Board:
    """The shared AUTOMATIC1111 state of one server; safe to use from several threads and processes."""

    def __init__(self, path: Path | None, worker: int) -> None:
        self.path = path
        self.worker = worker
        self._lock = threading.Lock()
        db = connect(path)
        db.execute("CREATE TABLE IF NOT EXISTS checkpoints (key TEXT PRIMARY KEY, title TEXT NOT NULL)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS runs (worker INTEGER NOT NULL, key TEXT NOT NULL, snapshot TEXT NOT NULL, "
            "at REAL NOT NULL, PRIMARY KEY (worker, key))"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS commands (id INTEGER PRIMARY KEY AUTOINCREMENT, worker INTEGER NOT NULL, "
            "key TEXT NOT NULL, action TEXT NOT NULL, at REAL NOT NULL)"
        )
        self._db = db

    @property
    def shared(self) -> bool:
        """Whether other workers read and write this board (else only the checkpoints matter)."""
        return self.path is not None

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- sd_model_checkpoint per key -------------------------------------------------

    def checkpoint(self, key: str) -> str | None:
        rows = self._execute("SELECT title FROM checkpoints WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_checkpoint(self, key: str, title: str) -> None:
        self._execute(
            "INSERT INTO checkpoints (key, title) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET title = excluded.title",
            (key, title),
        )

    # --- the running requests of each worker ------------------------------------------

    @_best_effort(None)
    def publish(self, snapshots: dict[str, list[dict[str, Any]]]) -> None:
        """This worker's running requests, per key, replacing what it published before."""
        now = time.monotonic()
        with self._lock, immediate(self._db) as db:
            db.execute("DELETE FROM runs WHERE worker = ?", (self.worker,))
            db.executemany(
                "INSERT INTO runs (worker, key, snapshot, at) VALUES (?, ?, ?, ?)",
                [(self.worker, key, json.dumps(runs), now) for key, runs in snapshots.items()],
            )

    @_best_effort([])
    def others(self, key: str, fresh_within: float) -> list[dict[str, Any]]:
        """The key's running requests on the other workers, as they published them lately."""
        rows = self._execute(
            "SELECT snapshot FROM runs WHERE key = ? AND worker != ? AND at >= ? ORDER BY worker",
            (key, self.worker, time.monotonic() - fresh_within),
        )
        return [run for (snapshot,) in rows for run in json.loads(snapshot)]

    # --- interrupt and skip ---------------------------------------------------------

    @_best_effort(None)
    def post(self, key: str, action: str) -> None:
        """Ask the other workers to ``interrupt`` or ``skip`` the key's requests that began before now."""
        now = time.monotonic()
        with self._lock:
            # A command matters for a moment: every worker reads the board a few times a second.
            self._db.execute("DELETE FROM commands WHERE at < ?", (now - COMMAND_LIFETIME_SECONDS,))
            self._db.execute(
                "INSERT INTO commands (worker, key, action, at) VALUES (?, ?, ?, ?)", (self.worker, key, action, now)
            )

    @_best_effort(0)
    def last_command(self) -> int:
        return self._execute("SELECT COALESCE(MAX(id), 0) FROM commands")[0][0]

    @_best_effort([])
    def commands_after(self, last: int) -> list[Command]:
        """The other workers' commands posted since command ``last``."""
        rows = self._execute(
            "SELECT id, worker, key, action, at FROM commands WHERE id > ? AND worker != ? ORDER BY id",
            (last, self.worker),
        )
        return [Command(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
