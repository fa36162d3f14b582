"""Memory modes: the fit calculation, refusals that say what to do, and the quantized modes on the tiny model."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.gpu.arch import DEFAULT_ARCH, build_random_pipeline, load_arch
from sd35.config import MEMORY_MODES, ConfigError, Settings, load_settings
from sd35.engine import GenerationEngine, GenerationParams
from sd35.engine.calls import PipelineRunner
from sd35.engine.loading import load_pipeline
from sd35.engine.memory import (
    AUTO_ORDER,
    GIB,
    MODES,
    MemoryModeError,
    ModelShape,
    check_device,
    component_bytes,
    fit,
    plan_memory,
    shape_of_checkpoint,
    shape_of_pipeline,
)
from tests.conftest import service_client

PARAMS = GenerationParams(
    prompt="a lighthouse", width=64, height=64, num_images=1, seed=3, num_inference_steps=4, guidance_scale=0.0
)
CONTEXT_GIB = 0.6  # what the driver and the CUDA context take on a card


@pytest.fixture(scope="module")
def large() -> ModelShape:
    """SD3.5 Large's memory shape, from its published configurations on the meta device."""
    if not DEFAULT_ARCH.is_file():
        pytest.skip(f"{DEFAULT_ARCH} is not in this checkout")
    return shape_of_pipeline(build_random_pipeline(load_arch(DEFAULT_ARCH), "meta", torch.bfloat16))


def free_on(card_gib: float) -> int:
    return int((card_gib - CONTEXT_GIB) * GIB)


def test_config_knows_every_mode_and_defaults_to_auto() -> None:
    assert set(MEMORY_MODES) == {"auto", *MODES}
    assert set(AUTO_ORDER) <= set(MODES) and "fp8" not in AUTO_ORDER, "fp8 is never picked automatically"
    assert load_settings({}).memory_mode == "auto"
    assert load_settings({"MEMORY_MODE": "INT8"}).memory_mode == "int8"
    with pytest.raises(ConfigError, match="MEMORY_MODE='fp16' is invalid: expected auto, full, fp8, int8, nf4"):
        load_settings({"MEMORY_MODE": "fp16"})


def test_weight_sizes_of_sd35_large_per_mode(large: ModelShape) -> None:
    def gib(mode: str) -> dict[str, float]:
        return {name: size / GIB for name, size in large.weight_bytes(MODES[mode]).items()}

    assert gib("full")["transformer"] == pytest.approx(15.2, abs=0.2)  # 16.3 GB
    assert gib("full")["text_encoder_3"] == pytest.approx(8.9, abs=0.2)  # 9.5 GB
    assert gib("int8")["transformer"] == pytest.approx(15.2 / 2, abs=0.3)
    assert gib("int8")["text_encoder_3"] == pytest.approx(8.9 / 2, abs=0.3)
    assert 3.5 < gib("nf4")["transformer"] < 4.6 and 2.0 < gib("nf4")["text_encoder_3"] < 2.9
    assert gib("fp8")["text_encoder_3"] == gib("full")["text_encoder_3"], "fp8 quantizes the transformer only"
    assert "text_encoder_3" not in gib("nf4_no_t5") and "text_encoder_3" not in gib("no_t5")
    assert large.resident_bytes(MODES["cpu_offload"]) == large.weight_bytes(MODES["full"])["transformer"]


def test_working_memory_grows_with_images_and_pixels(large: ModelShape) -> None:
    one, eight = large.working_bytes(1), large.working_bytes(8)
    assert eight > one
    assert large.working_bytes(8, vae_slicing=False) > eight, "decoding the whole batch at once needs more"
    assert large.working_bytes(4, pixels=1536 * 1536) > large.working_bytes(4, pixels=512 * 512)


@pytest.mark.parametrize(
    ("card_gib", "expected"),
    [(12, "nf4_no_t5"), (16, "nf4"), (24, "int8"), (40, "full"), (80, "full")],
)
def test_auto_picks_the_best_mode_that_fits_a_full_batch(large: ModelShape, card_gib: int, expected: str) -> None:
    plan = fit("auto", large, free_on(card_gib), max_batch_images=8)
    assert plan.mode.name == expected
    assert plan.max_batch_images == 8, "a mode is picked only where a full batch fits"
    weights = large.resident_bytes(plan.mode)
    assert weights + large.working_bytes(8, vae_slicing=plan.vae_slicing) <= free_on(card_gib)
    assert plan.vae_slicing == (card_gib < 48), "the VAE decodes a whole batch at once where that fits"
    better = AUTO_ORDER[: AUTO_ORDER.index(expected)]
    assert all(large.resident_bytes(MODES[m]) + large.working_bytes(8) > free_on(card_gib) for m in better)
    assert f"{weights / GIB:.1f} GiB of weights" in plan.reason


def test_an_explicit_mode_caps_the_batch_to_what_fits(large: ModelShape) -> None:
    weights = large.resident_bytes(MODES["full"])
    free = weights + (large.working_bytes(6) + large.working_bytes(7)) // 2
    plan = fit("full", large, free, max_batch_images=8)
    assert plan.mode.name == "full" and plan.max_batch_images == 6 and plan.vae_slicing
    assert plan.notes == (plan.notes[0],) and "MAX_BATCH_IMAGES capped from 8 to 6" in plan.notes[0]


def test_a_mode_that_cannot_fit_is_refused_naming_modes_that_would(large: ModelShape) -> None:
    with pytest.raises(MemoryModeError) as refused:
        fit("full", large, free_on(16), max_batch_images=8, device="cuda:0")
    message = str(refused.value)
    assert message.startswith("MEMORY_MODE=full does not fit on cuda:0")
    assert "MEMORY_MODE=nf4 " in message and "MEMORY_MODE=int8" not in message
    with pytest.raises(MemoryModeError, match="no memory mode fits"):
        fit("auto", large, free_on(4), max_batch_images=8)


def test_modes_without_their_kernels_are_refused_with_what_to_do() -> None:
    for mode in ("fp8", "nf4", "nf4_no_t5"):
        with pytest.raises(MemoryModeError, match=rf"MEMORY_MODE={mode} needs a CUDA GPU .* on a CPU use"):
            check_device(MODES[mode], "cpu", None)
    with pytest.raises(MemoryModeError, match=r"Ada, Hopper or Blackwell.*compute capability 8\.0.*MEMORY_MODE=int8"):
        check_device(MODES["fp8"], "cuda:0", (8, 0), "NVIDIA A100-SXM4-80GB")
    check_device(MODES["fp8"], "cuda:0", (9, 0), "NVIDIA H100")
    check_device(MODES["nf4"], "cuda:0", (8, 6), "NVIDIA RTX A4000")
    check_device(MODES["int8"], "cpu", None)


def test_on_a_cpu_auto_is_full_and_gpu_only_modes_are_refused(tiny_model_dir: Path) -> None:
    settings = Settings(model_id=str(tiny_model_dir), max_batch_images=8)
    plan = plan_memory(settings, "cpu")
    assert plan.mode.name == "full" and plan.max_batch_images == 8 and plan.weight_bytes is None
    assert plan_memory(replace(settings, memory_mode="int8"), "cpu").mode.name == "int8"
    with pytest.raises(MemoryModeError, match="MEMORY_MODE=nf4 needs a CUDA GPU"):
        plan_memory(replace(settings, memory_mode="nf4"), "cpu")


def test_the_shape_is_read_from_the_checkpoint_without_loading_weights(tiny_model_dir: Path) -> None:
    pipe, _ = load_pipeline(Settings(model_id=str(tiny_model_dir), memory_mode="full"))
    assert shape_of_checkpoint(str(tiny_model_dir)) == shape_of_pipeline(pipe)
    without_t5 = shape_of_checkpoint(str(tiny_model_dir), drop=("text_encoder_3",))
    assert "text_encoder_3" not in without_t5.components


@pytest.fixture(scope="module")
def full_pipe(tiny_model_dir: Path) -> Any:
    return load_pipeline(Settings(model_id=str(tiny_model_dir), memory_mode="full"))[0]


@pytest.fixture(scope="module")
def int8_pipe(tiny_model_dir: Path) -> Any:
    return load_pipeline(Settings(model_id=str(tiny_model_dir), memory_mode="int8"))[0]


def test_int8_loads_through_torchao_and_stays_close_to_full(full_pipe: Any, int8_pipe: Any) -> None:
    from torchao.utils import TorchAOBaseTensor

    for name in ("transformer", "text_encoder_3"):
        linears = [m for m in getattr(int8_pipe, name).modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears), name
    assert not isinstance(int8_pipe.text_encoder.text_model.encoder.layers[0].mlp.fc1.weight, TorchAOBaseTensor)
    full_sizes, int8_sizes = component_bytes(full_pipe), component_bytes(int8_pipe)
    assert int8_sizes["transformer"] < full_sizes["transformer"] / 2, "int8 weights take less than bf16's half"

    full = PipelineRunner(full_pipe)([PARAMS])[0][0].astype(int)
    runner = PipelineRunner(int8_pipe)
    first, again = (runner([PARAMS])[0][0].astype(int) for _ in range(2))
    other_seed = PipelineRunner(full_pipe)([replace(PARAMS, seed=4)])[0][0].astype(int)
    assert np.array_equal(first, again), "same seed and mode, same image"
    assert 0 < np.abs(first - full).mean() < 3, "int8 differs from full only slightly"
    assert np.abs(other_seed - full).mean() > 20, "while another seed is another image"


def test_int8_batches_and_edits_share_the_quantized_weights(int8_pipe: Any) -> None:
    from torchao.utils import TorchAOBaseTensor

    runner = PipelineRunner(int8_pipe)
    solo = [runner([replace(PARAMS, seed=s)])[0][0].astype(int) for s in (5, 6)]
    batched = runner([replace(PARAMS, seed=5), replace(PARAMS, seed=6)])
    # bf16 arithmetic (which quantized modes compute in) is more sensitive to
    # batch-size-dependent kernels than float32's ±1/255: each image stays its
    # own seed's, within a few levels on a few pixels.
    for alone, together, other in zip(solo, (batched[0][0], batched[1][0]), reversed(solo), strict=True):
        difference = np.abs(alone - together.astype(int))
        assert difference.mean() < 1 and difference.max() <= 8
        assert np.abs(other - together.astype(int)).mean() > 20
    edit = replace(PARAMS, init_image=solo[0].astype(np.uint8), strength=0.6)
    edited = runner([edit])[0][0]
    assert edited.shape == (64, 64, 3) and not np.array_equal(edited, solo[0])
    for mode in ("img2img", "inpaint"):
        shared = runner.pipeline_for(mode)
        assert shared.transformer is int8_pipe.transformer and shared.text_encoder_3 is int8_pipe.text_encoder_3
    assert isinstance(int8_pipe.transformer.transformer_blocks[0].attn.to_q.weight, TorchAOBaseTensor)


def test_int8_streams_previews(int8_pipe: Any) -> None:
    previews: list[tuple[int, int]] = []
    streaming = replace(PARAMS, partial_images=2, on_preview=lambda image, index, _: previews.append((image, index)))
    PipelineRunner(int8_pipe)([streaming])
    assert previews == [(0, 0), (0, 1)]


def test_health_reports_the_resolved_mode_and_weight_bytes(tiny_model_dir: Path) -> None:
    with service_client({"MODEL_ID": str(tiny_model_dir), "WARMUP": "false"}) as client:
        body = client.get("/health").json()
        assert body["memory_mode"] == "full", "auto is full on a CPU"
        assert body["weight_bytes"] > 0


def test_a_gpu_only_mode_on_a_cpu_leaves_the_reason_in_health(tiny_model_dir: Path) -> None:
    with service_client({"MODEL_ID": str(tiny_model_dir), "WARMUP": "false", "MEMORY_MODE": "nf4"}, ready=False) as c:
        deadline = time.monotonic() + 60
        while "failed" not in (c.get("/health").json().get("detail") or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        health = c.get("/health")
        assert health.status_code == 503
        assert "MEMORY_MODE=nf4 needs a CUDA GPU" in health.json()["detail"]
        refused = c.post("/v1/images/generations", json={"prompt": "a cat", "size": "256x256"})
        assert refused.status_code == 503 and "MEMORY_MODE=nf4 needs a CUDA GPU" in refused.json()["error"]["message"]


def test_the_engine_applies_the_plan_before_loading(tiny_model_dir: Path) -> None:
    seen: list[Settings] = []

    def loader(settings: Settings, worker_index: int) -> tuple[Any, str]:
        seen.append(settings)
        return load_pipeline(settings, worker_index)

    engine = GenerationEngine(Settings(model_id=str(tiny_model_dir), warmup=False, memory_mode="int8"), loader=loader)
    engine.start()
    try:
        images = asyncio.run(_wait_and_generate(engine))
        assert images[0].shape == (64, 64, 3)
        assert seen[0].memory_mode == "int8" and engine.memory_mode == "int8"
        assert engine.weight_bytes is not None and engine.weight_bytes > 0
    finally:
        engine.close()


async def _wait_and_generate(engine: GenerationEngine) -> list[np.ndarray]:
    for _ in range(600):
        if engine.ready:
            return await engine.generate(PARAMS)
        await asyncio.sleep(0.05)
    raise AssertionError(engine.status)


def test_int8_with_cache_dit_caches_a_step_deterministically(tiny_model_dir: Path, int8_pipe: Any) -> None:
    from sd35.acceleration import cached_steps

    pipe, _ = load_pipeline(Settings(model_id=str(tiny_model_dir), memory_mode="int8", enable_cache_dit=True))
    runner = PipelineRunner(pipe)
    first = runner([PARAMS])[0][0]
    assert cached_steps(pipe) == [2]
    runner([replace(PARAMS, seed=9, width=80)])
    assert np.array_equal(runner([PARAMS])[0][0], first), "same seed, same image, with the cache on"


def test_int8_with_torch_compile_matches_eager(tiny_model_dir: Path, int8_pipe: Any) -> None:
    pipe, _ = load_pipeline(Settings(model_id=str(tiny_model_dir), memory_mode="int8", torch_compile="blocks"))
    compiled = PipelineRunner(pipe)([PARAMS])[0][0].astype(int)
    eager = PipelineRunner(int8_pipe)([PARAMS])[0][0].astype(int)
    assert np.abs(compiled - eager).mean() < 1


def test_lora_adapters_apply_on_quantized_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    from torchao.utils import TorchAOBaseTensor

    from sd35.config import load_settings
    from sd35.tiny import write_tiny_lora

    lora = write_tiny_lora(tmp_path / "style", seed=1)
    env = {"MODEL_ID": str(tiny_model_dir), "MEMORY_MODE": "int8", "LORA_ADAPTERS": f"style={lora}"}
    pipe, _ = load_pipeline(load_settings(env))
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base_layer.weight, TorchAOBaseTensor), "the LoRA wraps the int8 layer, not a copy"
    runner = PipelineRunner(pipe)
    base = runner([PARAMS])[0][0].astype(int)
    styled = runner([replace(PARAMS, adapter="style", lora_scale=1.0)])[0][0].astype(int)
    assert np.abs(styled - base).mean() > 2, "the adapter changes the int8 image"
    assert np.array_equal(runner([PARAMS])[0][0].astype(int), base), "and switching back gives the base image"
