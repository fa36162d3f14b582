"""Where `response_format=url` images live until they expire.

``LocalImageStore`` keeps files on disk and the service serves them from
``/v1/images/files/<name>``: capability URLs (192 random bits per name),
fetchable without the API key, gone after their lifetime. The directory is
capped in bytes; a full store refuses new images rather than evicting images
that have not expired, so that nobody's images vanish early because someone
else made many. ``S3ImageStore`` puts them in an S3-compatible bucket and hands
out presigned URLs with the same lifetime, so with several replicas any image
is fetchable whichever replica made it.

Either store deletes only what it made: names of its own pattern
(:data:`NAME_RE`), under its own prefix in a bucket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sd35.config import Settings
from sd35.imaging import CONTENT_TYPES

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpeg|webp)$")
# A file being written (then renamed to its name): only a crash leaves one.
_TEMPORARY_RE = re.compile(r"^\.tmp-")
SWEEP_SECONDS = 60
# Temporary files older than this are left over from a crash: the sweep deletes them.
STRAY_SECONDS = 300
# Keys listed per sweep of a bucket at most (1000 per page): a sweep ends, whatever the bucket holds.
MAX_SWEEP_PAGES = 100


class StoreFullError(Exception):
    """The store holds its cap of images that have not expired: the new one is refused."""


def new_name(output_format: str) -> str:
    """192 random bits, URL-safe, with the format's extension (clients derive the type from it)."""
    return f"{secrets.token_urlsafe(24)}.{output_format}"


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str
    seconds_left: int


class ImageStore(Protocol):
    def put(self, data: bytes, output_format: str, base_url: str) -> str:
        """Store the image; return the absolute URL a client fetches it from."""

    def get(self, name: str) -> StoredImage | None:
        """The image behind a local URL, or None when unknown, malformed or expired."""

    def sweep(self) -> None:
        """Delete what has expired."""

    def has_room(self) -> bool:
        """Whether another image may fit (checked before a `url` request uses the GPU)."""

    def describe(self) -> str:
        """The store in words, for messages: which kind, and where (never a credential)."""


class LocalImageStore:
    FILES_PATH = "/v1/images/files/"

    def __init__(self, directory: Path, ttl_seconds: float, max_bytes: int) -> None:
        self.directory = directory
        self.ttl = ttl_seconds
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        # Workers share the directory, so the directory itself is the index.
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "local directory"

    def put(self, data: bytes, output_format: str, base_url: str) -> str:
        name = new_name(output_format)
        with self._lock:
            if self._used() + len(data) > self.max_bytes:
                raise StoreFullError(
                    f"{len(data)} more bytes would pass IMAGE_STORE_MAX_BYTES={self.max_bytes} before any image expires"
                )
            # Someone may have removed the directory (a cleanup job, rm -rf): make it again.
            self.directory.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees half a file, and a failed write leaves nothing behind.
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(data)
                os.chmod(temporary, 0o644)
                os.replace(temporary, self.directory / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        return f"{base_url}{self.FILES_PATH}{name}"

    def has_room(self) -> bool:
        with self._lock:
            return self._used() < self.max_bytes

    def _used(self) -> int:
        """Bytes of images that have not expired; expired ones are deleted on the way (they need no sweep)."""
        now, used = time.time(), 0
        for mtime, size, path in self._entries():
            if now - mtime >= self.ttl:
                path.unlink(missing_ok=True)
            else:
                used += size
        return used

    def get(self, name: str) -> StoredImage | None:
        if not NAME_RE.match(name):
            return None
        path = self.directory / name
        try:
            age = time.time() - path.stat().st_mtime
            if age >= self.ttl:
                path.unlink(missing_ok=True)
                return None
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return StoredImage(data, CONTENT_TYPES[name.rsplit(".", 1)[1]], max(0, int(self.ttl - age)))

    def _entries(self, pattern: re.Pattern[str] = NAME_RE) -> list[tuple[float, int, Path]]:
        """Files of ours (by name) with their modification time and size; none when the directory is gone."""
        entries = []
        try:
            scan = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in scan:
            if pattern.match(entry.name):
                with contextlib.suppress(FileNotFoundError):  # another worker deleted it
                    stat = entry.stat()
                    entries.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        return entries

    def sweep(self) -> None:
        now = time.time()
        with self._lock:
            self._used()  # deletes what expired
            for mtime, _, stray in self._entries(_TEMPORARY_RE):
                if now - mtime > STRAY_SECONDS:
                    stray.unlink(missing_ok=True)


class S3ImageStore:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        ttl_seconds: float,
        endpoint_url: str | None = None,
        client: Any = None,
        timeout: float = 20.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        if not prefix.strip("/"):
            # The sweep deletes under the prefix: never at the bucket's root (sd35.config refuses it too).
            raise ValueError("IMAGE_STORE_S3_PREFIX must not be empty or '/'")
        self.bucket = bucket
        self.prefix = prefix
        self.ttl = ttl_seconds
        # Credentials and region come from the standard AWS variables and files. botocore
        # waits 60 s per read and retries 4 times by default: minutes for an endpoint that
        # hangs. Here one attempt and one retry, each bounded by the store's timeout.
        config = Config(
            signature_version="s3v4",
            connect_timeout=min(5.0, timeout),
            read_timeout=timeout,
            retries={"total_max_attempts": 2, "mode": "standard"},
        )
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def describe(self) -> str:
        return f"S3 bucket {self.bucket!r}"

    def has_room(self) -> bool:
        return True  # a bucket has no cap of ours: its lifecycle rules and the sweep bound it

    def put(self, data: bytes, output_format: str, base_url: str) -> str:
        key = self.prefix + new_name(output_format)
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=CONTENT_TYPES[output_format])
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(self.ttl)
        )

    def get(self, name: str) -> StoredImage | None:
        return None  # presigned URLs point at the bucket, never at this service

    def sweep(self) -> None:
        # A bucket lifecycle rule is the better tool; this keeps the bucket
        # bounded where nobody set one.
        # Only keys this store made (its name pattern, right under its prefix): the
        # bucket may hold anything else, and none of it is ours to delete.
        cutoff = datetime.now(UTC) - timedelta(seconds=self.ttl)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"MaxItems": 1000 * MAX_SWEEP_PAGES}
        )
        for page in pages:
            expired = [
                {"Key": item["Key"]}
                for item in page.get("Contents", [])
                if item["LastModified"] < cutoff and NAME_RE.match(item["Key"][len(self.prefix) :])
            ]
            if expired:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": expired, "Quiet": True})


class Sweeper:
    """Deletes expired images every minute, in the background."""

    def __init__(self, store: ImageStore, interval: float = SWEEP_SECONDS) -> None:
        self.store = store
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd35-image-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                self.store.sweep()
            except Exception as exc:  # a flaky bucket must not kill the sweeper
                logger.warning("could not delete expired images: %s", exc)
            if self._stop.wait(self.interval):
                return


def make_image_store(settings: Settings) -> ImageStore:
    if settings.image_store == "s3":
        return S3ImageStore(
            settings.image_store_s3_bucket or "",
            settings.image_store_s3_prefix,
            settings.image_ttl_seconds,
            endpoint_url=settings.image_store_s3_endpoint_url,
            timeout=settings.image_store_timeout,
        )
    return LocalImageStore(settings.image_store_dir, settings.image_ttl_seconds, settings.image_store_max_bytes)
