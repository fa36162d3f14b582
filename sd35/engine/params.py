"""What one generation request asks of the engine: the parameters that decide its pixels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

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
    # The LoRA adapter (None: the base model) and its scale; one call runs one of each.
    adapter: str | None = None
    lora_scale: float = 0.0

    def denoising_steps(self) -> int:
        """Steps the pipeline really runs: image-to-image runs only the last part of the schedule."""
        steps = self.num_inference_steps
        if self.init_image is not None:
            steps -= int(steps - steps * self.strength)
        return steps

    def cost(self) -> float:
        """The GPU work this asks for, roughly: images × denoising steps × megapixels, twice with
        classifier-free guidance (a second, unconditioned pass). What fair queueing charges a key."""
        passes = 2 if self.guidance_scale > 1 else 1
        return self.num_images * self.denoising_steps() * self.width * self.height / (1024 * 1024) * passes

    def preview_steps(self) -> list[int]:
        """Denoising steps after which a preview is taken, spread over the run (never the last)."""
        steps = self.denoising_steps()
        chosen = {round((j + 1) * steps / (self.partial_images + 1)) - 1 for j in range(self.partial_images)}
        return sorted(step for step in chosen if 0 <= step < steps - 1)

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one pipeline call (an edit only with itself; an adapter
        only with the same adapter at the same scale)."""
        shape = (
            self.width,
            self.height,
            self.num_inference_steps,
            self.guidance_scale,
            self.adapter,
            self.lora_scale if self.adapter is not None else 0.0,
        )
        return shape if self.init_image is None else (*shape, self.mode, id(self))

    def seeds(self) -> list[int]:
        return [(self.seed + i) % SEED_MODULUS for i in range(self.num_images)]


def offsets(batch: list[GenerationParams]) -> list[int]:
    """Where each request's images start in the batch."""
    starts, total = [], 0
    for params in batch:
        starts.append(total)
        total += params.num_images
    return starts
