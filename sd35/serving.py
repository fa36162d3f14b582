"""OpenAI image serving: turns a validated request into engine work and a response.

Between the HTTP layer (``api.py``) and the engine: it resolves defaults,
rejects what this server cannot do, and encodes images on a thread pool so the
engine's worker is free for the next batch while bytes are being compressed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import time

import numpy as np

from sd35 import metrics
from sd35.config import Settings
from sd35.engine import GenerationEngine, GenerationParams
from sd35.errors import ImageStoreError, ValidationError
from sd35.imaging import OutputFormat, encode_image, format_size, to_base64
from sd35.protocol import ImageData, ImageGenerationRequest, ImagesResponse, ModelCard, ModelList
from sd35.storage import ImageStore

logger = logging.getLogger(__name__)

SEED_BITS = 32


def _encode_b64(pixels: np.ndarray, output_format: OutputFormat, compression: int) -> ImageData:
    return ImageData(b64_json=to_base64(encode_image(pixels, output_format, compression)))


class ImageServing:
    def __init__(self, settings: Settings, engine: GenerationEngine, store: ImageStore) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.created = int(time.time())
        self._encoders = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="sd35-encode"
        )

    def params_for(self, request: ImageGenerationRequest) -> GenerationParams:
        if request.stream:
            raise ValidationError("stream=true is not supported by this server yet; omit it.", param="stream")
        width, height = request.dimensions()
        return GenerationParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            num_images=request.n or 1,
            # Without a seed, draw one: the request is still reproducible from
            # the log, and batching stays per-image.
            seed=secrets.randbits(SEED_BITS) if request.seed is None else request.seed,
            num_inference_steps=request.num_inference_steps or self.settings.default_num_inference_steps,
            guidance_scale=(
                self.settings.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
            ),
        )

    def _encode_url(self, pixels: np.ndarray, output_format: OutputFormat, compression: int, base: str) -> ImageData:
        data = encode_image(pixels, output_format, compression)
        try:
            return ImageData(url=self.store.put(data, output_format, base))
        except Exception as exc:
            logger.error("could not store an image: %s: %s", type(exc).__name__, exc)
            raise ImageStoreError(
                "The image was generated but could not be stored; try response_format=b64_json."
            ) from None

    async def generate(self, request: ImageGenerationRequest, base_url: str) -> ImagesResponse:
        """``base_url``: where this service is reachable from the client, for `url` images."""
        params = self.params_for(request)
        output_format: OutputFormat = request.output_format or "png"
        compression = 100 if request.output_compression is None else request.output_compression
        images = await self.engine.generate(params)
        loop = asyncio.get_running_loop()
        if request.response_format == "url":
            jobs = [
                loop.run_in_executor(self._encoders, self._encode_url, px, output_format, compression, base_url)
                for px in images
            ]
        else:
            jobs = [loop.run_in_executor(self._encoders, _encode_b64, px, output_format, compression) for px in images]
        data = await asyncio.gather(*jobs)
        metrics.IMAGES_GENERATED.inc(len(data))
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=output_format,
            size=format_size(params.width, params.height),
        )

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.settings.served_model_name, created=self.created, owned_by="sd35")])

    def close(self) -> None:
        self._encoders.shutdown(wait=False, cancel_futures=True)
