"""The generation engine: loads the pipeline and drives it from one worker thread.

This is the only module that imports torch and diffusers. One engine owns one
pipeline on one device. A diffusers pipeline is not thread-safe, so a single
worker thread makes every pipeline call; concurrent requests that can share a
call (same size, steps and guidance) are merged into one batch with one seeded
generator per image, so each image is the one its seed gives alone (within
±1/255: kernels differ slightly with batch size). The worker hands back uint8
pixels and goes straight to the next batch: encoding happens elsewhere.
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
from pathlib import Path
from typing import Any

import numpy as np

from sd35 import metrics
from sd35.config import DEFAULT_MODEL_ID, Settings
from sd35.errors import (
    APIError,
    GenerationFailedError,
    GPUOutOfMemoryError,
    ModelNotLoadedError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
    ValidationError,
)
from sd35.logs import REQUEST_ID

logger = logging.getLogger(__name__)

SEED_MODULUS = 2**64


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides the pixels of one request's images."""

    prompt: str
    width: int
    height: int
    num_images: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str | None = None
    # Edits: the input (H, W, 3) uint8 at the output size; a repaint mask
    # (H, W) bool turns image-to-image into inpainting.
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    # Streaming: this many previews per image, handed to on_preview(image
    # index, preview index, (h/8, w/8, 3) uint8) from the GPU worker.
    partial_images: int = 0
    on_preview: Callable[[int, int, np.ndarray], None] | None = field(default=None, compare=False, repr=False)

    def preview_steps(self) -> list[int]:
        """Denoising steps after which a preview is taken, spread over the run (never the last)."""
        steps = self.num_inference_steps
        if self.init_image is not None:  # image-to-image runs only the last part of the schedule
            steps -= int(steps - steps * self.strength)
        chosen = {round((j + 1) * steps / (self.partial_images + 1)) - 1 for j in range(self.partial_images)}
        return sorted(step for step in chosen if 0 <= step < steps - 1)

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one pipeline call (an edit only with itself)."""
        shape = (self.width, self.height, self.num_inference_steps, self.guidance_scale)
        return shape if self.init_image is None else (*shape, self.mode, id(self))

    def seeds(self) -> list[int]:
        return [(self.seed + i) % SEED_MODULUS for i in range(self.num_images)]


@dataclass
class _Job:
    params: GenerationParams
    request_id: str = field(default_factory=REQUEST_ID.get)
    future: concurrent.futures.Future[list[np.ndarray]] = field(default_factory=concurrent.futures.Future)


@dataclass(frozen=True)
class EngineStatus:
    loaded: bool
    detail: str | None


def resolve_device(requested: str, worker_index: int = 1) -> str:
    """The torch device for this worker: with several visible GPUs, worker N takes GPU N-1."""
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{(worker_index - 1) % torch.cuda.device_count()}"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={requested} but no CUDA GPU is visible to this process (check --gpus all)")
    return requested


GIB = 1 << 30
# Working memory beyond the weights for one 1024² batch of a few images
# (activations, attention, VAE decode), with headroom for the allocator.
WORKING_MEMORY_BYTES = 6 * GIB


def component_bytes(pipe: Any) -> dict[str, int]:
    """Bytes of parameters and buffers per pipeline component."""
    import torch

    sizes = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes


def check_fits(sizes: dict[str, int], memory_mode: str, free_bytes: int, total_bytes: int, device: str) -> None:
    """Refuse to start a memory mode that cannot fit, saying which one would."""
    resident = sum(sizes.values())
    if memory_mode == "cpu_offload":
        resident = max(sizes.values(), default=0)
    need = resident + WORKING_MEMORY_BYTES
    if need <= free_bytes:
        return
    hints = []
    if memory_mode == "full" and "text_encoder_3" in sizes:
        hints.append(f"MEMORY_MODE=no_t5 (needs about {(need - sizes['text_encoder_3']) / GIB:.0f} GiB)")
    if memory_mode != "cpu_offload":
        hints.append(
            f"MEMORY_MODE=cpu_offload (needs about {(max(sizes.values()) + WORKING_MEMORY_BYTES) / GIB:.0f} GiB)"
        )
    raise RuntimeError(
        f"MEMORY_MODE={memory_mode} needs about {need / GIB:.0f} GiB on {device} "
        f"({resident / GIB:.1f} GiB of weights + working memory) but only {free_bytes / GIB:.1f} GiB of "
        f"{total_bytes / GIB:.1f} GiB is free"
        + (f"; try {' or '.join(hints)}" if hints else "; free GPU memory or use a larger GPU")
    )


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


def describe_load_error(exc: BaseException, settings: Settings) -> str:
    """A cause a user can act on, from whatever loading raised."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    model = settings.model_id
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__

    def caused_by(*kinds: type[BaseException]) -> bool:
        return any(isinstance(e, kinds) for e in chain)

    if _looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            return f"MODEL_ID={model} looks like a local path, but no such directory exists"
        if not (path / "model_index.json").is_file():
            return f"{model} is not a diffusers model directory: it has no model_index.json"
        return f"{model} is an incomplete or damaged model directory: {exc}"
    # GatedRepoError is a RepositoryNotFoundError: test it first.
    if caused_by(GatedRepoError):
        token = "the token given has no access" if settings.hf_token else "no token is set"
        return (
            f"{model} is a gated model and {token}: accept its license on https://huggingface.co/{model} "
            "and set HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) to a token of that account"
        )
    if caused_by(RepositoryNotFoundError):
        return (
            f"model {model!r} was not found on the Hugging Face Hub: check MODEL_ID (a hub id such as "
            f"{DEFAULT_MODEL_ID}, or a local directory)"
            + ("" if settings.hf_token else "; a private model also needs HF_TOKEN")
        )
    offline = caused_by(OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)
    if offline or any("Connect" in type(e).__name__ or "Timeout" in type(e).__name__ for e in chain):
        return (
            f"could not download {model}: the Hugging Face Hub is unreachable (no network, a proxy, or "
            "HF_HUB_OFFLINE=1) and the weights are not in the local cache (HF_HOME); connect the machine "
            "to the internet or mount a cache that holds the model"
        )
    return f"could not load {model}: {type(exc).__name__}: {exc}"


def load_pipeline(settings: Settings, worker_index: int = 1) -> tuple[Any, str]:
    """Load ``MODEL_ID`` onto this worker's device, as ``MEMORY_MODE`` says; returns (pipeline, device)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from sd35 import acceleration

    device = resolve_device(settings.device, worker_index)
    # bf16 halves memory and runs at full tensor-core speed on GPUs; CPUs run
    # bf16 slowly or not at all, so they get float32.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # Without T5 the prompt is encoded by the two CLIP models alone: ~9.5 GB
    # less, and prompts beyond 77 tokens lose their tail.
    drop_t5 = {"text_encoder_3": None, "tokenizer_3": None} if settings.memory_mode == "no_t5" else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(settings.model_id, dtype=dtype, token=settings.hf_token, **drop_t5)
    pipe.set_progress_bar_config(disable=True)
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(device)
        check_fits(component_bytes(pipe), settings.memory_mode, free, total, device)
    if settings.memory_mode == "cpu_offload" and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if settings.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.enable_cache_dit:
        acceleration.enable_cache_dit(pipe)
    if settings.torch_compile != "off":
        acceleration.compile_transformer(pipe, settings.torch_compile)
    return pipe, device


def _offsets(batch: list[GenerationParams]) -> list[int]:
    """Where each request's images start in the batch."""
    offsets, total = [], 0
    for params in batch:
        offsets.append(total)
        total += params.num_images
    return offsets


class GenerationEngine:
    """Owns one pipeline; queues, batches and runs generation requests."""

    def __init__(
        self,
        settings: Settings,
        loader: Callable[[Settings, int], tuple[Any, str]] | None = None,
        worker_index: int = 1,
        on_ready: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self.worker_index = worker_index
        self._on_ready = on_ready
        self.pipeline: Any = None
        self.device: str | None = None
        self._status = EngineStatus(False, "the model is loading")
        self._pending: deque[_Job] = deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False
        self._seconds_per_image = 1.0
        self._worker = threading.Thread(target=self._run_worker, name="sd35-generation", daemon=True)
        self._edit_pipelines: dict[str, Any] = {}
        # Images per recent pipeline call, for tests and benchmarks; bounded,
        # as a server makes millions of calls (operators read sd35_batch_images).
        self.batch_sizes: deque[int] = deque(maxlen=1024)

    # --- loading -----------------------------------------------------------

    def start(self) -> None:
        """Load the model in the background; requests get 503 until it is ready."""
        threading.Thread(target=self._load, name="sd35-loader", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        logger.info("loading the model: %s", self.settings.summary())
        if not _looks_like_path(self.settings.model_id):
            from huggingface_hub.constants import HF_HUB_CACHE

            logger.info(
                "weights come from the Hugging Face Hub into %s (the first start downloads ~30 GB; "
                "progress bars follow, later starts read the cache)",
                HF_HUB_CACHE,
            )
        try:
            self.pipeline, self.device = (self._loader or load_pipeline)(self.settings, self.worker_index)
            if self.settings.warmup:
                self._warm_up()
        except Exception as exc:  # any failure must become a reason, never a crash loop
            reason = describe_load_error(exc, self.settings)
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
            self._call_pipeline([params])
        self.batch_sizes.clear()
        logger.info("warm-up took %.1f s (%d shapes)", time.monotonic() - started, len(shapes))

    @property
    def status(self) -> EngineStatus:
        return self._status

    @property
    def ready(self) -> bool:
        return self._status.loaded

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
        """Stop taking work; what is queued may still run for ``grace_seconds``, then is refused."""
        with self._cond:
            if self._draining:
                return
            self._draining = True
        logger.info("shutting down: no new requests; finishing queued work for up to %g s", grace_seconds)
        timer = threading.Timer(grace_seconds, self._refuse_pending)
        timer.daemon = True
        timer.start()

    def _refuse_pending(self) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
            self._queued_images = 0
            metrics.QUEUE_IMAGES.set(0)
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    ServiceUnavailableError("The server shut down before this request could run; retry it.")
                )

    # --- requests ----------------------------------------------------------

    async def generate(self, params: GenerationParams, timeout: float | None = None) -> list[np.ndarray]:
        """The request's images as ``(H, W, 3)`` uint8 arrays, in seed order."""
        return await self.result(self.submit(params), timeout)

    def count_prompt_tokens(self, prompt: str) -> int | None:
        """Tokens of the prompt as the first text encoder's tokenizer counts them (before truncation)."""
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        return None if tokenizer is None else len(tokenizer(prompt, truncation=False).input_ids)

    async def result(self, job: _Job, timeout: float | None = None) -> list[np.ndarray]:
        """Wait for a submitted job; a timeout drops it from the queue."""
        timeout = self.settings.request_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
        except TimeoutError:
            raise RequestTimeoutError(
                f"The request did not finish within {timeout:g} seconds (REQUEST_TIMEOUT); try again later, "
                "or with fewer or smaller images."
            ) from None

    def submit(self, params: GenerationParams) -> _Job:
        status = self._status
        if not status.loaded:
            raise ModelNotLoadedError(
                f"The model is not ready: {status.detail}.",
                retry_after=None if "failed" in (status.detail or "") else 10,
            )
        if params.num_images > self.settings.max_queue_images:
            raise ValidationError(
                f"n={params.num_images} is more than this server queues at once "
                f"(MAX_QUEUE_IMAGES={self.settings.max_queue_images}); ask for fewer images.",
                param="n",
            )
        job = _Job(params)
        with self._cond:
            if self._closed or self._draining:
                raise ServiceUnavailableError(
                    "The server is shutting down and takes no new requests; retry, another replica may answer.",
                    retry_after=1,
                )
            if self._queued_images + params.num_images > self.settings.max_queue_images:
                raise RateLimitError(
                    f"Too many images are queued ({self._queued_images} of {self.settings.max_queue_images}); "
                    "retry after the indicated delay.",
                    retry_after=self._queued_images * self._seconds_per_image,
                )
            self._pending.append(job)
            self._queued_images += params.num_images
            metrics.QUEUE_IMAGES.set(self._queued_images)
            self._cond.notify()
        job.future.add_done_callback(self._forget_if_cancelled)
        return job

    def _forget_if_cancelled(self, future: concurrent.futures.Future) -> None:
        """A request that timed out or whose client left gives its place back at once."""
        if not future.cancelled():
            return
        with self._cond:
            for job in self._pending:
                if job.future is future:
                    self._pending.remove(job)
                    self._queued_images -= job.params.num_images
                    metrics.QUEUE_IMAGES.set(self._queued_images)
                    break

    # --- the worker --------------------------------------------------------

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._pending.popleft()
            batch, images = [first], first.params.num_images
            for job in list(self._pending):
                fits = images + job.params.num_images <= self.settings.max_batch_images
                if fits and job.params.batch_key == first.params.batch_key:
                    self._pending.remove(job)
                    batch.append(job)
                    images += job.params.num_images
            self._queued_images -= images
            metrics.QUEUE_IMAGES.set(self._queued_images)
        # A request that timed out or went away while queued is dropped here,
        # not run for nobody.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run_worker(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            results = self._call_pipeline([job.params for job in batch])
        except Exception as exc:
            if len(batch) > 1:
                # Isolate the failure: one bad request must not fail its
                # neighbours, and a batch too large for the GPU may fit in parts.
                for job in batch:
                    self._run_batch([job])
                return
            job = batch[0]
            if job.params.num_images > 1 and self._is_out_of_memory(exc):
                self._free_memory()
                self._run_images_one_by_one(job)
                return
            job.future.set_exception(self._translate(exc, job))
            return
        for job, images in zip(batch, results, strict=True):
            job.future.set_result(images)

    def _run_images_one_by_one(self, job: _Job) -> None:
        """Retry an out-of-memory request image by image (image i keeps seed + i)."""
        images: list[np.ndarray] = []
        try:
            for seed in job.params.seeds():
                images += self._call_pipeline([replace(job.params, num_images=1, seed=seed)])[0]
        except Exception as exc:
            job.future.set_exception(self._translate(exc, job))
            return
        logger.info("request %s: out of GPU memory as one batch; generated image by image", job.request_id)
        job.future.set_result(images)

    @staticmethod
    def _is_out_of_memory(exc: BaseException) -> bool:
        import torch

        return isinstance(exc, torch.cuda.OutOfMemoryError)

    @staticmethod
    def _free_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _translate(self, exc: Exception, job: _Job) -> APIError:
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

    def _pipeline_for(self, mode: str) -> Any:
        """The pipeline of a mode; edit pipelines share every weight with the loaded one (``from_pipe``)."""
        if mode == "txt2img":
            return self.pipeline
        if mode not in self._edit_pipelines:
            from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

            kind = StableDiffusion3Img2ImgPipeline if mode == "img2img" else StableDiffusion3InpaintPipeline
            # Without dtype, from_pipe would convert the shared modules - the
            # loaded pipeline's too - to float32 in place.
            edit = kind.from_pipe(self.pipeline, dtype=self.pipeline.dtype)
            edit.set_progress_bar_config(disable=True)
            self._edit_pipelines[mode] = edit
        return self._edit_pipelines[mode]

    def _call_pipeline(self, batch: list[GenerationParams]) -> list[list[np.ndarray]]:
        import torch

        from sd35 import acceleration

        first = batch[0]
        prompts = [p.prompt for p in batch for _ in range(p.num_images)]
        negatives = [p.negative_prompt or "" for p in batch for _ in range(p.num_images)]
        # One CPU generator per image: the same seed gives the same noise on
        # any device and at any position in a batch.
        generators = [torch.Generator("cpu").manual_seed(seed) for p in batch for seed in p.seeds()]
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": negatives if first.guidance_scale > 1 else None,
            "height": first.height,
            "width": first.width,
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": generators,
            "output_type": "pt",
        }
        pipe = self._pipeline_for(first.mode)
        if first.mode != "txt2img":
            from PIL import Image

            kwargs["image"] = [Image.fromarray(first.init_image)] * len(prompts)
            kwargs["strength"] = first.strength
            # cache-dit resets its state per call only for the pipeline class
            # it patched; a from_pipe pipeline would inherit the last call's.
            acceleration.reset_cache_dit(pipe.transformer)
        if first.mode == "inpaint":
            kwargs["mask_image"] = [Image.fromarray(first.mask.astype(np.uint8) * 255)] * len(prompts)
            kwargs["output_type"] = "latent"
        if any(p.partial_images and p.on_preview for p in batch):
            kwargs["callback_on_step_end"] = self._previewer(batch)
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        started = time.monotonic()
        with torch.inference_mode():
            images = pipe(**kwargs).images
            if first.mode == "inpaint":
                images = self._decode_and_overlay(pipe, images, first)
            # diffusers' PIL rounding (float32, then ×255, round half to
            # even), done on the device so only uint8 crosses to the host.
            pixels = (images.float().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).contiguous().cpu()
        self.batch_sizes.append(len(prompts))
        elapsed = time.monotonic() - started
        metrics.BATCH_IMAGES.observe(len(prompts))
        metrics.GENERATION_SECONDS.observe(elapsed)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(prompts)
        arrays = list(pixels.numpy())
        return [arrays[offset : offset + p.num_images] for p, offset in zip(batch, _offsets(batch), strict=True)]

    @staticmethod
    def _previewer(batch: list[GenerationParams]) -> Callable[..., dict]:
        """A step callback that hands each streaming request previews of its images.

        A full VAE decode per preview would cost a large part of a step; a
        linear projection of the 16 latent channels to RGB (the factors
        ComfyUI uses for SD3 previews) costs well under a millisecond.
        """
        import torch

        from sd35.acceleration import SD3_LATENT_RGB_BIAS, SD3_LATENT_RGB_FACTORS

        wanted = [(p, p.preview_steps(), offset) for p, offset in zip(batch, _offsets(batch), strict=True)]

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            latents = tensors["latents"]
            factors = torch.tensor(SD3_LATENT_RGB_FACTORS, device=latents.device, dtype=torch.float32)
            bias = torch.tensor(SD3_LATENT_RGB_BIAS, device=latents.device, dtype=torch.float32)
            for params, steps, offset in wanted:
                if params.on_preview is None or step not in steps:
                    continue
                chunk = latents[offset : offset + params.num_images].float()
                rgb = torch.einsum("bchw,cr->bhwr", chunk, factors) + bias
                previews = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
                for index, preview in enumerate(previews):
                    params.on_preview(index, steps.index(step), preview)
            return {}

        return callback

    @staticmethod
    def _decode_and_overlay(pipe: Any, latents: Any, params: GenerationParams) -> Any:
        """Decode inpainting latents, then put the original back wherever nothing was to be repainted.

        Decoding here adds the VAE's shift_factor, which diffusers' SD3 inpaint
        decode leaves out; pasting the original back keeps unmasked pixels
        exact instead of approximately preserved through the VAE.
        """
        import torch

        vae = pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents.to(vae.dtype)).sample
        generated = (decoded.float() / 2 + 0.5).clamp(0, 1)
        original = torch.from_numpy(params.init_image).to(generated.device).permute(2, 0, 1).float() / 255
        repaint = torch.from_numpy(params.mask).to(generated.device)[None, None].float()
        return repaint * generated + (1 - repaint) * original[None]
