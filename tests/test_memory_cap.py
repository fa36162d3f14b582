"""The memory plan sees a per-process cap on GPU memory, not only the driver's free memory.

A GPU shared with other work, or the benchmark's simulated smaller cards, cap
PyTorch's allocator with ``torch.cuda.set_per_process_memory_fraction``; the
driver's ``mem_get_info`` does not show that cap, and ``MEMORY_MODE=auto``
would then pick a mode that cannot fit. No GPU here: torch's answers are faked.
"""

from __future__ import annotations

import pytest
import torch

from sd35.engine.memory import GIB, free_gpu_bytes


@pytest.fixture
def card(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """An 80 GiB card with 70 GiB free; the test sets the fraction and what this process has reserved."""
    state = {"fraction": 1.0, "reserved": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: state["fraction"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: state["reserved"])
    return state


def test_without_a_cap_the_driver_free_memory_counts(card: dict[str, float]) -> None:
    assert free_gpu_bytes("cuda:0") == 70 * GIB


def test_a_cap_limits_what_is_free_less_what_this_process_holds(card: dict[str, float]) -> None:
    card.update(fraction=0.5, reserved=10 * GIB)
    assert free_gpu_bytes("cuda:0") == 30 * GIB
    card.update(fraction=0.1)
    assert free_gpu_bytes("cuda:0") == 0, "never negative"


def test_a_torch_without_the_getter_counts_as_uncapped(card: dict[str, float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    assert free_gpu_bytes("cuda:0") == 70 * GIB
