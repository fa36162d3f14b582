"""Engine knobs: memory modes, device choice per worker, warm-up, VAE layout, torch.compile, cache-dit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sd35.engine.loading
from sd35.acceleration import cached_steps
from sd35.config import Settings
from sd35.engine import GenerationEngine, GenerationParams
from sd35.engine.calls import PipelineRunner
from sd35.engine.loading import load_pipeline
from sd35.engine.memory import component_bytes

PARAMS = GenerationParams(
    prompt="a lighthouse", width=64, height=64, num_images=1, seed=3, num_inference_steps=4, guidance_scale=0.0
)


def generate(pipe: Any, params: GenerationParams = PARAMS) -> np.ndarray:
    return PipelineRunner(pipe)([params])[0][0]


def settings(tiny_model_dir: Path, **overrides: Any) -> Settings:
    return Settings(model_id=str(tiny_model_dir), warmup=False, **overrides)


@pytest.fixture(scope="module")
def baseline(tiny_model_dir: Path) -> np.ndarray:
    pipe, device = load_pipeline(settings(tiny_model_dir))
    assert device == "cpu"
    return generate(pipe)


def test_no_t5_mode_loads_without_t5_and_generates(tiny_model_dir: Path, baseline: np.ndarray) -> None:
    pipe, _ = load_pipeline(settings(tiny_model_dir, memory_mode="no_t5"))
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert "text_encoder_3" not in component_bytes(pipe)
    image = generate(pipe)
    assert image.shape == (64, 64, 3)
    assert np.abs(image.astype(int) - baseline.astype(int)).mean() > 0.5, "without T5 the conditioning differs"


def test_component_bytes_counts_every_module(tiny_model_dir: Path) -> None:
    pipe, _ = load_pipeline(settings(tiny_model_dir))
    sizes = component_bytes(pipe)
    assert set(sizes) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    expected = sum(p.numel() * 4 for p in pipe.transformer.parameters())
    assert sizes["transformer"] >= expected > 0


def test_each_worker_takes_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [sd35.engine.loading.resolve_device("auto", worker) for worker in (1, 2, 3, 4, 5)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
        "cuda:0",
    ]
    assert sd35.engine.loading.resolve_device("cuda:2", worker_index=1) == "cuda:2", "an explicit DEVICE wins"


def test_cpu_only_machine_uses_cpu_for_every_worker() -> None:
    assert sd35.engine.loading.resolve_device("auto", 3) == "cpu"


def test_warm_up_runs_before_ready(tiny_model_dir: Path) -> None:
    seen: list[tuple[bool, dict[str, Any]]] = []
    engine_box: list[GenerationEngine] = []

    def loader(config: Settings, worker_index: int) -> tuple[Any, str]:
        pipe, device = load_pipeline(config, worker_index)

        def recording(**kwargs: Any) -> Any:
            seen.append((engine_box[0].ready, kwargs))
            return pipe(**kwargs)

        return recording, device

    engine = GenerationEngine(Settings(model_id=str(tiny_model_dir), warmup=True), loader=loader)
    engine_box.append(engine)
    engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert time.monotonic() < deadline, engine.status
        time.sleep(0.02)
    assert len(seen) == 1, "without TORCH_COMPILE one shape is enough"
    ready_during_warmup, kwargs = seen[0]
    assert ready_during_warmup is False
    assert (kwargs["width"], kwargs["height"], kwargs["num_inference_steps"]) == (1024, 1024, 4)
    assert list(engine.batch_sizes) == [], "warm-up is not counted as traffic"
    engine.close()


def test_vae_channels_last_keeps_the_image(tiny_model_dir: Path, baseline: np.ndarray) -> None:
    pipe, _ = load_pipeline(settings(tiny_model_dir, vae_channels_last=True))
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(generate(pipe).astype(int) - baseline.astype(int)).max() <= 1


def test_torch_compile_blocks_matches_eager(tiny_model_dir: Path, baseline: np.ndarray) -> None:
    pipe, _ = load_pipeline(settings(tiny_model_dir, torch_compile="blocks"))
    assert all(hasattr(block, "_compiled_call_impl") for block in pipe.transformer.transformer_blocks)
    assert np.abs(generate(pipe).astype(int) - baseline.astype(int)).max() <= 1


def test_cache_dit_caches_a_step_deterministically(tiny_model_dir: Path, baseline: np.ndarray) -> None:
    pipe, _ = load_pipeline(settings(tiny_model_dir, enable_cache_dit=True))
    first = generate(pipe)
    assert cached_steps(pipe) == [2], "with 4 steps, step 2 must come from the cache"
    second = generate(pipe, PARAMS)
    assert np.array_equal(first, second), "same seed, same image, with the cache on"
    assert np.abs(first.astype(int) - baseline.astype(int)).max() > 0, "caching must change the computation"
    other = generate(pipe, GenerationParams(**{**PARAMS.__dict__, "seed": 4, "width": 80}))
    assert other.shape == (64, 80, 3)
    assert np.array_equal(generate(pipe), first), "other requests in between do not leak cache state"


def test_compile_warm_up_covers_a_batch_and_another_size(tiny_model_dir: Path) -> None:
    shapes: list[tuple[int, int, int]] = []
    pipe, _ = load_pipeline(settings(tiny_model_dir))

    def recording(**kwargs: Any) -> Any:
        shapes.append((len(kwargs["prompt"]), kwargs["width"], kwargs["height"]))
        return pipe(**kwargs)

    config = Settings(model_id=str(tiny_model_dir), warmup=True, torch_compile="blocks")
    engine = GenerationEngine(config, loader=lambda *_: (recording, "cpu"))
    engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert time.monotonic() < deadline, engine.status
        time.sleep(0.02)
    engine.close()
    assert shapes == [(1, 1024, 1024), (2, 1024, 1024), (1, 768, 1024)]
