"""Every environment variable the service reads, parsed and validated once at start.

A bad value raises :class:`ConfigError` whose message is one line naming the
variable, so ``bentoml serve`` stops with something a person can act on instead
of failing later inside a request.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-3.5-large-turbo"
# OpenAI's own bound on n; MAX_IMAGES_PER_REQUEST may be set up to it.
MAX_IMAGES_PER_REQUEST_LIMIT = 10

T = TypeVar("T")

# sd35.engine.memory describes each; auto picks the best that fits the GPU.
MEMORY_MODES = ("auto", "full", "fp8", "int8", "nf4", "nf4_no_t5", "no_t5", "cpu_offload")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """An environment variable has a value the service cannot run with."""


@dataclass(frozen=True)
class ModelDefaults:
    """Sampling defaults published for a model family."""

    num_inference_steps: int
    guidance_scale: float


# The non-turbo SD3.5 checkpoints were trained for classifier-free guidance and
# many steps; Turbo (and anything unknown, such as a local directory) is
# distilled for 4 steps without guidance.
_PUBLISHED_DEFAULTS: dict[str, ModelDefaults] = {
    "stabilityai/stable-diffusion-3.5-large": ModelDefaults(28, 3.5),
    "stabilityai/stable-diffusion-3.5-medium": ModelDefaults(40, 4.5),
}
_TURBO_DEFAULTS = ModelDefaults(4, 0.0)


def published_defaults(model_id: str) -> ModelDefaults:
    """Steps and guidance the model's authors recommend (Turbo's when unknown)."""
    return _PUBLISHED_DEFAULTS.get(model_id.strip().rstrip("/").lower(), _TURBO_DEFAULTS)


@dataclass(frozen=True)
class AdapterSpec:
    """One ``LORA_ADAPTERS`` entry: served as the model ``name``."""

    name: str
    # A local directory, or a Hugging Face repo id.
    source: str
    # The weights file inside ``source``; None lets diffusers find it.
    weight_name: str | None = None
    scale: float = 1.0

    @property
    def location(self) -> str:
        """Where the weights come from, as a person wrote it."""
        return self.source if self.weight_name is None else f"{self.source.rstrip('/')}/{self.weight_name}"


@dataclass(frozen=True)
class Settings:
    model_id: str = DEFAULT_MODEL_ID
    hf_token: str | None = field(default=None, repr=False)
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Named keys with quotas and weights (sd35.keys), reloaded while serving.
    api_keys_file: Path | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    enable_cache_dit: bool = False
    default_num_inference_steps: int = 4
    default_guidance_scale: float = 0.0
    device: str = "auto"
    max_queue_images: int = 64
    # None: all of MAX_QUEUE_IMAGES with one key name, half of it with several (sd35.keys.KeySource.queue_limit).
    max_queue_images_per_key: int | None = None
    # "fair": per-key queues served by least weighted service; "fifo": one queue in arrival order.
    queue_policy: str = "fair"
    max_batch_images: int = 8
    # The cap on a request's n (OpenAI allows 1-10); larger n runs as several batches.
    max_images_per_request: int = 4
    request_timeout: float = 300.0
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20
    max_buffered_bytes: int = 256 << 20
    body_read_timeout: float = 30.0
    body_min_rate: float = 4096.0
    log_level: str = "INFO"
    memory_mode: str = "auto"
    torch_compile: str = "off"
    vae_channels_last: bool = False
    # Not an environment variable: the memory plan turns it on when a full
    # batch decoded at once would not fit (see sd35.engine.memory).
    vae_slicing: bool = False
    warmup: bool = True
    workers: int = 1
    cors_allow_origins: tuple[str, ...] = ()
    shutdown_grace_seconds: float = 5.0
    public_base_url: str | None = None
    image_store: str = "local"
    image_store_dir: Path = field(default_factory=lambda: Path("~/.cache/sd35/images").expanduser())
    image_ttl_seconds: float = 3600.0
    image_store_max_bytes: int = 2 << 30
    image_store_s3_bucket: str | None = None
    image_store_s3_prefix: str = "sd35/"
    image_store_s3_endpoint_url: str | None = None
    image_store_timeout: float = 20.0
    lora_adapters: tuple[AdapterSpec, ...] = ()

    @property
    def auth_enabled(self) -> bool:
        # A keys file turns authentication on even while it names no key: nobody gets in, rather than everybody.
        return bool(self.api_keys) or self.api_keys_file is not None

    def summary(self) -> str:
        """The settings worth a start-up log line; never a key or a token."""
        sources = [f"{len(self.api_keys)} key{'s' if len(self.api_keys) > 1 else ''}"] if self.api_keys else []
        if self.api_keys_file is not None:
            sources.append(f"API_KEYS_FILE={self.api_keys_file}")
        auth = f"on ({', '.join(sources)})" if sources else "off"
        return (
            f"model={self.model_id} device={self.device} auth={auth} hf_token={'set' if self.hf_token else 'unset'} "
            f"cache_dit={self.enable_cache_dit} steps={self.default_num_inference_steps} "
            f"guidance={self.default_guidance_scale} max_batch_images={self.max_batch_images} "
            f"max_images_per_request={self.max_images_per_request} "
            f"max_queue_images={self.max_queue_images} queue_policy={self.queue_policy} "
            f"request_timeout={self.request_timeout:g}s "
            f"memory_mode={self.memory_mode} torch_compile={self.torch_compile} "
            f"vae_channels_last={self.vae_channels_last} warmup={self.warmup} workers={self.workers} "
            f"lora_adapters={','.join(a.name for a in self.lora_adapters) or 'none'}"
        )

    @property
    def served_model_name(self) -> str:
        """The id `/v1/models` reports: a hub id as is, a local directory by its name."""
        path = Path(self.model_id)
        return path.name if path.is_dir() else self.model_id

    def adapter(self, name: str | None) -> AdapterSpec | None:
        """The adapter a request's ``model`` names; None means the base model."""
        return next((a for a in self.lora_adapters if a.name == name), None)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _parse(env: Mapping[str, str], name: str, default: T, parse: Callable[[str], T], expect: str) -> T:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"{name}={raw!r} is invalid: expected {expect}") from None


def _bounded(kind: Callable[[str], T], low: float, high: float) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = kind(raw)
        if not low <= value <= high:  # type: ignore[operator]
            raise ValueError
        return value

    return parse


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError


def _host(raw: str) -> str:
    if raw == "localhost":
        return raw
    ipaddress.ip_address(raw)
    return raw


def _device(raw: str) -> str:
    lowered = raw.lower()
    if lowered in {"auto", "cpu", "cuda"} or (lowered.startswith("cuda:") and lowered[5:].isdigit()):
        return lowered
    raise ValueError


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError
        return raw.lower()

    return parse


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError
    return level


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(origin.strip().rstrip("/") for origin in raw.split(","))
    for origin in origins:
        if origin != "*" and not (origin.startswith(("http://", "https://")) and "/" not in origin.split("://", 1)[1]):
            raise ValueError
    return origins


def _base_url(raw: str) -> str:
    url = raw.rstrip("/")
    scheme, _, rest = url.partition("://")
    if scheme not in {"http", "https"} or not rest or any(ch in rest for ch in "?#\\ "):
        raise ValueError
    return url


def _s3_prefix(raw: str) -> str:
    prefix = raw.strip("/")
    if not prefix:
        # The expiry sweep deletes under the prefix: never at the bucket's root.
        raise ValueError
    return f"{prefix}/"


def _keys_file(raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ValueError
    return path


def _api_keys(raw: str) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in raw.split(","))
    if any(not key or any(ch.isspace() for ch in key) for key in keys):
        raise ValueError
    return keys


MAX_LORA_SCALE = 2.0
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LORA_SYNTAX = "name=source[@scale], comma-separated"


def _adapter(entry: str) -> AdapterSpec:
    """``name=source[@scale]``: source is a local directory or ``.safetensors`` file, or a hub repo id
    ``owner/repo`` optionally followed by ``/path/to/weights.safetensors``; ``@scale`` (0-2) is its default scale."""
    name, equals, source = (part.strip() for part in entry.partition("="))
    if not equals or not name or not source:
        raise ConfigError(f"LORA_ADAPTERS entry {entry.strip()!r} is invalid: expected {LORA_SYNTAX}")
    if not _ADAPTER_NAME.match(name):
        raise ConfigError(
            f"LORA_ADAPTERS: adapter name {name!r} is invalid: expected letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)"
        )
    scale = 1.0
    if "@" in source:
        source, _, raw_scale = (part.strip() for part in source.rpartition("@"))
        try:
            scale = float(raw_scale)
        except ValueError:
            scale = -1.0
        if not 0 <= scale <= MAX_LORA_SCALE:
            raise ConfigError(
                f"LORA_ADAPTERS: adapter {name!r} has scale {raw_scale!r}: expected a number from 0 to 2 after '@'"
            )
    path = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~")) or path.exists():
        if not path.exists():
            raise ConfigError(f"LORA_ADAPTERS: adapter {name!r}: {source} does not exist (no such file or directory)")
        if path.is_file():
            return AdapterSpec(name, str(path.parent), path.name, scale)
        return AdapterSpec(name, str(path), None, scale)
    parts = source.split("/")
    if len(parts) < 2 or not all(_HUB_PART.match(part) for part in parts):
        raise ConfigError(
            f"LORA_ADAPTERS: adapter {name!r}: {source!r} is neither an existing local path nor a Hugging Face "
            "repo id (owner/repo, optionally /weights.safetensors)"
        )
    return AdapterSpec(name, "/".join(parts[:2]), "/".join(parts[2:]) or None, scale)


def _adapters(raw: str | None, base_model: str) -> tuple[AdapterSpec, ...]:
    if raw is None:
        return ()
    adapters = tuple(_adapter(entry) for entry in raw.split(",") if entry.strip())
    names = [adapter.name for adapter in adapters]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"LORA_ADAPTERS: the name {name!r} is used twice; every adapter needs its own")
        if name == base_model:
            raise ConfigError(f"LORA_ADAPTERS: the name {name!r} is the base model's id; choose another")
    return adapters


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the environment (``os.environ`` by default) into validated settings."""
    env = os.environ if env is None else env
    model_id = _get(env, "MODEL_ID") or DEFAULT_MODEL_ID
    defaults = published_defaults(model_id)
    settings = Settings(
        model_id=model_id,
        hf_token=_get(env, "HF_TOKEN") or _get(env, "HUGGING_FACE_HUB_TOKEN"),
        api_keys=_parse(env, "API_KEY", (), _api_keys, "one key, or several separated by commas, without spaces"),
        host=_parse(env, "HOST", "0.0.0.0", _host, "an IP address such as 0.0.0.0, 127.0.0.1 or ::"),
        port=_parse(env, "PORT", 8000, _bounded(int, 1, 65535), "an integer port between 1 and 65535"),
        enable_cache_dit=_parse(env, "ENABLE_CACHE_DIT", False, _bool, "true or false"),
        default_num_inference_steps=_parse(
            env,
            "DEFAULT_NUM_INFERENCE_STEPS",
            defaults.num_inference_steps,
            _bounded(int, 1, 50),
            "an integer between 1 and 50",
        ),
        default_guidance_scale=_parse(
            env, "DEFAULT_GUIDANCE_SCALE", defaults.guidance_scale, _bounded(float, 0, 20), "a number between 0 and 20"
        ),
        device=_parse(env, "DEVICE", "auto", _device, "auto, cpu, cuda or cuda:N"),
        max_queue_images=_parse(env, "MAX_QUEUE_IMAGES", 64, _bounded(int, 1, 100_000), "an integer ≥ 1"),
        max_queue_images_per_key=_parse(
            env, "MAX_QUEUE_IMAGES_PER_KEY", None, _bounded(int, 1, 100_000), "an integer ≥ 1"
        ),
        queue_policy=_parse(env, "QUEUE_POLICY", "fair", _choice("fair", "fifo"), "fair or fifo"),
        api_keys_file=_parse(env, "API_KEYS_FILE", None, _keys_file, "the path of an existing keys file (TOML)"),
        max_batch_images=_parse(env, "MAX_BATCH_IMAGES", 8, _bounded(int, 1, 256), "an integer between 1 and 256"),
        max_images_per_request=_parse(
            env,
            "MAX_IMAGES_PER_REQUEST",
            4,
            _bounded(int, 1, MAX_IMAGES_PER_REQUEST_LIMIT),
            f"an integer between 1 and {MAX_IMAGES_PER_REQUEST_LIMIT} (OpenAI's range for n)",
        ),
        request_timeout=_parse(
            env, "REQUEST_TIMEOUT", 300.0, _bounded(float, 1, 86_400), "a number of seconds between 1 and 86400"
        ),
        max_body_bytes=_parse(
            env, "MAX_BODY_BYTES", 1 << 20, _bounded(int, 1024, 1 << 30), "a number of bytes between 1024 and 2**30"
        ),
        max_upload_bytes=_parse(
            env, "MAX_UPLOAD_BYTES", 64 << 20, _bounded(int, 1024, 1 << 32), "a number of bytes between 1024 and 2**32"
        ),
        max_buffered_bytes=_parse(
            env,
            "MAX_BUFFERED_BYTES",
            256 << 20,
            _bounded(int, 1 << 20, 1 << 40),
            "a number of bytes between 2**20 and 2**40",
        ),
        body_read_timeout=_parse(
            env, "BODY_READ_TIMEOUT", 30.0, _bounded(float, 0.1, 3600), "a number of seconds between 0.1 and 3600"
        ),
        body_min_rate=_parse(
            env,
            "BODY_MIN_RATE",
            4096.0,
            _bounded(float, 0, 1 << 30),
            "a number of bytes per second between 0 (no minimum) and 2**30",
        ),
        log_level=_parse(env, "LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
        memory_mode=_parse(
            env, "MEMORY_MODE", "auto", _choice(*MEMORY_MODES), ", ".join(MEMORY_MODES[:-1]) + " or " + MEMORY_MODES[-1]
        ),
        torch_compile=_parse(env, "TORCH_COMPILE", "off", _choice("off", "blocks", "full"), "off, blocks or full"),
        vae_channels_last=_parse(env, "VAE_CHANNELS_LAST", False, _bool, "true or false"),
        warmup=_parse(env, "WARMUP", True, _bool, "true or false"),
        workers=_parse(env, "WORKERS", 1, _bounded(int, 1, 64), "an integer between 1 and 64 (one per GPU)"),
        cors_allow_origins=_parse(
            env, "CORS_ALLOW_ORIGINS", (), _origins, "origins such as https://app.example.com, comma-separated, or *"
        ),
        shutdown_grace_seconds=_parse(
            env, "SHUTDOWN_GRACE_SECONDS", 5.0, _bounded(float, 0, 3600), "a number of seconds between 0 and 3600"
        ),
        lora_adapters=_adapters(_get(env, "LORA_ADAPTERS"), Settings(model_id=model_id).served_model_name),
        **_image_store_settings(env),
    )
    # Only when set: the default cap (4) stays valid beside a smaller queue, whose own 400 names MAX_QUEUE_IMAGES.
    if _get(env, "MAX_IMAGES_PER_REQUEST") and settings.max_images_per_request > settings.max_queue_images:
        raise ConfigError(
            f"MAX_IMAGES_PER_REQUEST={settings.max_images_per_request} is invalid: expected at most MAX_QUEUE_IMAGES "
            f"({settings.max_queue_images}), or a request for that many images could never be queued"
        )
    per_key = settings.max_queue_images_per_key
    if per_key is not None and per_key > settings.max_queue_images:
        raise ConfigError(
            f"MAX_QUEUE_IMAGES_PER_KEY={per_key} is invalid: expected at most MAX_QUEUE_IMAGES "
            f"({settings.max_queue_images}), the whole queue"
        )
    if settings.api_keys_file is not None:
        _check_keys_file(settings)
    largest = max(settings.max_body_bytes, settings.max_upload_bytes)
    if settings.max_buffered_bytes < largest:
        raise ConfigError(
            f"MAX_BUFFERED_BYTES={settings.max_buffered_bytes} is invalid: expected at least the largest body accepted "
            f"({largest} bytes, MAX_UPLOAD_BYTES / MAX_BODY_BYTES), or no upload of that size could ever be read"
        )
    return settings


def _check_keys_file(settings: Settings) -> None:
    """An invalid keys file refuses the start, with the message a reload would log (file and line)."""
    from sd35.keys import KeyFileError, key_ring, read_keys_file

    assert settings.api_keys_file is not None
    try:
        key_ring(settings.api_keys, read_keys_file(settings.api_keys_file), settings.api_keys_file)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from None


def _image_store_settings(env: Mapping[str, str]) -> dict[str, object]:
    store = _parse(env, "IMAGE_STORE", "local", _choice("local", "s3"), "local or s3")
    bucket = _get(env, "IMAGE_STORE_S3_BUCKET")
    if store == "s3" and not bucket:
        raise ConfigError("IMAGE_STORE=s3 needs IMAGE_STORE_S3_BUCKET: expected the name of an existing bucket")
    return {
        "public_base_url": _parse(
            env, "PUBLIC_BASE_URL", None, _base_url, "an absolute URL such as https://images.example.com"
        ),
        "image_store": store,
        "image_store_dir": Path(_get(env, "IMAGE_STORE_DIR") or "~/.cache/sd35/images").expanduser(),
        "image_ttl_seconds": _parse(
            env, "IMAGE_TTL_SECONDS", 3600.0, _bounded(float, 1, 7 * 86400), "a number of seconds up to 604800"
        ),
        "image_store_max_bytes": _parse(
            env, "IMAGE_STORE_MAX_BYTES", 2 << 30, _bounded(int, 1 << 20, 1 << 50), "a number of bytes ≥ 1048576"
        ),
        "image_store_s3_bucket": bucket,
        "image_store_s3_prefix": _parse(
            env,
            "IMAGE_STORE_S3_PREFIX",
            "sd35/",
            _s3_prefix,
            "a key prefix such as sd35/ (not empty, not /: expired images are deleted under it, "
            "so it must not be the bucket's root)",
        ),
        "image_store_s3_endpoint_url": _parse(
            env, "IMAGE_STORE_S3_ENDPOINT_URL", None, _base_url, "an absolute URL such as http://minio:9000"
        ),
        "image_store_timeout": _parse(
            env, "IMAGE_STORE_TIMEOUT", 20.0, _bounded(float, 1, 3600), "a number of seconds between 1 and 3600"
        ),
    }
