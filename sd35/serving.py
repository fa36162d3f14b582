"""OpenAI image serving: turns a validated request into engine work and a response.

Between the HTTP layer (``sd35.api``) and the engine: it resolves defaults,
rejects what this server cannot do, counts images against the caller's quota
(:mod:`sd35.quotas`), and encodes images on a thread pool so the engine's
worker is free for the next batch while bytes are being compressed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
from PIL import Image

from sd35 import metrics, responses
from sd35.config import Settings
from sd35.engine import GenerationEngine, GenerationParams, adapters
from sd35.engine.worker import Job
from sd35.errors import APIError, ImageStoreError, TooManyRequestsError, ValidationError, error_payload
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
from sd35.storage import ImageStore

logger = logging.getLogger(__name__)

SEED_BITS = 32
# Without a mask an edit keeps the input's composition; with one, the masked
# region is painted anew.
IMG2IMG_STRENGTH = 0.6
INPAINT_STRENGTH = 1.0


def _encoding(request: ImageGenerationRequest | ImageEditRequest | ImageVariationRequest) -> tuple[OutputFormat, int]:
    """The output format and compression a request asks for (variations have neither: PNG)."""
    output_format: OutputFormat = getattr(request, "output_format", None) or "png"
    compression = getattr(request, "output_compression", None)
    return output_format, 100 if compression is None else compression


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

    def params_for(self, request: ImageGenerationRequest) -> GenerationParams:
        width, height = request.dimensions()
        return GenerationParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            num_images=request.n or 1,
            **self._defaults(request.seed, request.num_inference_steps, request.guidance_scale),
            **self._adapter(request),
        )

    def _adapter(self, request: ImageGenerationRequest | ImageEditRequest | ImageVariationRequest) -> dict:
        adapter, scale = adapters.resolve(self.settings, request.model, request.lora_scale)
        return {"adapter": adapter, "lora_scale": scale}

    def _model_label(self, params: GenerationParams) -> str:
        return params.adapter or self.settings.served_model_name

    def _encode_url(
        self, pixels: np.ndarray, output_format: OutputFormat, compression: int, base: str
    ) -> responses.Parts:
        data = encode_image(pixels, output_format, compression)
        try:
            return responses.url_item(self.store.put(data, output_format, base))
        except Exception as exc:
            logger.error("could not store an image: %s: %s", type(exc).__name__, exc)
            raise ImageStoreError(
                "The image was generated but could not be stored; try response_format=b64_json."
            ) from None

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
        """Decode and check the uploads; the first image is edited (a mask applies to it, as at OpenAI)."""
        if not uploads:
            raise ValidationError("Missing required file: 'image' (a PNG, JPEG or WebP image).", param="image")
        try:
            images = [read_upload(data, name, "image") for name, data in uploads]
            mask_image = None if mask is None else read_upload(mask, "mask", "mask")
        except UploadError as exc:
            raise ValidationError(f"{exc}.", param=exc.field) from None
        source = images[0]
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
        strength = request.strength or (IMG2IMG_STRENGTH if repaint is None else INPAINT_STRENGTH)
        negative = request.negative_prompt if isinstance(request, ImageEditRequest) else None
        return GenerationParams(
            prompt=request.prompt if isinstance(request, ImageEditRequest) else "",
            negative_prompt=negative,
            width=width,
            height=height,
            num_images=request.n or 1,
            init_image=np.array(fit(source.convert("RGB"), width, height, Image.LANCZOS)),
            mask=repaint,
            strength=strength,
            **self._defaults(request.seed, request.num_inference_steps, request.guidance_scale),
            **self._adapter(request),
        )

    async def decode_edit(
        self, request: ImageEditRequest | ImageVariationRequest, uploads: list[tuple[str, bytes]], mask: bytes | None
    ) -> GenerationParams:
        """:meth:`edit_params` off the event loop (decoding images takes CPU time)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encoders, self.edit_params, request, uploads, mask)

    async def edit(
        self,
        request: ImageEditRequest | ImageVariationRequest,
        uploads: list[tuple[str, bytes]],
        mask: bytes | None,
        base_url: str,
    ) -> bytes:
        return await self._respond(await self.decode_edit(request, uploads, mask), request, base_url)

    async def generate(self, request: ImageGenerationRequest, base_url: str) -> bytes:
        """The JSON body of the response; ``base_url``: where clients reach this service, for `url` images."""
        return await self._respond(self.params_for(request), request, base_url)

    def submit(self, params: GenerationParams) -> Job:
        """Queue the work, counting its images against the caller's quota first (given back if it is not queued)."""
        key = CURRENT_KEY.get()
        limit = key.images_per_minute if key is not None else 0
        try:
            if limit:
                self.quotas.take(key.name, limit, params.num_images)
            try:
                return self.engine.submit(params)
            except APIError:
                if limit:
                    self.quotas.give_back(key.name, limit, params.num_images)
                raise
        except TooManyRequestsError as refused:
            metrics.KEY_REJECTED.labels(key=KEY_NAME.get(), code=refused.code).inc()
            raise

    async def _respond(
        self,
        params: GenerationParams,
        request: ImageGenerationRequest | ImageEditRequest | ImageVariationRequest,
        base_url: str,
    ) -> bytes:
        output_format, compression = _encoding(request)
        started = time.monotonic()
        images = await self.engine.result(self.submit(params))
        loop = asyncio.get_running_loop()
        if request.response_format == "url":
            jobs = [
                loop.run_in_executor(self._encoders, self._encode_url, px, output_format, compression, base_url)
                for px in images
            ]
        else:
            jobs = [loop.run_in_executor(self._encoders, _encode_b64, px, output_format, compression) for px in images]
        items = await asyncio.gather(*jobs)
        metrics.IMAGES_GENERATED.labels(model=self._model_label(params)).inc(len(items))
        metrics.KEY_REQUEST_SECONDS.labels(key=KEY_NAME.get()).observe(time.monotonic() - started)
        return responses.images_body(
            int(time.time()),
            items,
            background="opaque",
            output_format=output_format,
            size=format_size(params.width, params.height),
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
        job = self.submit(params)
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
            done = asyncio.ensure_future(self.engine.result(job))
            try:
                while not done.done() or not previews.empty():
                    waiting = asyncio.ensure_future(previews.get())
                    await asyncio.wait({done, waiting}, return_when=asyncio.FIRST_COMPLETED)
                    if waiting.done():
                        yield await loop.run_in_executor(self._encoders, partial, *waiting.result())
                    else:
                        waiting.cancel()
                try:
                    images = done.result()
                except Exception as exc:
                    _, body, _ = error_payload(exc)
                    yield responses.event("error", body)
                    return
                tokens = self.engine.count_prompt_tokens(params.prompt) or 0
                usage = {
                    "input_tokens": tokens,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": tokens},
                    "output_tokens": 0,
                    "total_tokens": tokens,
                }
                finals = [loop.run_in_executor(self._encoders, encoded, pixels) for pixels in images]
                for index, final in enumerate(finals):
                    payload = {"created_at": int(time.time()), "usage": usage, **common, "image_index": index}
                    yield responses.event(f"{kind}.completed", payload, await final)
                metrics.IMAGES_GENERATED.labels(model=self._model_label(params)).inc(len(images))
                metrics.KEY_REQUEST_SECONDS.labels(key=key_name).observe(time.monotonic() - started)
            finally:
                if not done.done():
                    done.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
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

    def close(self) -> None:
        self._encoders.shutdown(wait=False, cancel_futures=True)
