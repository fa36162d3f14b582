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
