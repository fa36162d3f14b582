"""Named API keys: ``API_KEY``'s and those of ``API_KEYS_FILE``, looked up in constant time, reloaded while serving.

The keys file is TOML, one table per key::

    [keys.alice]
    sha256 = "<hex SHA-256 of the key's UTF-8 bytes>"   # or: key = "<the key>"
    images_per_minute = 20   # optional; absent or 0 = unlimited
    weight = 1.0             # optional share of the GPU under contention
    max_queue_images = 16    # optional; default MAX_QUEUE_IMAGES_PER_KEY
    admin = false            # optional; admins see every key's queue in GET /v1/queue

``python -m sd35.keys new alice`` prints a new random key and the entry to
paste; hashed entries let the file be shared (in a repository, a ConfigMap)
without sharing the keys. ``API_KEY``'s keys are named ``default``.

The file is checked every second: a valid edit applies within that, a removed
key is refused from then on, and a file that becomes invalid (or unreadable)
keeps the last good set in force and logs an error naming the file and line.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import math
import re
import secrets
import sys
import threading
import tomllib
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_NAME = "default"
KEY_PREFIX = "sk-sd35-"
RELOAD_SECONDS = 1.0
MAX_WEIGHT = 1000.0
MAX_IMAGES_PER_MINUTE = 1_000_000

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
FIELDS = ("sha256", "key", "images_per_minute", "weight", "max_queue_images", "admin")


@dataclass(frozen=True)
class ApiKey:
    """One accepted key, known by its name; the key itself is only kept as its SHA-256."""

    name: str
    digest: bytes = field(repr=False)
    images_per_minute: int = 0
    weight: float = 1.0
    max_queue_images: int | None = None
    admin: bool = False


# The caller's key for the request in progress (None: authentication is off or
# the route is public), set by sd35.auth.BearerAuthMiddleware; the serving
# layer reads its quota from here, so no route function has to pass it along.
CURRENT_KEY: ContextVar[ApiKey | None] = ContextVar("sd35_current_key", default=None)


def digest_of(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class KeyFileError(ValueError):
    """The keys file cannot be used; the message names the file and, where it can, the line."""

    def __init__(self, path: Path | str, problem: str, line: int | None = None) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"API_KEYS_FILE {where}: {problem}")
        self.line = line


class KeyRing:
    """A set of keys; :meth:`lookup` compares a token with every key, without stopping early."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = tuple(keys)
        self._by_name: dict[str, ApiKey] = {}
        for key in self.keys:
            self._by_name.setdefault(key.name, key)

    def lookup(self, token: bytes) -> ApiKey | None:
        # Comparing SHA-256 digests, not the keys: every comparison is of 32
        # bytes whatever the token's length, and the keys need not be kept.
        presented = digest_of(token)
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found

    def get(self, name: str) -> ApiKey | None:
        """The key of this name (for API_KEY's several keys, the first: they share everything)."""
        return self._by_name.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def __len__(self) -> int:
        return len(self.keys)


def default_keys(api_keys: Iterable[str]) -> tuple[ApiKey, ...]:
    """``API_KEY``'s keys: named ``default``, no quota, admins (whoever holds them runs the server)."""
    return tuple(ApiKey(DEFAULT_NAME, digest_of(key), admin=True) for key in api_keys)


# --- the file ---------------------------------------------------------------


def _header_line(lines: list[str], name: str) -> int | None:
    quoted = re.escape(name)
    header = re.compile(rf"^\s*\[\s*keys\s*\.\s*(?:{quoted}|\"{quoted}\"|'{quoted}')\s*\]")
    return next((number for number, line in enumerate(lines, 1) if header.match(line)), None)


def _line_of(lines: list[str], name: str, field_name: str | None = None) -> int | None:
    """Where ``[keys.<name>]`` (or its ``field_name``) is written, found by reading the text again:
    tomllib reports positions only for syntax errors."""
    start = _header_line(lines, name)
    if start is None:
        # Written another way (dotted keys, an inline table): the first line that names it.
        return next((number for number, line in enumerate(lines, 1) if name in line), None)
    if field_name is None:
        return start
    assignment = re.compile(rf"^\s*[\"']?{re.escape(field_name)}[\"']?\s*=")
    for number in range(start + 1, len(lines) + 1):
        line = lines[number - 1]
        if re.match(r"^\s*\[", line):
            break
        if assignment.match(line):
            return number
    return start


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _EntryError(ValueError):
    """A problem with one entry; ``field`` names the line to point at, if any."""

    def __init__(self, problem: str, field_name: str | None = None) -> None:
        super().__init__(problem)
        self.field = field_name


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise _EntryError(
            f"the key name {name!r} is invalid: expected letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)"
        )
    if name == DEFAULT_NAME:
        raise _EntryError(f"the name {DEFAULT_NAME!r} is API_KEY's; give this key another name")


def _entry(name: str, table: Any) -> ApiKey:
    """One ``[keys.<name>]`` table as an :class:`ApiKey`; raises :class:`_EntryError`."""
    check_name(name)
    if not isinstance(table, dict):
        raise _EntryError(f"keys.{name} must be a table ([keys.{name}] followed by its fields)")
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise _EntryError(
            f"keys.{name} has an unknown field {unknown[0]!r} (expected: {', '.join(FIELDS)})", unknown[0]
        )
    if ("sha256" in table) == ("key" in table):
        raise _EntryError(f'keys.{name} needs exactly one of sha256 = "<hex SHA-256 of the key>" or key = "<the key>"')
    if "sha256" in table:
        value = table["sha256"]
        if not isinstance(value, str) or not _HEX.match(value):
            raise _EntryError(
                f"keys.{name}.sha256 must be 64 hexadecimal characters, the SHA-256 of the key "
                "(`python -m sd35.keys hash` prints it)",
                "sha256",
            )
        digest = bytes.fromhex(value)
    else:
        value = table["key"]
        if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
            raise _EntryError(f"keys.{name}.key must be a non-empty string without spaces", "key")
        digest = digest_of(value)
    per_minute = table.get("images_per_minute", 0)
    if not isinstance(per_minute, int) or isinstance(per_minute, bool) or not 0 <= per_minute <= MAX_IMAGES_PER_MINUTE:
        raise _EntryError(
            f"keys.{name}.images_per_minute must be a whole number from 0 (unlimited) to 1000000", "images_per_minute"
        )
    weight = table.get("weight", 1.0)
    if not _number(weight) or not math.isfinite(weight) or not 0 < weight <= MAX_WEIGHT:
        raise _EntryError(f"keys.{name}.weight must be a number above 0 and at most 1000", "weight")
    queue = table.get("max_queue_images")
    if queue is not None and (not isinstance(queue, int) or isinstance(queue, bool) or queue < 1):
        raise _EntryError(f"keys.{name}.max_queue_images must be a whole number ≥ 1", "max_queue_images")
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise _EntryError(f"keys.{name}.admin must be true or false", "admin")
    return ApiKey(name, digest, per_minute, float(weight), queue, admin)


def parse_keys(text: str, path: Path | str = "<keys>") -> tuple[ApiKey, ...]:
    """The keys a keys file's text names; :class:`KeyFileError` for anything wrong."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "(at line L, column C)", or "(at end of document)"
        message = str(exc)
        problem = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message)
        found = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if found is not None:
            raise KeyFileError(path, f"not valid TOML: {problem} (column {found[2]})", int(found[1])) from None
        last = max(1, len(text.splitlines()))
        raise KeyFileError(path, f"not valid TOML: {problem} (at the end of the file)", last) from None
    lines = text.splitlines()
    unknown = sorted(set(document) - {"keys"})
    if unknown:
        written = re.compile(rf"^\s*\[?\s*{re.escape(unknown[0])}\b")
        line = next((number for number, text_line in enumerate(lines, 1) if written.match(text_line)), None)
        raise KeyFileError(path, f"unknown entry {unknown[0]!r}: the file holds only [keys.<name>] tables", line)
    tables = document.get("keys", {})
    if not isinstance(tables, dict):
        raise KeyFileError(path, "'keys' must hold tables: [keys.<name>]", _line_of(lines, "keys"))
    keys: list[ApiKey] = []
    seen: dict[bytes, str] = {}
    for name, table in tables.items():
        try:
            key = _entry(name, table)
            if key.digest in seen:
                raise _EntryError(f"keys.{name} is the same key as keys.{seen[key.digest]}; every key needs its own")
        except _EntryError as exc:
            raise KeyFileError(path, str(exc), _line_of(lines, name, exc.field)) from None
        seen[key.digest] = name
        keys.append(key)
    return tuple(keys)


def read_keys_file(path: Path) -> tuple[ApiKey, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(path, "no such file") from None
    except UnicodeDecodeError:
        raise KeyFileError(path, "not UTF-8 text") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    return parse_keys(text, path)


def key_ring(api_keys: Iterable[str], file_keys: Iterable[ApiKey], path: Path | str = "<keys>") -> KeyRing:
    """API_KEY's keys and the file's in one ring; a file key equal to an API_KEY key is an error."""
    defaults = default_keys(api_keys)
    taken = {key.digest for key in defaults}
    file_keys = tuple(file_keys)
    for key in file_keys:
        if key.digest in taken:
            raise KeyFileError(path, f"keys.{key.name} is one of API_KEY's keys; remove it from one of the two")
    return KeyRing((*defaults, *file_keys))


def _signature(path: Path) -> tuple[int, ...] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_ctime_ns, status.st_size, status.st_ino)


class KeySource:
    """The keys in force, reloaded from ``API_KEYS_FILE`` while serving; also the queue policy per key.

    One per worker process. The ring is replaced whole, so a request sees
    either the old set or the new one, never half of each.
    """

    def __init__(
        self,
        api_keys: Iterable[str] = (),
        path: Path | None = None,
        max_queue_images: int = 64,
        max_queue_images_per_key: int | None = None,
        interval: float = RELOAD_SECONDS,
    ) -> None:
        self.api_keys = tuple(api_keys)
        self.path = path
        self.max_queue_images = max_queue_images
        self.max_queue_images_per_key = max_queue_images_per_key
        self.interval = interval
        self._signature = None if path is None else _signature(path)
        self.ring = key_ring(self.api_keys, () if path is None else read_keys_file(path), path or "<keys>")
        self._failed: tuple[int, ...] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> KeySource:
        return cls(
            settings.api_keys,
            settings.api_keys_file,
            settings.max_queue_images,
            settings.max_queue_images_per_key,
        )

    @property
    def enabled(self) -> bool:
        """Authentication is on: API_KEY is set or a keys file is named (even an empty one: nobody gets in)."""
        return bool(self.api_keys) or self.path is not None

    # --- the policy the engine's queue asks ---------------------------------

    def weight(self, name: str) -> float:
        key = self.ring.get(name)
        return 1.0 if key is None else key.weight

    def queue_limit(self, name: str) -> int:
        """Most images one key may have queued: its own ``max_queue_images``, else MAX_QUEUE_IMAGES_PER_KEY,
        else half of MAX_QUEUE_IMAGES once the server has several key names (all of it with one)."""
        key = self.ring.get(name)
        if key is not None and key.max_queue_images is not None:
            limit = key.max_queue_images
        elif self.max_queue_images_per_key is not None:
            limit = self.max_queue_images_per_key
        elif len(self.ring.names) > 1:
            limit = max(1, self.max_queue_images // 2)
        else:
            limit = self.max_queue_images
        return min(limit, self.max_queue_images)

    # --- reloading ---------------------------------------------------------

    def start(self) -> None:
        """Watch the keys file in a background thread (nothing to watch without one)."""
        if self.path is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="sd35-keys", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the watcher must outlive anything a file can do
                logger.exception("checking API_KEYS_FILE failed")

    def check(self) -> bool:
        """Reload the file if it changed since the last look; True when a new set came into force."""
        assert self.path is not None
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        try:
            ring = key_ring(self.api_keys, read_keys_file(self.path), self.path)
        except KeyFileError as exc:
            if _signature(self.path) != signature:
                return False  # written while being read: look again next time
            if signature != self._failed:
                logger.error("%s; the keys loaded before stay in force", exc)
                self._failed = signature
            return False
        before = set(self.ring.names)
        self.ring, self._signature, self._failed = ring, signature, None
        after = set(ring.names)
        added, removed = sorted(after - before), sorted(before - after)
        logger.info(
            "API_KEYS_FILE %s reloaded: %d key%s (added: %s; removed: %s)",
            self.path,
            len(ring),
            "" if len(ring) == 1 else "s",
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )
        return True


# --- the command ---------------------------------------------------------------


def new_key() -> str:
    """A new random key: 256 bits, URL-safe, recognisable by its prefix (as secret scanners like)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def entry_text(name: str, key: str, images_per_minute: int = 0, weight: float = 1.0) -> str:
    lines = [f"[keys.{name}]", f'sha256 = "{digest_of(key).hex()}"']
    if images_per_minute:
        lines.append(f"images_per_minute = {images_per_minute}")
    if weight != 1.0:
        lines.append(f"weight = {weight:g}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd35.keys", description="Keys for API_KEYS_FILE.")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="print a new random key and the entry to paste into the keys file")
    new.add_argument("name", help="the key's name: letters, digits, '.', '_' or '-'")
    new.add_argument("--images-per-minute", type=int, default=0, help="quota (0 = unlimited)")
    new.add_argument("--weight", type=float, default=1.0, help="share of the GPU under contention")
    commands.add_parser("hash", help="print the sha256 entry value of a key read from standard input")
    check = commands.add_parser("check", help="validate a keys file (exit status 1 and the problem if invalid)")
    check.add_argument("file", type=Path)
    args = parser.parse_args(argv)

    if args.command == "new":
        try:
            _entry(args.name, {"key": "x", "images_per_minute": args.images_per_minute, "weight": args.weight})
        except _EntryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        key = new_key()
        print(f"key (give it to {args.name}; it is not stored anywhere): {key}\n")
        print("entry for the keys file:\n")
        print(entry_text(args.name, key, args.images_per_minute, args.weight), end="")
        return 0
    if args.command == "hash":
        key = sys.stdin.readline().strip()
        if not key:
            print("error: no key on standard input", file=sys.stderr)
            return 2
        print(digest_of(key).hex())
        return 0
    try:
        keys = read_keys_file(args.file)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: {len(keys)} key{'' if len(keys) == 1 else 's'}: {', '.join(k.name for k in keys) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
