"""OpenAI's ``usage`` object for a request, counted as SD3.5 really processes it.

- text tokens: the prompt as the text encoder with the longest context reads
  it — T5-XXL (up to the pipeline's ``max_sequence_length``, 256) when it is
  loaded, else CLIP (up to 77) — special tokens included; with classifier-free
  guidance (guidance_scale > 1) the negative prompt is encoded too and counts;
- image tokens: the MMDiT works on 2×2 patches of the VAE's latents (1/8 of
  the image per side), so an image of W×H is (W/16)·(H/16) tokens: the edited
  input image is that many input tokens, and every generated image that many
  output tokens.

Counting tokenizes with private copies of the pipeline's tokenizers: the
worker thread tokenizes with the originals during a call, and a Rust
tokenizer used from two threads at once raises "Already borrowed".
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import Any

from sd35.engine.params import GenerationParams

# diffusers' StableDiffusion3Pipeline.__call__ default; sd35 does not change it.
T5_MAX_SEQUENCE_LENGTH = 256
CLIP_MAX_LENGTH = 77
# VAE downsampling (8) times the transformer's patch size (2), SD3's.
PIXELS_PER_TOKEN_SIDE = 16


def image_tokens(width: int, height: int, pipeline: Any = None) -> int:
    """Tokens the transformer sees for one image of ``width`` × ``height``."""
    side = PIXELS_PER_TOKEN_SIDE
    if pipeline is not None:
        patch = getattr(getattr(getattr(pipeline, "transformer", None), "config", None), "patch_size", None)
        scale = getattr(pipeline, "vae_scale_factor", None)
        if isinstance(patch, int) and isinstance(scale, int):
            side = patch * scale
    return (width // side) * (height // side)


class TokenCounter:
    """Counts prompt tokens with the pipeline's longest-context tokenizer (a private copy)."""

    def __init__(self, pipeline: Any) -> None:
        t5 = getattr(pipeline, "tokenizer_3", None)
        if t5 is not None and getattr(pipeline, "text_encoder_3", None) is not None:
            tokenizer, self.max_length = t5, T5_MAX_SEQUENCE_LENGTH
        else:
            tokenizer = getattr(pipeline, "tokenizer", None)
            self.max_length = getattr(pipeline, "tokenizer_max_length", None) or CLIP_MAX_LENGTH
        self._tokenizer = None if tokenizer is None else copy.deepcopy(tokenizer)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> int:
        """Tokens of ``text`` that the encoder reads (what is cut off beyond its context is not counted)."""
        if self._tokenizer is None:
            return 0
        with self._lock:
            ids = self._tokenizer(text, truncation=True, max_length=self.max_length).input_ids
        return len(ids)


_counters: weakref.WeakKeyDictionary[Any, TokenCounter] = weakref.WeakKeyDictionary()
_counters_lock = threading.Lock()


def _counter(pipeline: Any) -> TokenCounter:
    with _counters_lock:
        counter = _counters.get(pipeline)
        if counter is None:
            counter = _counters[pipeline] = TokenCounter(pipeline)
        return counter


def usage(pipeline: Any, params: GenerationParams) -> dict[str, Any]:
    """``{"input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details", "total_tokens"}``."""
    count = _counter(pipeline)
    text = count(params.prompt)
    if params.guidance_scale > 1:
        text += count(params.negative_prompt or "")
    per_image = image_tokens(params.width, params.height, pipeline)
    image = per_image if params.init_image is not None else 0
    output = per_image * params.num_images
    return {
        "input_tokens": text + image,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": text + image + output,
    }
