"""The random checkpoint every scenario loads, and the reference images later scenarios are compared with.

The random weights are built once on the device and saved as a diffusers
checkpoint; each scenario then loads it with the service's own
``load_pipeline``, quantization included, so the benchmark measures the
service's loading path and not a copy of it. Building in memory and loading
from disk are both timed, to tell which is faster on the machine.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu.arch import build_random_pipeline

MARKER = "sd35-random-checkpoint.json"


def prepare(arch: dict[str, Any], directory: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """A checkpoint of ``arch`` with random weights (seed 0) in ``directory``, reused while ``arch`` and ``dtype``
    hold; returns what it cost: ``built_s`` (the weights made on ``device``) and ``saved_s``, or ``reused``."""
    stamp = {"arch": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(), "dtype": str(dtype)}
    marker = directory / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return {"path": str(directory), "reused": True, "bytes": weight_bytes(directory)}
    shutil.rmtree(directory, ignore_errors=True)
    started = time.perf_counter()
    pipe = build_random_pipeline(arch, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    built = time.perf_counter()
    pipe.save_pretrained(directory)
    saved = time.perf_counter()
    marker.write_text(json.dumps(stamp))
    free(pipe)
    return {
        "path": str(directory),
        "reused": False,
        "built_s": built - started,
        "saved_s": saved - built,
        "bytes": weight_bytes(directory),
    }


def weight_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*.safetensors"))


def free(pipe: Any) -> None:
    """Drop a pipeline's tensors even if something still holds the object (the engine's thread, BentoML's
    service instance): every module goes to the meta device, which frees its storage."""
    with contextlib.suppress(Exception):
        pipe.remove_all_hooks()  # accelerate's offload hooks hold modules
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            with contextlib.suppress(Exception):
                component.to("meta")
    # Compiled graphs keep references to the parameters they were traced with.
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class References:
    """Fixed-seed images of ``baseline``, kept beside the checkpoint so that a later window compares with them."""

    def __init__(self, directory: Path, size: int, steps: int, seeds: int) -> None:
        self.path = directory / f"reference-{size}px-{steps}steps-{seeds}seeds.npz"

    def save(self, images: list[np.ndarray]) -> None:
        np.savez_compressed(self.path, images=np.stack(images))

    def load(self) -> list[np.ndarray] | None:
        if not self.path.is_file():
            return None
        return list(np.load(self.path)["images"])
