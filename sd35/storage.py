"""Where `response_format=url` images live until they expire.

``LocalImageStore`` keeps files on disk and the service serves them from
``/v1/images/files/<name>``: capability URLs (192 random bits per name),
fetchable without the API key, gone after their lifetime, the directory capped
in bytes with the oldest evicted first. ``S3ImageStore`` puts them in an
S3-compatible bucket and hands out presigned URLs with the same lifetime, so
with several replicas any image is fetchable whichever replica made it.
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
SWEEP_SECONDS = 60


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


class LocalImageStore:
    FILES_PATH = "/v1/images/files/"

    def __init__(self, directory: Path, ttl_seconds: float, max_bytes: int) -> None:
        self.directory = directory
        self.ttl = ttl_seconds
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        # Workers share the directory, so the directory itself is the index.
        self._lock = threading.Lock()

    def put(self, data: bytes, output_format: str, base_url: str) -> str:
        name = new_name(output_format)
        # Write then rename: a reader never sees half a file.
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, self.directory / name)
        self._evict_beyond_cap()
        return f"{base_url}{self.FILES_PATH}{name}"

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

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for entry in os.scandir(self.directory):
            if entry.is_file() and NAME_RE.match(entry.name):
                with contextlib.suppress(FileNotFoundError):  # another worker deleted it
                    stat = entry.stat()
                    entries.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        return entries

    def _evict_beyond_cap(self) -> None:
        with self._lock:
            entries = sorted(self._entries())
            total = sum(size for _, size, _ in entries)
            # Oldest first; the newest (just written) always stays.
            for _, size, path in entries[:-1]:
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size

    def sweep(self) -> None:
        now = time.time()
        with self._lock:
            for mtime, _, path in self._entries():
                if now - mtime >= self.ttl:
                    path.unlink(missing_ok=True)
            for stray in self.directory.glob(".tmp-*"):
                with contextlib.suppress(FileNotFoundError):  # another worker deleted it
                    if now - stray.stat().st_mtime > 300:
                        stray.unlink(missing_ok=True)


class S3ImageStore:
    def __init__(
        self, bucket: str, prefix: str, ttl_seconds: float, endpoint_url: str | None = None, client: Any = None
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.ttl = ttl_seconds
        # Credentials and region come from the standard AWS variables and files.
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, config=Config(signature_version="s3v4", retries={"max_attempts": 3})
        )

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
        cutoff = datetime.now(UTC) - timedelta(seconds=self.ttl)
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            expired = [{"Key": item["Key"]} for item in page.get("Contents", []) if item["LastModified"] < cutoff]
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
        )
    return LocalImageStore(settings.image_store_dir, settings.image_ttl_seconds, settings.image_store_max_bytes)
