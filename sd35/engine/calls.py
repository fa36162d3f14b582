"""One pipeline call for a batch: the right pipeline for the mode, per-image seeds, previews, interruption.

A call can be stopped between two denoising steps: diffusers calls
``callback_on_step_end`` after every step, and an exception raised there ends
the call before the remaining steps and the VAE decode run. The engine uses it
at the end of the shutdown grace and when every request of a batch is gone.

The same callback reports each step to a :class:`CallWatch`, which is how the
engine knows how far a running request is, and lets one request of a batch end
early with what was made so far (AUTOMATIC1111's interrupt and skip): its part
of the current latents is decoded and handed over, while the others go on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from sd35 import metrics
from sd35.engine import adapters
from sd35.engine.params import GenerationParams, offsets


class CallInterrupted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The call was stopped between two denoising steps; ``reason`` says why."""

    def __init__(self, reason: str, steps_run: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.steps_run = steps_run


class CallWatch(Protocol):
    """Follows one call from the worker: progress, and requests that want to end before the last step."""

    def on_step(self, done: int, total: int) -> None:
        """``done`` of ``total`` denoising steps have run."""

    def ending(self) -> list[int]:
        """Indices (in the batch) of the requests that want to end now with what was made."""

    def deliver(self, index: int, images: list[np.ndarray]) -> None:
        """The images of request ``index``, decoded from the latents of the step just run."""


class PipelineRunner:
    """Makes the pipeline calls of one engine; edit pipelines share every weight with the loaded one."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._edit_pipelines: dict[str, Any] = {}
        self.seconds_per_image = 1.0
        # Images and denoising steps per recent call, for tests and benchmarks;
        # bounded, as a server makes millions of calls (operators read the metrics).
        self.batch_sizes: deque[int] = deque(maxlen=1024)
        self.steps_run: deque[int] = deque(maxlen=1024)

    def pipeline_for(self, mode: str) -> Any:
        """The pipeline of a mode (``from_pipe``: no second copy of any weight)."""
        if mode == "txt2img":
            return self.pipeline
        if mode not in self._edit_pipelines:
            from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

            kind = StableDiffusion3Img2ImgPipeline if mode == "img2img" else StableDiffusion3InpaintPipeline
            # Built from the very same modules, untouched: from_pipe would cast
            # them to a dtype, which quantized weights refuse, and which without
            # an explicit dtype turns the shared modules to float32 in place.
            edit = kind(**self.pipeline.components)
            edit.set_progress_bar_config(disable=True)
            self._edit_pipelines[mode] = edit
        return self._edit_pipelines[mode]

    def __call__(
        self,
        batch: list[GenerationParams],
        stop_reason: Callable[[], str | None] = lambda: None,
        watch: CallWatch | None = None,
    ) -> list[list[np.ndarray]]:
        """The batch's images as (H, W, 3) uint8 arrays, per request; raises :class:`CallInterrupted`
        when ``stop_reason()`` says so between two steps. ``watch`` sees every step and may end
        requests early (they are then delivered to it, and their entries here are of no use)."""
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
        pipe = self.pipeline_for(first.mode)
        # Edit pipelines share the transformer and text encoders, so the
        # loaded pipeline's adapter state is theirs too.
        adapters.activate(self.pipeline, first.adapter, first.lora_scale)
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
        steps = [0]
        preview = _previewer(batch) if any(p.partial_images and p.on_preview for p in batch) else None

        total = first.denoising_steps()

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            steps[0] = step + 1
            if preview is not None:
                preview(step, tensors["latents"])
            if watch is not None:
                watch.on_step(steps[0], total)
                # After the last step the call's own decode gives the same images.
                if steps[0] < total:
                    for index in watch.ending():
                        watch.deliver(index, _decode_part(pipe, tensors["latents"], batch, index))
            reason = stop_reason()
            if reason is not None and steps[0] < total:
                raise CallInterrupted(reason, steps[0])
            return {}

        kwargs["callback_on_step_end"] = on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        started = time.monotonic()
        try:
            with torch.inference_mode():
                images = pipe(**kwargs).images
                if first.mode == "inpaint":
                    images = _decode_and_overlay(pipe, images, first)
                arrays = _to_pixels(images)
        finally:
            self.steps_run.append(steps[0])
        self.batch_sizes.append(len(prompts))
        elapsed = time.monotonic() - started
        metrics.BATCH_IMAGES.observe(len(prompts))
        metrics.GENERATION_SECONDS.observe(elapsed)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * elapsed / len(prompts)
        return [arrays[start : start + p.num_images] for p, start in zip(batch, offsets(batch), strict=True)]


def _previewer(batch: list[GenerationParams]) -> Callable[[int, Any], None]:
    """Hands each streaming request previews of its images after the steps it wants them.

    A full VAE decode per preview would cost a large part of a step; a linear
    projection of the 16 latent channels to RGB (the factors ComfyUI uses for
    SD3 previews) costs well under a millisecond.
    """
    import torch

    from sd35.acceleration import SD3_LATENT_RGB_BIAS, SD3_LATENT_RGB_FACTORS

    wanted = [(p, p.preview_steps(), start) for p, start in zip(batch, offsets(batch), strict=True)]

    def preview(step: int, latents: Any) -> None:
        factors = torch.tensor(SD3_LATENT_RGB_FACTORS, device=latents.device, dtype=torch.float32)
        bias = torch.tensor(SD3_LATENT_RGB_BIAS, device=latents.device, dtype=torch.float32)
        for params, steps, start in wanted:
            if params.on_preview is None or step not in steps:
                continue
            chunk = latents[start : start + params.num_images].float()
            rgb = torch.einsum("bchw,cr->bhwr", chunk, factors) + bias
            previews = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
            for index, image in enumerate(previews):
                params.on_preview(index, steps.index(step), image)

    return preview


def _decode(pipe: Any, latents: Any) -> Any:
    """Latents to (B, 3, H, W) float images in [0, 1], as the pipelines decode them."""
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    decoded = vae.decode(latents.to(vae.dtype)).sample
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def _to_pixels(images: Any) -> list[np.ndarray]:
    """(B, 3, H, W) floats in [0, 1] to (H, W, 3) uint8 arrays.

    diffusers' PIL rounding (float32, then ×255, round half to even), done on
    the device so only uint8 crosses to the host.
    """
    import torch

    return list((images.float().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).contiguous().cpu().numpy())


def _decode_part(pipe: Any, latents: Any, batch: list[GenerationParams], index: int) -> list[np.ndarray]:
    """One request's images from the latents of a step before the last: what was made so far."""
    import torch

    params = batch[index]
    start = offsets(batch)[index]
    part = latents[start : start + params.num_images]
    with torch.inference_mode():
        images = _decode_and_overlay(pipe, part, params) if params.mode == "inpaint" else _decode(pipe, part)
        return _to_pixels(images)


def _decode_and_overlay(pipe: Any, latents: Any, params: GenerationParams) -> Any:
    """Decode inpainting latents, then put the original back wherever nothing was to be repainted.

    Decoding here adds the VAE's shift_factor, which diffusers' SD3 inpaint
    decode leaves out; pasting the original back keeps unmasked pixels exact
    instead of approximately preserved through the VAE.
    """
    import torch

    generated = _decode(pipe, latents)
    original = torch.from_numpy(params.init_image).to(generated.device).permute(2, 0, 1).float() / 255
    repaint = torch.from_numpy(params.mask).to(generated.device)[None, None].float()
    return repaint * generated + (1 - repaint) * original[None]
