"""The generation engine: bounded queues per API key, batching, and one worker thread that makes every pipeline call.

One engine owns one pipeline on one device. A diffusers pipeline is not
thread-safe, so a single worker thread makes every call; concurrent requests
that can share a call (same size, steps and guidance) are merged into one batch
with one seeded generator per image, so each image is the one its seed gives
alone (within ±1/255: kernels differ slightly with batch size). The worker
hands back uint8 pixels and goes straight to the next batch: encoding happens
elsewhere.

Each API key has its own queue, and the worker serves the key that has received
the least weighted service so far (:mod:`sd35.engine.fairness`); the queue is
bounded overall (``MAX_QUEUE_IMAGES``) and per key, so one key cannot fill it.
A job carries its key's name the way it carries its request id: captured from
the request's context when it is submitted, so the engine never sees HTTP.

A running batch is stopped at its next denoising step when nobody waits for it
any more (every request timed out or its client left) and when the shutdown
grace ends; its requests are then answered 503. One request can also be ended
early (:meth:`GenerationEngine.end_early`, AUTOMATIC1111's interrupt and skip):
it is answered at the next step with what was made, and its neighbours go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from sd35 import metrics
from sd35.config import Settings
from sd35.engine import loading, usage
from sd35.engine.calls import CallInterrupted, CallWatch, PipelineRunner
from sd35.engine.fairness import EqualShares, FairQueue, QueuePolicy
from sd35.engine.memory import MemoryPlan, component_bytes
from sd35.engine.params import GenerationParams
from sd35.errors import (
    APIError,
    GenerationFailedError,
    GPUOutOfMemoryError,
    ModelNotLoadedError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
    ValidationError,
)
from sd35.logs import KEY_NAME, REQUEST_ID

logger = logging.getLogger(__name__)

SHUTDOWN_REASON = "the server shut down while these images were being made; retry it, another replica may answer"
ABANDONED_REASON = "every request of the batch is gone"
ANSWERED_REASON = "every request of the batch was answered early or is gone"


@dataclass(eq=False)
class Job:
    params: GenerationParams
    request_id: str = field(default_factory=REQUEST_ID.get)
    # The API key's name, for fair queueing, limits and metrics.
    key: str = field(default_factory=KEY_NAME.get)
    queued_at: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future[list[np.ndarray]] = field(default_factory=concurrent.futures.Future)
    # Set when whoever waited gave up (timeout, client gone): a running
    # future cannot be cancelled, so the worker looks at this instead.
    abandoned: bool = False
    # Set by end_early: answer at the next step with what was made.
    end_requested: bool = False
    # Written by the worker as the job's pipeline call runs (see progress()).
    steps_done: int = 0
    steps_total: int = 0
    started: float | None = None

    @property
    def images(self) -> int:
        return self.params.num_images

    @property
    def cost(self) -> float:
        return self.params.cost()

    @property
    def batch_key(self) -> tuple[object, ...]:
        return self.params.batch_key


@dataclass(frozen=True)
class JobProgress:
    """Where a submitted job stands: queued, running (with its denoising steps) or done."""

    state: str
    steps_done: int
    steps_total: int
    # Seconds since its pipeline call began (0 while queued).
    elapsed: float
    images: int


class _Watch(CallWatch):
    """The worker's side of one call: step counts onto the jobs, early answers to the jobs that asked."""

    def __init__(self, jobs: list[Job], made: list[np.ndarray] | None = None) -> None:
        self.jobs = jobs
        # Images a job already has (made one by one): they go with the early answer.
        self.made = made or []
        started = time.monotonic()
        for job in jobs:
            job.started = started

    def on_step(self, done: int, total: int) -> None:
        for job in self.jobs:
            if not job.future.done():  # one answered early keeps the step it ended at
                job.steps_done, job.steps_total = done, total

    def ending(self) -> list[int]:
        return [i for i, job in enumerate(self.jobs) if job.end_requested and not job.future.done()]

    def deliver(self, index: int, images: list[np.ndarray]) -> None:
        job = self.jobs[index]
        logger.info("request %s: ended early after %d of %d steps", job.request_id, job.steps_done, job.steps_total)
        GenerationEngine._deliver(job, self.made + images)


def _weight_bytes(pipe: Any) -> int | None:
    components = getattr(pipe, "components", None)
    return sum(component_bytes(pipe).values()) if isinstance(components, dict) else None


@dataclass(frozen=True)
class EngineStatus:
    loaded: bool
    detail: str | None


@dataclass(frozen=True)
class KeyQueue:
    """One API key's part of the queue, as the worker sees it now."""

    key: str
    queued_images: int
    queued_requests: int
    running_images: int
    max_queue_images: int
    weight: float


class GenerationEngine:
    """Owns one pipeline; queues, batches and runs generation requests."""

    def __init__(
        self,
        settings: Settings,
        loader: Callable[[Settings, int], tuple[Any, str]] | None = None,
        worker_index: int = 1,
        on_ready: Callable[[float], None] | None = None,
        policy: QueuePolicy | None = None,
    ) -> None:
        self.settings = settings
        # Weights and queue limits per key (sd35.keys.KeySource: from API_KEYS_FILE, reloaded).
        self.policy = policy or EqualShares(settings.max_queue_images)
        self._loader = loader
        self.worker_index = worker_index
        self._on_ready = on_ready
        self.runner: PipelineRunner | None = None
        self.memory_plan: MemoryPlan | None = None
        # Bytes of weights the loaded pipeline holds, quantized ones at their stored size.
        self.weight_bytes: int | None = None
        self.device: str | None = None
        self._status = EngineStatus(False, "the model is loading")
        self._queue: FairQueue[Job] = FairQueue(self.policy.weight, fair=settings.queue_policy == "fair")
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False
        self._grace_over = threading.Event()
        self._running: list[Job] = []
        # Which keys each recent pipeline call served, as (key, images) per request, in call order;
        # bounded, for tests and benchmarks (operators read the metrics).
        self.served: deque[tuple[tuple[str, int], ...]] = deque(maxlen=1024)
        self._worker = threading.Thread(target=self._run_worker, name="sd35-generation", daemon=True)

    @property
    def pipeline(self) -> Any:
        return None if self.runner is None else self.runner.pipeline

    @pipeline.setter
    def pipeline(self, pipe: Any) -> None:
        self.runner = PipelineRunner(pipe)

    @property
    def batch_sizes(self) -> deque[int]:
        """Images per recent pipeline call (the warm-up not counted)."""
        return deque() if self.runner is None else self.runner.batch_sizes

    @property
    def steps_run(self) -> deque[int]:
        """Denoising steps each recent pipeline call ran (fewer than asked when it was interrupted)."""
        return deque() if self.runner is None else self.runner.steps_run

    # --- loading -----------------------------------------------------------

    def start(self) -> None:
        """Load the model in the background; requests get 503 until it is ready."""
        threading.Thread(target=self._load, name="sd35-loader", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        logger.info("loading the model: %s", self.settings.summary())
        if not loading.looks_like_path(self.settings.model_id):
            from huggingface_hub.constants import HF_HUB_CACHE

            logger.info(
                "weights come from the Hugging Face Hub into %s (the first start downloads ~30 GB; "
                "progress bars follow, later starts read the cache)",
                HF_HUB_CACHE,
            )
        try:
            device = loading.resolve_device(self.settings.device, self.worker_index)
            # The mode and the batch size are settled before any weight is read.
            self.settings, self.memory_plan = loading.resolve_memory(self.settings, device)
            pipe, self.device = (self._loader or loading.load_pipeline)(self.settings, self.worker_index)
            self.pipeline = pipe
            self.weight_bytes = _weight_bytes(pipe)
            if self.settings.warmup:
                self._warm_up()
        except Exception as exc:  # any failure must become a reason, never a crash loop
            reason = loading.describe_load_error(exc, self.settings)
            logger.error("model failed to load: %s", reason)
            logger.debug("load failure details", exc_info=exc)
            self._status = EngineStatus(False, f"the model failed to load: {reason}")
            return
        self._worker.start()
        self._status = EngineStatus(True, None)
        metrics.MODEL_LOADED.inc()
        seconds = time.monotonic() - started
        logger.info("model %s ready on %s in %.1f s", self.settings.model_id, self.device, seconds)
        if self._on_ready is not None:
            self._on_ready(seconds)

    def _warm_up(self) -> None:
        """Generations of the common shapes before reporting ready.

        The first call pays for CUDA kernel selection and, with TORCH_COMPILE,
        for compilation (minutes); no user request should. A compiled graph is
        first specialised to the shapes it sees, then generalised on the first
        other batch size or image size: the warm-up shows it both.
        """
        assert self.runner is not None
        started = time.monotonic()
        self._status = EngineStatus(False, "the model is loaded and warming up")
        base = GenerationParams(
            prompt="warm-up",
            width=1024,
            height=1024,
            num_images=1,
            seed=0,
            num_inference_steps=self.settings.default_num_inference_steps,
            guidance_scale=self.settings.default_guidance_scale,
        )
        shapes = [base]
        if self.settings.torch_compile != "off":
            shapes += [replace(base, num_images=2), replace(base, width=768, height=1024)]
        for params in shapes:
            self.runner([params])
        self.runner.batch_sizes.clear()
        self.runner.steps_run.clear()
        logger.info("warm-up took %.1f s (%d shapes)", time.monotonic() - started, len(shapes))

    @property
    def status(self) -> EngineStatus:
        return self._status

    @property
    def ready(self) -> bool:
        return self._status.loaded

    @property
    def memory_mode(self) -> str | None:
        """The resolved ``MEMORY_MODE`` (``auto`` decided), once the load has begun."""
        return None if self.memory_plan is None else self.memory_plan.mode.name

    # --- shutdown ----------------------------------------------------------

    def close(self, wait_seconds: float = 0) -> None:
        """Stop the worker after its current batch; wait up to ``wait_seconds`` for that batch.

        Exiting while the worker is inside torch would abort the process
        ("terminate called without an active exception") instead of exiting 0.
        """
        with self._cond:
            if self.ready and not self._closed:
                metrics.MODEL_LOADED.dec()
            self._closed = True
            self._cond.notify_all()
        if wait_seconds and self._worker.is_alive():
            self._worker.join(wait_seconds)

    def drain(self, grace_seconds: float) -> None:
        """Stop taking work; what is queued may still run for ``grace_seconds``.

        When the grace ends, queued requests are refused and the running batch
        is stopped at its next denoising step, all answered 503, so the process
        can exit within the grace whatever the batch was.
        """
        with self._cond:
            if self._draining:
                return
            self._draining = True
        logger.info("shutting down: no new requests; finishing queued work for up to %g s", grace_seconds)
        timer = threading.Timer(grace_seconds, self.end_grace)
        timer.daemon = True
        timer.start()

    def end_grace(self) -> None:
        """Refuse everything queued and interrupt the running batch (answered 503)."""
        self._grace_over.set()
        with self._cond:
            pending = self._queue.drain()
            self._publish_queue({job.key for job in pending})
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    ServiceUnavailableError("The server shut down before this request could run; retry it.")
                )

    # --- requests ----------------------------------------------------------

    async def generate(self, params: GenerationParams, timeout: float | None = None) -> list[np.ndarray]:
        """The request's images as ``(H, W, 3)`` uint8 arrays, in seed order."""
        return await self.result(self.submit(params), timeout)

    def usage(self, params: GenerationParams) -> dict[str, Any]:
        """OpenAI's ``usage`` object for a request, as the loaded pipeline counts it (:mod:`sd35.engine.usage`)."""
        return usage.usage(self.pipeline, params)

    async def result(self, job: Job, timeout: float | None = None) -> list[np.ndarray]:
        """Wait for a submitted job; giving up (timeout, cancellation) drops it from the queue or the batch."""
        timeout = self.settings.request_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
        except TimeoutError:
            job.abandoned = True
            raise RequestTimeoutError(
                f"The request did not finish within {timeout:g} seconds (REQUEST_TIMEOUT); try again later, "
                "or with fewer or smaller images."
            ) from None
        except asyncio.CancelledError:
            job.abandoned = True
            raise

    def submit(self, params: GenerationParams) -> Job:
        status = self._status
        if not status.loaded:
            failed = "failed" in (status.detail or "")
            # A failed load is permanent until the operator acts: no retry can fix it.
            raise ModelNotLoadedError(
                f"The model is not ready: {status.detail}.", retry_after=None if failed else 10, retryable=not failed
            )
        job = Job(params)
        self.check_queueable(params.num_images, job.key)
        total_limit, key_limit = self.settings.max_queue_images, self.policy.queue_limit(job.key)
        with self._cond:
            if self._closed or self._draining:
                raise ServiceUnavailableError.shutting_down()
            queued, mine = self._queue.images, self._queue.images_of(job.key)
            if queued + params.num_images > total_limit:
                raise QueueFullError(
                    f"Too many images are queued ({queued} of {total_limit}); retry after the indicated delay.",
                    retry_after=self._seconds_for(queued),
                )
            if mine + params.num_images > key_limit:
                raise QueueFullError(
                    f"This API key has {mine} images queued, and may have at most {key_limit} queued at once; "
                    "retry after the indicated delay, or wait for your earlier requests.",
                    retry_after=self._seconds_for(queued),
                )
            self._queue.push(job)
            self._publish_queue({job.key})
            self._cond.notify()
        job.future.add_done_callback(lambda future: self._forget_if_cancelled(job, future))
        return job

    def check_queueable(self, images: int, key: str) -> None:
        """A 400 for a request of ``images`` that this key could never have queued at once, not a 429 to retry
        forever. A request split into several jobs is checked whole: its jobs are queued together."""
        total_limit, key_limit = self.settings.max_queue_images, self.policy.queue_limit(key)
        if images > min(total_limit, key_limit):
            setting = (
                f"MAX_QUEUE_IMAGES={total_limit}"
                if total_limit <= key_limit
                else f"{key_limit} per API key, MAX_QUEUE_IMAGES_PER_KEY or the key's max_queue_images"
            )
            raise ValidationError(
                # Worded for every surface: an AUTOMATIC1111 caller sent batch_size, not n.
                f"{images} images in one request are more than this server queues at once ({setting}); "
                "ask for fewer images.",
                param="n",
            )

    def _seconds_for(self, images: int) -> float:
        """Roughly how long the GPU needs for this many queued images."""
        return images * (self.runner.seconds_per_image if self.runner else 1.0)

    def _publish_queue(self, keys: set[str]) -> None:
        """Queue gauges after a change to these keys' queues (the engine's lock held)."""
        metrics.QUEUE_IMAGES.set(self._queue.images)
        for key in keys:
            metrics.KEY_QUEUE_IMAGES.labels(key=key).set(self._queue.images_of(key))

    def queues(self) -> list[KeyQueue]:
        """Each key with work queued or running on this worker."""
        with self._cond:
            running: dict[str, int] = {}
            for job in self._running:
                running[job.key] = running.get(job.key, 0) + job.images
            keys = dict.fromkeys([*self._queue.keys(), *running])
            return [
                KeyQueue(
                    key=key,
                    queued_images=self._queue.images_of(key),
                    queued_requests=self._queue.requests_of(key),
                    running_images=running.get(key, 0),
                    max_queue_images=self.policy.queue_limit(key),
                    weight=self.policy.weight(key),
                )
                for key in keys
            ]

    @property
    def queued_images(self) -> int:
        return self._queue.images

    def _forget_if_cancelled(self, job: Job, future: concurrent.futures.Future) -> None:
        """A request that timed out or whose client left gives its place back at once."""
        if not future.cancelled():
            return
        with self._cond:
            if self._queue.remove(job):
                self._publish_queue({job.key})

    def end_early(self, job: Job) -> bool:
        """Answer ``job`` at its next denoising step with the images made so far (AUTOMATIC1111's
        interrupt). A job still queued is dropped instead (its waiter sees a cancellation): True then."""
        if job.future.cancel():
            return True
        job.end_requested = True
        return False

    def abandon(self, job: Job) -> None:
        """Nobody waits for ``job`` any more: it leaves the queue, or stops with the rest of its batch."""
        job.abandoned = True
        job.future.cancel()

    def progress(self, job: Job) -> JobProgress:
        """How far ``job`` is: its state and, once its call runs, the denoising steps done."""
        images = job.params.num_images
        if job.future.done():
            return JobProgress("done", job.steps_done, job.steps_total, 0.0, images)
        if not job.future.running():
            return JobProgress("queued", 0, job.params.denoising_steps(), 0.0, images)
        total = job.steps_total or job.params.denoising_steps()
        elapsed = 0.0 if job.started is None else time.monotonic() - job.started
        return JobProgress("running", job.steps_done, total, elapsed, images)

    @property
    def seconds_per_image(self) -> float:
        """Recent GPU seconds per image (for estimates; 1 before anything ran)."""
        return self.runner.seconds_per_image if self.runner is not None else 1.0

    # --- the worker --------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = self._queue.pop_batch(self.settings.max_batch_images)
            self._publish_queue({job.key for job in batch})
        # A request that timed out or went away while queued is dropped here,
        # not run for nobody.
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        now = time.monotonic()
        for job in batch:
            metrics.KEY_QUEUE_WAIT.labels(key=job.key).observe(now - job.queued_at)
        if batch:
            self.served.append(tuple((job.key, job.images) for job in batch))
        return batch

    def _run_worker(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._running = batch
                # The worker thread's log lines name the requests of the batch it runs, and their keys' names.
                token = REQUEST_ID.set(",".join(job.request_id for job in batch))
                key_token = KEY_NAME.set(",".join(dict.fromkeys(job.key for job in batch)))
                try:
                    self._run_batch(batch)
                finally:
                    KEY_NAME.reset(key_token)
                    REQUEST_ID.reset(token)
                    self._running = []

    def _stop_reason(self, batch: list[Job]) -> Callable[[], str | None]:
        def reason() -> str | None:
            if self._grace_over.is_set():
                return SHUTDOWN_REASON
            if all(job.abandoned for job in batch):
                return ABANDONED_REASON
            if all(job.abandoned or job.future.done() for job in batch):
                return ANSWERED_REASON
            return None

        return reason

    def _call(
        self, batch: list[Job], params: list[GenerationParams], made: list[np.ndarray] | None = None
    ) -> list[list[np.ndarray]]:
        assert self.runner is not None
        started = time.monotonic()
        try:
            return self.runner(params, self._stop_reason(batch), _Watch(batch, made))
        finally:
            # Each key is charged its requests' part of the call, by cost.
            elapsed = time.monotonic() - started
            costs = [p.cost() for p in params]
            total = sum(costs) or 1.0
            for job, cost in zip(batch, costs, strict=True):
                metrics.KEY_GPU_SECONDS.labels(key=job.key).inc(elapsed * cost / total)

    @staticmethod
    def _deliver(job: Job, images: list[np.ndarray]) -> None:
        metrics.KEY_IMAGES.labels(key=job.key).inc(len(images))
        job.future.set_result(images)

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            results = self._call(batch, [job.params for job in batch])
        except CallInterrupted as stop:
            self._interrupted(batch, stop)
            return
        except Exception as exc:
            if len(batch) > 1:
                # Isolate the failure: one bad request must not fail its
                # neighbours, and a batch too large for the GPU may fit in parts.
                for job in batch:
                    if not job.future.done():  # not answered early
                        self._run_batch([job])
                return
            job = batch[0]
            if job.future.done():
                return
            if job.params.num_images > 1 and self._is_out_of_memory(exc):
                self._free_memory()
                self._run_images_one_by_one(job)
                return
            job.future.set_exception(self._translate(exc, job))
            return
        for job, images in zip(batch, results, strict=True):
            if not job.future.done():  # not answered early
                self._deliver(job, images)

    def _interrupted(self, batch: list[Job], stop: CallInterrupted) -> None:
        ids = ", ".join(job.request_id for job in batch)
        logger.info("stopped a batch after %d steps (%s): %s", stop.steps_run, stop.reason, ids)
        for job in batch:
            if not job.future.done():
                job.future.set_exception(ServiceUnavailableError(f"The request was stopped: {stop.reason}."))

    def _run_images_one_by_one(self, job: Job) -> None:
        """Retry an out-of-memory request image by image (image i keeps seed + i)."""
        images: list[np.ndarray] = []
        try:
            for seed in job.params.seeds():
                # Answered early, the job gets the images made so far, and the call stops (CallInterrupted).
                images += self._call([job], [replace(job.params, num_images=1, seed=seed)], images)[0]
        except CallInterrupted as stop:
            self._interrupted([job], stop)
            return
        except Exception as exc:
            job.future.set_exception(self._translate(exc, job))
            return
        logger.info("request %s: out of GPU memory as one batch; generated image by image", job.request_id)
        self._deliver(job, images)

    @staticmethod
    def _is_out_of_memory(exc: BaseException) -> bool:
        import torch

        return isinstance(exc, torch.cuda.OutOfMemoryError)

    @staticmethod
    def _free_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _translate(self, exc: Exception, job: Job) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if self._is_out_of_memory(exc):
            self._free_memory()
            logger.warning("request %s: CUDA out of memory during generation", job.request_id)
            return GPUOutOfMemoryError(
                "The GPU ran out of memory generating these images; try fewer images (n) or a smaller size."
            )
        # The exception text may quote the prompt: only at DEBUG.
        logger.error("request %s: generation failed: %s", job.request_id, type(exc).__name__)
        logger.debug("request %s: generation failure details", job.request_id, exc_info=exc)
        return GenerationFailedError("Image generation failed; the server log has the details.")
