"""GPU memory policy: what the weights of each memory mode take, and whether a mode fits."""

from __future__ import annotations

from typing import Any

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
