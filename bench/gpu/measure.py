"""Running one scenario: the real service over HTTP, a simulated smaller card, or batched against solo images.

Every scenario serves the random checkpoint through the real service
(BentoML's ASGI app behind uvicorn in this process, ``bench.harness``) or, for
``batching``, through the engine's own pipeline runner. Whatever a scenario
raises (OOM, a compile error, a refused mode) becomes its result, not the end
of the window.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from bench import harness
from bench.gpu import checkpoint
from bench.gpu.arch import auto_pick
from bench.gpu.scenarios import Scenario, mode_skip_reason, skip_reason
from sd35 import acceleration
from sd35.config import Settings
from sd35.engine import loading
from sd35.engine.memory import GIB, MemoryModeError, component_bytes, plan_memory

QUALITY_SEED = 1000
BATCH_SEED = 2000
# The service's loader, kept before harness.serve puts the recording one in its place.
LOAD_PIPELINE = loading.load_pipeline

# Every knob is set in every scenario, so a variable left in the caller's shell
# cannot leak into a configuration; API_KEY empty means no auth.
BASE_ENV = {
    "WARMUP": "true",
    "MEMORY_MODE": "full",
    "TORCH_COMPILE": "off",
    "VAE_CHANNELS_LAST": "false",
    "ENABLE_CACHE_DIT": "false",
    "API_KEY": "",
    "WORKERS": "1",
}


@dataclass
class Context:
    """What every scenario of one window shares."""

    args: argparse.Namespace
    checkpoint: Path
    device: str
    capability: tuple[int, int] | None
    # The full-size architecture: what a smaller card's auto would pick for it, on a CPU.
    full_arch: dict[str, Any]
    references: checkpoint.References
    baseline_images: list[np.ndarray] | None = field(default=None)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def body(self, **overrides: Any) -> dict[str, Any]:
        return {
            "prompt": self.args.prompt,
            "n": 1,
            "size": f"{self.args.size}x{self.args.size}",
            "num_inference_steps": self.args.steps,
            "output_format": self.args.output_format,
            **overrides,
        }

    def env(self, scenario: Scenario, **overrides: str) -> dict[str, str]:
        return {
            **BASE_ENV,
            "MODEL_ID": str(self.checkpoint),
            "DEVICE": self.args.device,
            "DEFAULT_NUM_INFERENCE_STEPS": str(self.args.steps),
            "LOG_LEVEL": self.args.log_level,
            **dict(self.args.env),
            **scenario.env,
            **overrides,
        }


def run_scenario(scenario: Scenario, ctx: Context) -> dict[str, Any]:
    """The scenario's result: ``status`` is ``ok``, ``failed`` (with ``error``) or ``skipped`` (with ``skipped``)."""
    result: dict[str, Any] = {"scenario": scenario.name, "about": scenario.about, "kind": scenario.kind}
    result["knobs"] = {key: value for key, value in ctx.env(scenario).items() if key in BASE_ENV and key != "API_KEY"}
    started = time.perf_counter()
    record: dict[str, Any] = {}
    reason = skip_reason(scenario, ctx.device, ctx.capability)
    try:
        if reason is None:
            runner = {"serve": _serve, "cap": _cap, "batching": _batching}[scenario.kind]
            reason = runner(scenario, ctx, result, record)
        result["status"] = "skipped" if reason else ("failed" if result.get("error") else "ok")
        result["skipped"] = reason
    # A failing scenario (OOM, compile error, a bad variable: service.py exits on
    # those) is a result, not the end of the window.
    except (Exception, SystemExit) as exc:
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}".strip()
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            result["error"] = "CUDA out of memory: " + str(exc).splitlines()[0]
        result["traceback"] = traceback.format_exc(limit=8)
    finally:
        _release(record)
    result["seconds"] = time.perf_counter() - started
    return result


# --- serving over HTTP --------------------------------------------------------------


def recording_loader(record: dict[str, Any]) -> Callable[[Settings, int], tuple[Any, str]]:
    """``load_pipeline`` itself, timed; the pipeline goes into ``record``, to time it bare and to free it."""

    def loader(settings: Settings, worker_index: int = 1) -> tuple[Any, str]:
        started = time.perf_counter()
        pipe, device = LOAD_PIPELINE(settings, worker_index)
        record.update(
            pipeline=pipe, device=device, memory_mode=settings.memory_mode, cache_dit=settings.enable_cache_dit
        )
        record["max_batch_images"] = settings.max_batch_images
        record["weight_gib"] = sum(component_bytes(pipe).values()) / GIB
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            record["vram_after_load_gib"] = torch.cuda.memory_allocated(device) / GIB
        record["load_s"] = time.perf_counter() - started
        return pipe, device

    return loader


@contextlib.contextmanager
def _served(
    scenario: Scenario, ctx: Context, result: dict[str, Any], record: dict[str, Any], **env: str
) -> Iterator[str]:
    """The service up on the checkpoint; load and warm-up figures go into ``result``."""
    if ctx.on_cuda:
        # Anything still allocated here was left by an earlier scenario.
        result["vram_before_gib"] = torch.cuda.memory_allocated(ctx.device) / GIB
        torch.cuda.reset_peak_memory_stats(ctx.device)
    started = time.perf_counter()
    with harness.serve(ctx.env(scenario, **env), loader=recording_loader(record)) as base_url:
        result["ready_s"] = time.perf_counter() - started
        result["load_s"] = record.get("load_s")
        result["warmup_s"] = result["ready_s"] - record.get("load_s", 0.0)
        for key in ("device", "memory_mode", "max_batch_images", "weight_gib", "vram_after_load_gib"):
            result[key] = record.get(key)
        if ctx.on_cuda:
            result["vram_peak_load_gib"] = torch.cuda.max_memory_allocated(ctx.device) / GIB
            torch.cuda.reset_peak_memory_stats(ctx.device)
        yield base_url
        if ctx.on_cuda:
            result["vram_peak_traffic_gib"] = torch.cuda.max_memory_allocated(ctx.device) / GIB
            result["vram_reserved_peak_gib"] = torch.cuda.max_memory_reserved(ctx.device) / GIB


def _serve(scenario: Scenario, ctx: Context, result: dict[str, Any], record: dict[str, Any]) -> str | None:
    args = ctx.args
    body = ctx.body()
    with _served(scenario, ctx, result, record) as base_url:
        # Untimed priming. The warm-up ran one image; the first batch of
        # several images still picks kernels, and under torch.compile
        # recompiles (dynamic shapes specialise a batch of 1): a request
        # for 2 images guarantees such a batch, then one concurrent round.
        primed = time.perf_counter()
        harness.load(base_url, {**body, "n": 2}, clients=1, per_client=1)
        harness.load(base_url, body, clients=args.clients, per_client=1)
        result["priming_s"] = time.perf_counter() - primed
        sequential = harness.load(base_url, body, clients=1, per_client=args.sequential)
        result.update(p50_s=sequential.p50, p95_s=sequential.p95)
        concurrent = harness.load(base_url, body, clients=args.clients, per_client=args.per_client)
        result.update(
            images_per_second=concurrent.images_per_second,
            concurrent_requests=concurrent.requests,
            concurrent_seconds=concurrent.seconds,
            concurrent_p50_s=concurrent.p50,
            concurrent_p95_s=concurrent.p95,
        )
        result["statuses"] = _statuses(sequential, concurrent)
        if record.get("cache_dit"):
            result["cached_steps"] = acceleration.cached_steps(record["pipeline"])
        if scenario.bare and "pipeline" in record:
            # The server is idle now: the pipeline is this thread's alone.
            bare = bare_latencies(record["pipeline"], ctx, args.sequential)
            result["bare_p50_s"] = statistics.median(bare)
            result["http_overhead_s"] = result["p50_s"] - result["bare_p50_s"]
        _compare_quality(scenario, ctx, result, quality_images(base_url, ctx))
    result["error"] = _failures(sequential) or _failures(concurrent)
    return None


def bare_latencies(pipe: Any, ctx: Context, count: int) -> list[float]:
    """The bare pipeline call (``output_type="pt"``: denoising and VAE decode, no encoding), after one untimed call."""
    args = ctx.args
    latencies = []
    for index in range(count + 1):
        if ctx.on_cuda:
            torch.cuda.synchronize(ctx.device)
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(
                prompt=args.prompt,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=0.0,
                generator=torch.Generator("cpu").manual_seed(index),
                output_type="pt",
            )
        if ctx.on_cuda:
            torch.cuda.synchronize(ctx.device)
        if index:
            latencies.append(time.perf_counter() - started)
    return latencies


def quality_images(base_url: str, ctx: Context) -> list[np.ndarray]:
    """Fixed-seed PNG images of this scenario, to compare with ``baseline``'s."""
    images = []
    with httpx.Client(base_url=base_url, timeout=600) as http:
        for seed in range(ctx.args.quality_seeds):
            response = http.post("/v1/images/generations", json=ctx.body(seed=QUALITY_SEED + seed, output_format="png"))
            response.raise_for_status()
            data = base64.b64decode(response.json()["data"][0]["b64_json"])
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return images


def _compare_quality(scenario: Scenario, ctx: Context, result: dict[str, Any], images: list[np.ndarray]) -> None:
    if scenario.name == "baseline":
        ctx.baseline_images = images
        ctx.references.save(images)
        return
    reference = ctx.baseline_images if ctx.baseline_images is not None else ctx.references.load()
    if reference is not None:
        result["quality_vs_baseline"] = compare(images, reference)


def compare(images: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """Mean absolute difference (of 255) and PSNR (dB) against the reference images, over all seeds."""
    diff = np.stack(images).astype(np.float64) - np.stack(reference).astype(np.float64)
    mse = float(np.mean(diff**2))
    return {"mad": float(np.mean(np.abs(diff))), "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)}


def _statuses(*loads: harness.LoadResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for load in loads:
        for status, count in load.statuses.items():
            counts[str(status)] = counts.get(str(status), 0) + count
    return counts


def _failures(result: harness.LoadResult) -> str | None:
    bad = {status: count for status, count in result.statuses.items() if status != 200}
    if not bad:
        return None
    return f"{sum(bad.values())} of {result.requests} requests failed (HTTP status: count {bad})"


# --- MEMORY_MODE=auto on a smaller card ---------------------------------------------


@contextlib.contextmanager
def memory_cap(device: str, gib: float) -> Iterator[None]:
    """PyTorch's allocator capped to ``gib`` on ``device`` (the CUDA context is outside the cap, as on a real card
    it is outside the memory PyTorch can use)."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _cap(scenario: Scenario, ctx: Context, result: dict[str, Any], record: dict[str, Any]) -> str | None:
    assert scenario.cap_gib is not None
    gib = scenario.cap_gib
    if not ctx.on_cuda:
        # No allocator to cap: what auto picks on such a card is computed for
        # the full-size model, and the served model runs in that mode here.
        mode, reason = auto_pick(ctx.full_arch, gib)
        result.update(auto_mode=mode, plan=reason, simulated="computed for the full-size model; no GPU to cap")
        return _serve_in_mode(scenario, ctx, result, record, mode, MEMORY_MODE=mode)
    total = torch.cuda.get_device_properties(ctx.device).total_memory / GIB
    if gib >= total:
        return f"the card has {total:.0f} GiB, not more than the {gib} GiB cap"
    with memory_cap(ctx.device, gib):
        settings = Settings(model_id=str(ctx.checkpoint), device=ctx.device, memory_mode="auto")
        try:
            plan = plan_memory(settings, ctx.device)
        except MemoryModeError as exc:  # nothing fits: that is the answer
            result.update(auto_mode="none", plan=str(exc))
            return None
        result.update(auto_mode=plan.mode.name, plan=plan.reason, plan_notes=list(plan.notes))
        return _serve_in_mode(scenario, ctx, result, record, plan.mode.name)


def _serve_in_mode(
    scenario: Scenario, ctx: Context, result: dict[str, Any], record: dict[str, Any], mode: str, **env: str
) -> str | None:
    """Serve ``scenario`` (its MEMORY_MODE, or ``env``'s) with a burst of clients that the engine batches;
    the point is whether it fits, so nothing is timed but the load."""
    if mode == "none":
        return None
    missing = mode_skip_reason(mode, ctx.device, ctx.capability)
    if missing:
        return f"auto picks {mode}, which cannot run here: {missing}"
    with _served(scenario, ctx, result, record, **env) as base_url:
        burst = harness.load(base_url, ctx.body(), clients=ctx.args.clients, per_client=1)
        result.update(images_per_second=burst.images_per_second, concurrent_p50_s=burst.p50)
        result["statuses"] = _statuses(burst)
        if ctx.on_cuda:
            result["within_cap"] = torch.cuda.max_memory_reserved(ctx.device) <= (scenario.cap_gib or 0) * GIB
    if record.get("memory_mode") != mode:
        result["error"] = f"the plan said {mode} but the service loaded {record.get('memory_mode')}"
    else:
        result["error"] = _failures(burst)
    return None


# --- batched against solo ---------------------------------------------------------


def _batching(scenario: Scenario, ctx: Context, result: dict[str, Any], record: dict[str, Any]) -> str | None:
    """The engine's own runner: each seed alone, then all in one call; the pixel differences in the serving
    dtype (bf16 on a GPU), and on a CPU in bf16 too, which a GPU serves in."""
    from sd35.engine.calls import PipelineRunner
    from sd35.engine.params import GenerationParams

    args = ctx.args
    settings = Settings(model_id=str(ctx.checkpoint), device=args.device, memory_mode="full", warmup=False)
    pipe, _ = LOAD_PIPELINE(settings)
    record["pipeline"] = pipe
    runner = PipelineRunner(pipe)
    batch = [
        GenerationParams(args.prompt, args.size, args.size, 1, BATCH_SEED + i, args.steps, 0.0)
        for i in range(args.batch_images)
    ]
    result["batch_images"] = len(batch)
    result["size"] = args.size
    dtypes = [pipe.dtype] if ctx.on_cuda else [pipe.dtype, torch.bfloat16]
    result["by_dtype"] = {}
    for dtype in dtypes:
        pipe.to(dtype=dtype)
        runner([batch[0]])  # untimed: the first call picks kernels
        solo = [runner([params])[0][0] for params in batch]
        batched = [images[0] for images in runner(batch)]
        result["by_dtype"][str(dtype).removeprefix("torch.")] = batch_difference(solo, batched)
    result["error"] = None
    return None


def batch_difference(solo: list[np.ndarray], batched: list[np.ndarray]) -> dict[str, float]:
    """How far batched images are from the same seeds alone, in 8-bit levels (of 255)."""
    diff = np.abs(np.stack(solo).astype(np.int16) - np.stack(batched).astype(np.int16))
    return {
        "max_abs": int(diff.max()),
        "mean_abs": float(diff.mean()),
        "share_differing": float(np.mean(diff > 0)),
        "share_above_1": float(np.mean(diff > 1)),
    }


def _release(record: dict[str, Any]) -> None:
    pipe = record.pop("pipeline", None)
    if pipe is None:
        return
    if record.get("cache_dit"):
        import cache_dit

        with contextlib.suppress(Exception):
            cache_dit.disable_cache(pipe)  # its context holds the cached residuals
    checkpoint.free(pipe)
