"""Prometheus metrics for operators, served on ``/metrics`` beside BentoML's own.

BentoML runs its workers with ``PROMETHEUS_MULTIPROC_DIR`` set and aggregates
every worker's samples on ``/metrics``; gauges therefore say how to combine
workers (``livesum``: the sum over the workers that are alive).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_IMAGES = Gauge(
    "sd35_queue_images", "Images waiting for the GPU worker (not yet running).", multiprocess_mode="livesum"
)
BUFFERED_BYTES = Gauge(
    "sd35_buffered_body_bytes",
    "Bytes of request bodies held by requests in progress (capped per worker by MAX_BUFFERED_BYTES).",
    multiprocess_mode="livesum",
)
MODEL_LOADED = Gauge("sd35_model_loaded", "Workers whose model is loaded and warmed up.", multiprocess_mode="livesum")
BATCH_IMAGES = Histogram(
    "sd35_batch_images", "Images per pipeline call (batching merges requests).", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32)
)
IMAGES_GENERATED = Counter(
    "sd35_images_generated",
    "Images generated and handed to clients, by model (the base model's id or a LoRA adapter's name).",
    ["model"],
)
GENERATION_SECONDS = Histogram(
    "sd35_generation_seconds",
    "Seconds per pipeline call (one batch).",
    buckets=(0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60),
)
ERRORS = Counter("sd35_errors", "Error responses by error code (OpenAI's codes, on every surface).", ["code"])

# Per API key, by its name (never the key): names come from API_KEY ("default")
# and API_KEYS_FILE, or "-" with authentication off, so the label stays bounded.
KEY_QUEUE_IMAGES = Gauge(
    "sd35_key_queue_images", "Images waiting for the GPU, by API key name.", ["key"], multiprocess_mode="livesum"
)
KEY_IMAGES = Counter("sd35_key_images", "Images generated, by API key name.", ["key"])
KEY_GPU_SECONDS = Counter(
    "sd35_key_gpu_seconds",
    "Seconds of pipeline calls spent on each API key's requests (a call shared by several keys is split by cost).",
    ["key"],
)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
KEY_QUEUE_WAIT = Histogram(
    "sd35_key_queue_wait_seconds",
    "Seconds a request waited in the queue before its pipeline call began, by API key name.",
    ["key"],
    buckets=_WAIT_BUCKETS,
)
KEY_REQUEST_SECONDS = Histogram(
    "sd35_key_request_seconds",
    "Seconds per image request (queue, generation, encoding), by API key name.",
    ["key"],
    buckets=_WAIT_BUCKETS,
)
KEY_REJECTED = Counter(
    "sd35_key_rejected",
    "Requests refused with 429, by API key name and code (rate_limit_exceeded: over its quota; queue_full).",
    ["key", "code"],
)
