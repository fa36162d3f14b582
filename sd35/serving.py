"""OpenAI image serving: turns a validated request into engine work and a response.

Between the HTTP layer (``sd35.api``) and the engine: it resolves defaults,
rejects what this server cannot do, counts images against the caller's quota
(:mod:`sd35.quotas`), and encodes images on a thread pool so the
engine's worker is free for the next batch while bytes are being compressed.

Each kind of off-loop work has a bounded pool of its own, so one cannot hold
up the others: uploads are decoded on ``sd35-decode``, images encoded on
``sd35-encode``, and stored (disk or bucket) on ``sd35-store``: a store that
hangs holds only the requests that wait for it, never another user's
``b64_json`` response. ``REQUEST_TIMEOUT`` bounds the whole request — decoding,
the queue, the pipeline, encoding and storing — and ``IMAGE_STORE_TIMEOUT``
bounds the wait for the store. Work handed to a pool carries the request's
context, so its log lines carry the request id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from sd35 import metrics, responses
from sd35.config import Settings
from sd35.engine import GenerationEngine, GenerationParams, adapters
from sd35.engine.params import SEED_MODULUS
from sd35.engine.worker import Job
from sd35.errors import (
    APIError,
    ImageStoreError,
    ImageStoreFullError,
    ModelNotFoundError,
    RequestTimeoutError,
    TooManyRequestsError,
    ValidationError,
    error_payload,
)
from sd35.imaging import (
    OutputFormat,
    UploadError,
    auto_size,
    b64encode,
    encode_image,
    fit,
    format_size,
    has_transparency,
    parse_size,
    probe_upload,
    read_upload,
    repaint_mask,
)
from sd35.keys import CURRENT_KEY, KeySource
from sd35.logs import KEY_NAME
from sd35.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
    ModelCard,
    ModelList,
)
from sd35.quotas import QuotaLedger
from sd35.storage import ImageStore, StoreFullError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Threads that may wait on the image store at once; more requests queue for them (each within its deadline).
STORE_THREADS = 4
# Threads decoding uploads: an edit's upload is decoded once, but a 4096² PNG takes a second or more.
DECODE_THREADS = 2
# How long a `url` request waits to learn whether the store has room, before its GPU work.
ROOM_CHECK_SECONDS = 1.0

SEED_BITS = 32
# Without a mask an edit keeps the input's composition; with one, the masked
# region is painted anew.
IMG2IMG_STRENGTH = 0.6
INPAINT_STRENGTH = 1.0
# input_fidelity=high: keep more of the input (OpenAI: match its features more closely).
HIGH_FIDELITY_STRENGTH = 0.4

Request = ImageGenerationRequest | ImageEditRequest | ImageVariationRequest


def _encoding(request: Request) -> tuple[OutputFormat, int]:
    """The output format and compression a request asks for (variations have neither: PNG)."""
    output_format: OutputFormat = getattr(request, "output_format", None) or "png"
    compression = getattr(request, "output_compression", None)
    return output_format, 100 if compression is None else compression


def _high_fidelity(request: ImageEditRequest | ImageVariationRequest) -> bool:
    return getattr(request, "input_fidelity", None) == "high"


def _shifted_preview(on_preview: Callable[[int, int, np.ndarray], None], start: int, image: int, *rest: Any) -> None:
    """A chunk's previews, numbered among the whole request's images."""
    on_preview(start + image, *rest)


def _encode_b64(pixels: np.ndarray, output_format: OutputFormat, compression: int) -> responses.Parts:
    return responses.b64_item(b64encode(encode_image(pixels, output_format, compression)))


class ImageServing:
    def __init__(
        self,
        settings: Settings,
        engine: GenerationEngine,
        store: ImageStore,
        quotas: QuotaLedger | None = None,
        keys: KeySource | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.quotas = quotas or QuotaLedger()
        self.keys = keys or KeySource(settings.api_keys, max_queue_images=settings.max_queue_images)
        self.created = int(time.time())
        self._encoders = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="sd35-encode"
        )
        self._decoders = concurrent.futures.ThreadPoolExecutor(
            max_workers=DECODE_THREADS, thread_name_prefix="sd35-decode"
        )
        self._storers = concurrent.futures.ThreadPoolExecutor(
            max_workers=STORE_THREADS, thread_name_prefix="sd35-store"
        )

    @staticmethod
    def _in(pool: concurrent.futures.Executor, work: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """``work(*args)`` on ``pool``, in a copy of the caller's context (its request id, for its log lines)."""
        context = contextvars.copy_context()
        return asyncio.get_running_loop().run_in_executor(pool, functools.partial(context.run, work, *args))

    def deadline(self) -> float:
        """When a request that starts now must be answered (REQUEST_TIMEOUT), on the event loop's clock."""
        return asyncio.get_running_loop().time() + self.settings.request_timeout

    def timed_out(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"The request did not finish within {self.settings.request_timeout:g} seconds (REQUEST_TIMEOUT); "
            "try again later, or with fewer or smaller images."
        )

    async def within(self, deadline: float, work: Awaitable[T]) -> T:
        """``work``, or a 504 once ``deadline`` has passed (the work is cancelled)."""
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(work, max(remaining, 0))
        except TimeoutError:
            raise self.timed_out() from None

    def check_n(self, n: int | None) -> int:
        """The request's n, within 1..MAX_IMAGES_PER_REQUEST (the server's cap, not a fixed one)."""
        n = 1 if n is None else n
        cap = self.settings.max_images_per_request
        if not 1 <= n <= cap:
            raise ValidationError(
                f"Invalid value for 'n': {n}; this server makes 1 to {cap} images per request "
                f"(MAX_IMAGES_PER_REQUEST={cap}).",
                param="n",
            )
        return n

    def params_for(self, request: ImageGenerationRequest) -> GenerationParams:
        num_images = self.check_n(request.n)
        width, height = request.dimensions()
        return GenerationParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            num_images=num_images,
            **self._defaults(request.seed, request.num_inference_steps, request.guidance_scale),
            **self._adapter(request),
        )

    def _adapter(self, request: Request) -> dict:
        adapter, scale = adapters.resolve(self.settings, request.model, request.lora_scale)
        return {"adapter": adapter, "lora_scale": scale}

    def _model_label(self, params: GenerationParams) -> str:
        return params.adapter or self.settings.served_model_name

    async def _store(self, data: bytes, output_format: OutputFormat, base_url: str, deadline: float) -> str:
        """Put one encoded image in the store and return its URL, within IMAGE_STORE_TIMEOUT and the deadline.

        Failing here is the store's doing, whatever ran out first: a 502 that names it.
        """
        store = self.store.describe()
        loop = asyncio.get_running_loop()
        wait = min(self.settings.image_store_timeout, deadline - loop.time())
        try:
            return await asyncio.wait_for(self._in(self._storers, self.store.put, data, output_format, base_url), wait)
        except StoreFullError as exc:
            logger.warning("refused a url image: %s", exc)
            raise self._store_full() from None
        except TimeoutError:
            logger.error("the image store (%s) did not take an image within %.1f s", store, wait)
            raise ImageStoreError(
                f"The image store ({store}) did not answer within {max(wait, 0):.0f} seconds "
                "(IMAGE_STORE_TIMEOUT, REQUEST_TIMEOUT); the image was generated but not stored: "
                "retry, or ask for response_format=b64_json."
            ) from None
        except Exception as exc:
            logger.error("could not store an image in %s: %s: %s", store, type(exc).__name__, exc)
            raise ImageStoreError(
                f"The image store ({store}) failed; the image was generated but not stored: "
                "retry, or ask for response_format=b64_json."
            ) from None

    async def _check_room(self, deadline: float) -> None:
        """Refuse a `url` request before any GPU work when the store has no room for its images.

        Only a quick look: a store too slow to tell within a second is left for the store step to report.
        """
        loop = asyncio.get_running_loop()
        wait = min(ROOM_CHECK_SECONDS, deadline - loop.time())
        with contextlib.suppress(TimeoutError):
            if not await asyncio.wait_for(self._in(self._storers, self.store.has_room), wait):
                raise self._store_full()

    def _store_full(self) -> ImageStoreFullError:
        return ImageStoreFullError(
            f"The image store ({self.store.describe()}) is full of images that have not expired yet "
            "(IMAGE_STORE_MAX_BYTES); retry later, or ask for response_format=b64_json."
        )

    def _defaults(self, seed: int | None, steps: int | None, guidance: float | None) -> dict:
        return {
            # Without a seed, draw one: batching stays per-image.
            "seed": secrets.randbits(SEED_BITS) if seed is None else seed,
            "num_inference_steps": steps or self.settings.default_num_inference_steps,
            "guidance_scale": self.settings.default_guidance_scale if guidance is None else guidance,
        }

    def edit_params(
        self, request: ImageEditRequest | ImageVariationRequest, uploads: list[tuple[str, bytes]], mask: bytes | None
    ) -> GenerationParams:
        """Decode and check the uploads; the first image is edited (a mask applies to it, as at OpenAI).

        Only what is used is decoded: the first image and the mask. Other
        images are checked from their headers alone (a readable image within
        the pixel budget), as OpenAI refuses a bad one.
        """
        num_images = self.check_n(request.n)
        if not uploads:
            raise ValidationError("Missing required file: 'image' (a PNG, JPEG or WebP image).", param="image")
        try:
            for name, data in uploads[1:]:
                probe_upload(data, name, "image")
            source = read_upload(uploads[0][1], uploads[0][0], "image")
            mask_image = None if mask is None else read_upload(mask, "mask", "mask")
        except UploadError as exc:
            raise ValidationError(f"{exc}.", param=exc.field) from None
        if mask_image is not None and mask_image.size != source.size:
            raise ValidationError(
                f"'mask' is {mask_image.width}x{mask_image.height} but 'image' is {source.width}x{source.height}; "
                "they must be the same size.",
                param="mask",
            )
        if mask_image is None and isinstance(request, ImageEditRequest) and has_transparency(source):
            mask_image = source  # OpenAI: without a mask, the image's transparent pixels are repainted
        size = request.size or "auto"
        width, height = auto_size(*source.size) if size.strip().lower() == "auto" else parse_size(size)
        repaint = None
        if mask_image is not None:
            repaint = np.array(fit(Image.fromarray(repaint_mask(mask_image)), width, height, Image.NEAREST))
        if request.strength:
            strength = request.strength
        elif repaint is not None:
            strength = INPAINT_STRENGTH
        else:
            strength = HIGH_FIDELITY_STRENGTH if _high_fidelity(request) else IMG2IMG_STRENGTH
        negative = request.negative_prompt if isinstance(request, ImageEditRequest) else None
        return GenerationParams(
            prompt=request.prompt if isinstance(request, ImageEditRequest) else "",
            negative_prompt=negative,
            width=width,
            height=height,
            num_images=num_images,
            init_image=np.array(fit(source.convert("RGB"), width, height, Image.LANCZOS)),
            mask=repaint,
            strength=strength,
            **self._defaults(request.seed, request.num_inference_steps, request.guidance_scale),
            **self._adapter(request),
        )

    async def decode_edit(
        self,
        request: ImageEditRequest | ImageVariationRequest,
        uploads: list[tuple[str, bytes]],
        mask: bytes | None,
        deadline: float | None = None,
    ) -> GenerationParams:
        """:meth:`edit_params` off the event loop (decoding images takes CPU time)."""
        self.check_n(request.n)  # before any image is decoded
        deadline = self.deadline() if deadline is None else deadline
        return await self.decode(deadline, self.edit_params, request, uploads, mask)

    async def edit(
        self,
        request: ImageEditRequest | ImageVariationRequest,
        uploads: list[tuple[str, bytes]],
        mask: bytes | None,
        base_url: str,
    ) -> bytes:
        deadline = self.deadline()
        params = await self.decode_edit(request, uploads, mask, deadline)
        return await self._respond(params, request, base_url, deadline)

    async def generate(self, request: ImageGenerationRequest, base_url: str) -> bytes:
        """The JSON body of the response; ``base_url``: where clients reach this service, for `url` images."""
        return await self._respond(self.params_for(request), request, base_url, self.deadline())

    def _chunks(self, params: GenerationParams) -> list[GenerationParams]:
        """The request as engine jobs of at most MAX_BATCH_IMAGES (as the memory plan resolved it).

        A request for more images than one pipeline call may hold is split
        here, not left to the GPU: image i keeps seed + i, so the images are
        the ones a single call would give.
        """
        size = max(1, self.engine.settings.max_batch_images)
        if params.num_images <= size:
            return [params]
        chunks = []
        for start in range(0, params.num_images, size):
            on_preview = params.on_preview
            if on_preview is not None:
                on_preview = functools.partial(_shifted_preview, on_preview, start)
            chunks.append(
                replace(
                    params,
                    num_images=min(size, params.num_images - start),
                    seed=(params.seed + start) % SEED_MODULUS,
                    on_preview=on_preview,
                )
            )
        return chunks

    def _submit(self, params: GenerationParams) -> list[Job]:
        """Queue every chunk of the request, its images counted against the caller's quota once; if one chunk
        is refused (queue full), none stays queued and the quota is given back."""
        # Chunks might each fit, but together never: the 400 the engine gives a request this large, the whole
        # request checked against the server's queue and the key's share of it.
        self.engine.check_queueable(params.num_images, KEY_NAME.get())
        jobs: list[Job] = []
        with self._counted(params.num_images):
            try:
                for chunk in self._chunks(params):
                    jobs.append(self.engine.submit(chunk))
            except BaseException:
                for job in jobs:
                    self.engine.abandon(job)
                raise
        return jobs

    async def _results(self, jobs: list[Job], timeout: float | None = None) -> list[np.ndarray]:
        """The images of every job in order; the first failure (or the timeout) cancels the rest."""
        if len(jobs) == 1:
            return await self.engine.result(jobs[0], timeout)
        waits = [asyncio.ensure_future(self.engine.result(job, timeout)) for job in jobs]
        try:
            parts = await asyncio.gather(*waits)
        except BaseException:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            raise
        return [image for part in parts for image in part]

    async def run(self, params: GenerationParams, timeout: float | None = None) -> list[np.ndarray]:
        """The request's images as ``(H, W, 3)`` uint8 arrays, in seed order, however many batches it takes
        (``engine.generate`` for requests of any size; ``timeout``: REQUEST_TIMEOUT when None)."""
        return await self._results(self._submit(params), timeout)

    @staticmethod
    @contextlib.contextmanager
    def _refusals_counted() -> Iterator[None]:
        """A 429 raised here is counted in the caller's key metrics (quota or queue)."""
        try:
            yield
        except TooManyRequestsError as refused:
            metrics.KEY_REJECTED.labels(key=KEY_NAME.get(), code=refused.code).inc()
            raise

    @staticmethod
    def _quota() -> tuple[str, int] | None:
        """The caller's key name and ``images_per_minute``, when it has a quota."""
        key = CURRENT_KEY.get()
        return (key.name, key.images_per_minute) if key is not None and key.images_per_minute else None

    def take_quota(self, images: int, asked: str | None = None) -> None:
        """Count a whole request's ``images`` against the caller's quota, once, before any of it is queued:
        429 when they do not fit now, 400 when they never could (``asked`` says what was asked for)."""
        quota = self._quota()
        if quota is not None:
            with self._refusals_counted():
                self.quotas.take(*quota, images, asked=asked)

    def give_back_quota(self, images: int) -> None:
        """Uncount images of the caller's request that were never queued."""
        quota = self._quota()
        if quota is not None and images:
            self.quotas.give_back(*quota, images)

    @contextlib.contextmanager
    def _counted(self, images: int) -> Iterator[None]:
        """Count ``images`` against the caller's quota while work is queued; given back if it is not queued."""
        self.take_quota(images)
        try:
            with self._refusals_counted():
                yield
        except APIError:
            self.give_back_quota(images)
            raise

    def submit(self, params: GenerationParams) -> Job:
        """Queue one engine job of a request whose images were counted already (:meth:`take_quota`): another
        surface's, AUTOMATIC1111's, which queues its iterations one after another."""
        with self._refusals_counted():
            return self.engine.submit(params)

    async def _respond(
        self,
        params: GenerationParams,
        request: ImageGenerationRequest | ImageEditRequest | ImageVariationRequest,
        base_url: str,
        deadline: float,
    ) -> bytes:
        output_format, compression = _encoding(request)
        started = time.monotonic()
        url = request.response_format == "url"
        if url:
            await self._check_room(deadline)
        loop = asyncio.get_running_loop()
        try:
            images = await self.run(params, timeout=max(deadline - loop.time(), 0))
        except RequestTimeoutError:
            raise self.timed_out() from None
        if url:
            encoded = await self.within(
                deadline,
                asyncio.gather(
                    *(self._in(self._encoders, encode_image, px, output_format, compression) for px in images)
                ),
            )
            # One at a time: a store that fails or hangs is met once, not once per image.
            items = [responses.url_item(await self._store(data, output_format, base_url, deadline)) for data in encoded]
        else:
            jobs = (self._in(self._encoders, _encode_b64, px, output_format, compression) for px in images)
            items = await self.within(deadline, asyncio.gather(*jobs))
        counted = self._in(self._encoders, self.engine.usage, params)
        metrics.IMAGES_GENERATED.labels(model=self._model_label(params)).inc(len(items))
        metrics.KEY_REQUEST_SECONDS.labels(key=KEY_NAME.get()).observe(time.monotonic() - started)
        return responses.images_body(
            int(time.time()),
            items,
            background="opaque",
            output_format=output_format,
            size=format_size(params.width, params.height),
            usage=await counted,
        )

    def stream(
        self,
        params: GenerationParams,
        request: ImageGenerationRequest | ImageEditRequest,
        kind: str,
    ) -> AsyncIterator[bytes]:
        """Server-sent events in OpenAI's shapes: ``<kind>.partial_image`` previews, then ``<kind>.completed``.

        The job is queued before the first byte, so a full queue or a model
        that is not loaded is still a plain HTTP error. If the client goes
        away, the stream is cancelled and the job leaves the queue.
        """
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue[tuple[int, int, np.ndarray]] = asyncio.Queue()

        def on_preview(image: int, index: int, preview: np.ndarray) -> None:
            loop.call_soon_threadsafe(previews.put_nowait, (image, index, preview))

        params = replace(params, partial_images=request.partial_images or 0, on_preview=on_preview)
        started, key_name = time.monotonic(), KEY_NAME.get()
        jobs = self._submit(params)
        output_format, compression = _encoding(request)
        common = {
            "background": "opaque",
            "output_format": output_format,
            "quality": "auto",
            "size": format_size(params.width, params.height),
        }

        def encoded(pixels: np.ndarray) -> bytes:
            return b64encode(encode_image(pixels, output_format, compression))

        def partial(image: int, index: int, preview: np.ndarray) -> bytes:
            full = np.asarray(Image.fromarray(preview).resize((params.width, params.height), Image.BILINEAR))
            payload = {"created_at": int(time.time()), "partial_image_index": index, **common, "image_index": image}
            return responses.event(f"{kind}.partial_image", payload, encoded(full))

        async def events() -> AsyncIterator[bytes]:
            done = asyncio.ensure_future(self._results(jobs))
            waiting: asyncio.Future[tuple[int, int, np.ndarray]] | None = None
            try:
                while not done.done() or not previews.empty():
                    waiting = asyncio.ensure_future(previews.get())
                    await asyncio.wait({done, waiting}, return_when=asyncio.FIRST_COMPLETED)
                    if waiting.done():
                        yield await self._in(self._encoders, partial, *waiting.result())
                    else:
                        waiting.cancel()
                try:
                    images = done.result()
                except Exception as exc:
                    _, body, _ = error_payload(exc)
                    yield responses.event("error", body)
                    return
                usage = await self._in(self._encoders, self.engine.usage, params)
                # OpenAI's stream events carry usage without output details (ImagesUsage, not ImageGenUsage).
                usage.pop("output_tokens_details", None)
                finals = [self._in(self._encoders, encoded, pixels) for pixels in images]
                for index, final in enumerate(finals):
                    payload = {"created_at": int(time.time()), "usage": usage, **common, "image_index": index}
                    yield responses.event(f"{kind}.completed", payload, await final)
                metrics.IMAGES_GENERATED.labels(model=self._model_label(params)).inc(len(images))
                metrics.KEY_REQUEST_SECONDS.labels(key=key_name).observe(time.monotonic() - started)
            finally:
                # Also when the client left (the relay cancels this): the job is given up, nothing is left pending.
                if waiting is not None:
                    waiting.cancel()
                if not done.done():
                    done.cancel()
                # Whatever it ended with was answered already, or has nobody left to answer.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await done

        return events()

    def models(self) -> ModelList:
        """The base model, then every adapter with the base as its parent (vLLM's shape)."""
        base = self.settings.served_model_name
        cards = [ModelCard(id=base, created=self.created, owned_by="sd35", root=self.settings.model_id)]
        for adapter in self.settings.lora_adapters:
            cards.append(
                ModelCard(id=adapter.name, created=self.created, owned_by="sd35", root=adapter.location, parent=base)
            )
        return ModelList(data=cards)

    async def offload(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on the encoding pool: CPU work (encoding) kept off the event loop."""
        return await self._in(self._encoders, work, *args)

    async def decode(self, deadline: float, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on the decoding pool, within ``deadline``: uploads decoded (another surface's too), as
        edits decode theirs, without holding up the encoders."""
        return await self.within(deadline, self._in(self._decoders, work, *args))

    def model(self, name: str) -> ModelCard:
        """One model that :meth:`models` lists, by its exact id; anything else is OpenAI's ``model_not_found``."""
        card = next((card for card in self.models().data if card.id == name), None)
        if card is None:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist; GET /v1/models lists the models served here.", param="model"
            )
        return card

    def close(self) -> None:
        for pool in (self._encoders, self._decoders, self._storers):
            pool.shutdown(wait=False, cancel_futures=True)
