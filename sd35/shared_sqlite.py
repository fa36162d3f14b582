"""SQLite state that the worker processes of one server share (quotas, AUTOMATIC1111's global state).

BentoML gives every worker of a server one directory for its Prometheus
samples (``PROMETHEUS_MULTIPROC_DIR``), emptied at each start: a database
there lives exactly as long as the server, so none of it needs to survive a
power cut. Outside a multi-process server the state is in memory.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def multiprocess_file(name: str) -> Path | None:
    """``name`` in the workers' shared directory, or None (in memory) outside a multi-process server.

    Not ``*.db``: prometheus_client reads every ``*.db`` file of that directory.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(directory) / name if directory else None


def connect(path: Path | None) -> sqlite3.Connection:
    """A connection for any thread of this process, in autocommit (transactions are :func:`immediate`)."""
    db = sqlite3.connect(str(path) if path else ":memory:", timeout=5, isolation_level=None, check_same_thread=False)
    if path is not None:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    return db


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One read-modify-write: BEGIN IMMEDIATE makes it the only writer across every worker."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    finally:
        if db.in_transaction:  # a statement, or the COMMIT itself, failed
            db.execute("ROLLBACK")
