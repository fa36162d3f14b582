"""Optional speed-ups: cache-dit tuned for few-step (Turbo) sampling, and torch.compile.

cache-dit's defaults warm up for 8 steps, so a 4-step Turbo run would never
cache anything. Here steps 0 and 1 always compute (they fill the residual
buffers), step 2 runs only the first transformer block and reuses the rest of
step 1's residual, and every later step computes again: about a quarter less
transformer work at 4 steps, for any step count, with no per-request
re-configuration. Caching is deterministic (``residual_diff_threshold=1.0``
means "always similar"), so the same seed still gives the same image.
"""

from __future__ import annotations

from typing import Any

# Linear map from SD3's 16 latent channels (as the sampler holds them) to RGB
# in [-1, 1], for step previews; ComfyUI's published factors (comfy/latent_formats.py).
SD3_LATENT_RGB_FACTORS = [
    [-0.0922, -0.0175, 0.0749],
    [0.0311, 0.0633, 0.0954],
    [0.1994, 0.0927, 0.0458],
    [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496],
    [-0.0006, 0.1104, 0.0309],
    [0.0978, 0.0306, 0.0427],
    [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669],
    [-0.0488, 0.0130, -0.0268],
    [0.0922, 0.0988, 0.0951],
    [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895],
    [-0.0069, -0.0030, -0.0810],
    [-0.0596, -0.0465, -0.0293],
    [-0.1448, -0.1463, -0.1189],
]
SD3_LATENT_RGB_BIAS = [0.2394, 0.2135, 0.1925]

WARMUP_STEPS = 2
CACHED_STEPS = 1
FN_COMPUTE_BLOCKS = 1
BN_COMPUTE_BLOCKS = 0


def enable_cache_dit(pipe: Any) -> None:
    import cache_dit

    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=FN_COMPUTE_BLOCKS,
        Bn_compute_blocks=BN_COMPUTE_BLOCKS,
        max_warmup_steps=WARMUP_STEPS,
        max_cached_steps=CACHED_STEPS,
        residual_diff_threshold=1.0,
    )
    cache_dit.enable_cache(pipe, cache_config=config)


def reset_cache_dit(transformer: Any) -> None:
    """Start a fresh cache for the next call (a no-op when cache-dit is off).

    cache-dit resets its state at the start of every call of the pipeline class
    it patched; pipelines made with ``from_pipe`` (image-to-image, inpainting)
    share the cached transformer but not that reset, so their calls would reuse
    the previous request's residuals.
    """
    manager = getattr(transformer, "_context_manager", None)
    if manager is None:
        return
    for name in getattr(transformer, "_context_names", []):
        manager.reset_context(name, **dict(transformer._context_kwargs))


def cached_steps(pipe: Any) -> list[int]:
    """Indices of the denoising steps served from the cache in the last call."""
    return list(getattr(pipe.transformer, "_cached_steps", None) or [])


def compile_transformer(pipe: Any, mode: str) -> None:
    """``blocks``: compile each transformer block (fast to compile: the 38
    blocks of SD3.5 Large share one graph, plus one for the last block, which
    has no context output); ``full``: the whole transformer (slower to compile).
    Shapes are dynamic: once the warm-up has seen a second batch size and image
    size, other sizes reuse the graphs instead of recompiling.
    """
    if mode == "full":
        pipe.transformer.compile(dynamic=True)
        return
    for block in pipe.transformer.transformer_blocks:
        block.compile(dynamic=True)
