"""GPU benchmark of the real service on the full-size SD3.5 Large architecture with random weights.

It builds SD3.5 Large from its published component configurations
(``shared/reference/sd35-large-architecture.json``: the MMDiT transformer,
the VAE, CLIP-L, CLIP-G and the T5-XXL encoder) with random bf16 weights made
directly on the GPU: the same shapes, so the same FLOPs and memory as the real
model, with no download and no gated licence. Each scenario then serves it
through the real service (BentoML's ASGI app behind uvicorn, ``bench.harness``)
with one set of engine knobs, and measures over HTTP:

* p50/p95 latency of sequential n=1 requests (default 1024², 4 steps);
* images/s with 16 concurrent clients (the engine batches them);
* GPU memory after loading, and the peak during load + warm-up and during traffic;
* load and warm-up time.

The random weights are saved once as a diffusers checkpoint (``--checkpoint``,
reused while the architecture holds) and every scenario loads it with the
service's own ``load_pipeline``, quantization included. Scenarios: baseline
(bf16, everything resident), cache_dit, compile (TORCH_COMPILE=blocks),
channels_last (VAE), the memory modes no_t5, cpu_offload, fp8, int8, nf4,
nf4_no_t5 and auto, and all (compile + cache_dit + channels_last). Each
scenario also renders fixed seeds, compared with baseline's (MAD, PSNR). The targets (1024², 4 steps, on an
H100: p50 ≤ 0.35 s, ≥ 4 images/s with 16 clients) are judged only for a
full-size run on CUDA. Results are printed as a table and appended to
``<out>/gpu-<date>-<device>.json`` and ``.md`` after every scenario, so a run
cut short keeps what it finished.

On a GPU machine, from the repository root (split the scenarios across
commands to stay within a time limit: each scenario builds ~27 GB of weights,
warms up, and compile scenarios compile for minutes; runs on the same day and
GPU accumulate in the same files):

    python -m bench.gpu --scenarios baseline,cache_dit
    python -m bench.gpu --scenarios compile

On a CPU, tiny shapes (the sizes of ``sd35.tiny``), 256² images and a handful
of requests check the whole script in seconds:

    python -m bench.gpu --tiny --quick

``python -m bench.gpu --describe`` only prints the parameter counts (no GPU needed).
Nothing is downloaded: the weights are random and the tokenizers are built
offline. The exit status is 1 when any scenario failed (its error is recorded).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import datetime as dt
import gc
import hashlib
import inspect
import io
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from bench import harness
from sd35 import acceleration, tiny
from sd35.config import Settings
from sd35.engine import loading
from sd35.engine.loading import resolve_device
from sd35.engine.memory import AUTO_ORDER, GIB, MODES, MemoryModeError, component_bytes, fit, shape_of_pipeline

ROOT = Path(__file__).resolve().parent.parent
ARCH_NAME = "sd35-large-architecture.json"
# The published configurations: a copy next to this script if there is one,
# else the shared reference folder inside or beside the checkout.
ARCH_CANDIDATES = (
    ROOT / "bench" / ARCH_NAME,
    ROOT / "shared" / "reference" / ARCH_NAME,
    ROOT.parent / "shared" / "reference" / ARCH_NAME,
)
DEFAULT_ARCH = next((path for path in ARCH_CANDIDATES if path.is_file()), ARCH_CANDIDATES[-1])
DEFAULT_OUT = ROOT / "bench" / "results"

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")

TARGET_P50_S = 0.35
TARGET_IMAGES_PER_SECOND = 4.0
TARGET_SIZE = 1024
TARGET_STEPS = 4
TARGET_CLIENTS = 16

PROMPT = "an astronaut riding a horse on the moon, photograph"
QUALITY_SEED = 1000  # < 77 tokens even spelled out by byte


@dataclass(frozen=True)
class Scenario:
    name: str
    env: dict[str, str]
    about: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("baseline", {}, "bf16, every component resident on the GPU"),
        Scenario("cache_dit", {"ENABLE_CACHE_DIT": "true"}, "cache-dit: step 2 of 4 mostly from the cache"),
        Scenario("compile", {"TORCH_COMPILE": "blocks"}, "torch.compile of each transformer block"),
        Scenario("channels_last", {"VAE_CHANNELS_LAST": "true"}, "VAE in channels_last layout"),
        Scenario("no_t5", {"MEMORY_MODE": "no_t5"}, "T5-XXL dropped: CLIP-only prompts"),
        Scenario("cpu_offload", {"MEMORY_MODE": "cpu_offload"}, "one component on the GPU at a time"),
        Scenario("fp8", {"MEMORY_MODE": "fp8"}, "transformer in float8 (torchao, dynamic activations)"),
        Scenario("int8", {"MEMORY_MODE": "int8"}, "transformer and T5 in int8 weight-only (torchao)"),
        Scenario("nf4", {"MEMORY_MODE": "nf4"}, "transformer and T5 in NF4 (bitsandbytes)"),
        Scenario("nf4_no_t5", {"MEMORY_MODE": "nf4_no_t5"}, "NF4 transformer, T5 dropped"),
        Scenario("auto", {"MEMORY_MODE": "auto"}, "whatever MEMORY_MODE=auto picks on this GPU"),
        Scenario(
            "all",
            {"TORCH_COMPILE": "blocks", "ENABLE_CACHE_DIT": "true", "VAE_CHANNELS_LAST": "true"},
            "compile + cache_dit + channels_last",
        ),
    )
}

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


# --- building the architecture ----------------------------------------------


def load_arch(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def tiny_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """The same component layout with the small shapes of ``sd35.tiny``: runs on a CPU in seconds.

    Vocabularies keep their published sizes (cheap at these widths), so the
    token ids are checked against the same limits as in the full-size run.
    """
    small = copy.deepcopy(arch)
    small["transformer"].update(
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=tiny.T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * tiny.CLIP_PROJECTION,
        pos_embed_max_size=tiny.POS_EMBED_MAX_SIZE,
        dual_attention_layers=[],
    )
    small["vae"].update(block_out_channels=[8, 8, 8, 8], norm_num_groups=4, layers_per_block=1)
    for name in ("text_encoder", "text_encoder_2"):
        small[name].update(
            hidden_size=tiny.CLIP_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=tiny.CLIP_PROJECTION,
        )
    small["text_encoder_3"].update(d_model=tiny.T5_WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=4)
    return small


def accepted(kind: Callable[..., Any], config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``config`` that ``kind``'s constructor takes.

    ``_class_name`` and other bookkeeping keys go silently; any other key that
    is dropped is reported, since a dropped shape key would build the wrong model.
    """
    parameters = set(inspect.signature(kind).parameters) - {"self", "kwargs"}
    kept = {key: value for key, value in config.items() if key in parameters}
    dropped = sorted(key for key in config if key not in kept and not key.startswith("_"))
    if dropped:
        print(f"warning: {getattr(kind, '__name__', kind)} takes no {', '.join(dropped)}; ignored", flush=True)
    return kept


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created in the target dtype from the start: an fp32
    # transformer would need 32 GB before it could be cast to bf16.
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def check_sequence_lengths(arch: dict[str, Any], clip_length: int) -> None:
    """The text encoders must see the real model's sequence lengths, or their FLOPs differ.

    CLIP prompts are padded to the tokenizer's model_max_length; T5 prompts to
    the pipeline's ``max_sequence_length``, which the engine leaves at its default.
    """
    published = arch.get("pipeline_defaults", {})
    t5_length = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["max_sequence_length"].default
    expected = (
        published.get("clip_max_sequence_length", clip_length),
        published.get("t5_max_sequence_length", t5_length),
    )
    if (clip_length, t5_length) != expected:
        raise ValueError(f"sequence lengths (CLIP, T5) {(clip_length, t5_length)} differ from the published {expected}")


def build_random_pipeline(
    arch: dict[str, Any], device: str, dtype: torch.dtype, *, with_t5: bool = True, seed: int = 0
) -> StableDiffusion3Pipeline:
    """SD3 pipeline of the shapes in ``arch`` with random weights made on ``device`` in ``dtype``.

    ``device="meta"`` allocates nothing: for parameter counts and sizes. The
    tokenizers are the offline ones of ``sd35.tiny``: their ids fit the real
    vocabularies and they pad to 77 (CLIP) and 256 (T5) tokens like the real
    ones, so every encoder sees sequences of the real length.
    """
    clip_tokenizers = [tiny.clip_tokenizer(), tiny.clip_tokenizer()]
    t5_tokenizer = tiny.t5_tokenizer(0) if with_t5 else None
    check_sequence_lengths(arch, clip_tokenizers[0].model_max_length)
    clip_configs = []
    for name, tokenizer in zip(("text_encoder", "text_encoder_2"), clip_tokenizers, strict=True):
        if len(tokenizer) > arch[name]["vocab_size"]:
            raise ValueError(f"{name}: the offline tokenizer has more ids than the vocabulary")
        clip_configs.append(
            CLIPTextConfig(
                **accepted(CLIPTextConfig, arch[name]),
                # Pooling reads the first end-of-text token: the tokenizer's id, not the real vocabulary's.
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    if t5_tokenizer is not None and len(t5_tokenizer) > arch["text_encoder_3"]["vocab_size"]:
        raise ValueError("text_encoder_3: the offline tokenizer has more ids than the vocabulary")

    rng_devices = [device] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), default_dtype(dtype):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**accepted(SD3Transformer2DModel, arch["transformer"]))
        vae = AutoencoderKL(**accepted(AutoencoderKL, arch["vae"]))
        text_encoders = [CLIPTextModelWithProjection(config) for config in clip_configs]
        text_encoder_3 = T5EncoderModel(T5Config(**accepted(T5Config, arch["text_encoder_3"]))) if with_t5 else None
    # eval() as from_pretrained leaves them; .to(dtype) as from_pretrained does,
    # for buffers made in float32 whatever the default (the positional embedding).
    # nn.Module.to, not diffusers' override, which warns about every cast.
    for module in (transformer, vae, *text_encoders, text_encoder_3):
        if module is not None:
            torch.nn.Module.to(module, dtype).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        text_encoder_3=text_encoder_3,
        tokenizer=clip_tokenizers[0],
        tokenizer_2=clip_tokenizers[1],
        tokenizer_3=t5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**accepted(FlowMatchEulerDiscreteScheduler, arch["scheduler"])),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(arch: dict[str, Any]) -> dict[str, int]:
    """Parameters per component of ``arch``, counted on the meta device (no memory)."""
    pipe = build_random_pipeline(arch, "meta", torch.bfloat16)
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in COMPONENTS}


def describe(arch: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> dict[str, dict[str, int]]:
    """Parameters and bytes (parameters and buffers, in ``dtype``) per component."""
    pipe = build_random_pipeline(arch, "meta", dtype)
    sizes = component_bytes(pipe)
    return {
        name: {"params": sum(p.numel() for p in getattr(pipe, name).parameters()), "bytes": sizes[name]}
        for name in COMPONENTS
    }


def components_table(components: dict[str, dict[str, int]], dtype_name: str) -> str:
    rows = [f"| component | parameters | billions | {dtype_name} GiB |", "|---|---:|---:|---:|"]
    for name, info in components.items():
        rows.append(f"| {name} | {info['params']:,} | {info['params'] / 1e9:.3f} | {info['bytes'] / GIB:.3f} |")
    total_params = sum(info["params"] for info in components.values())
    total_bytes = sum(info["bytes"] for info in components.values())
    rows.append(f"| **total** | {total_params:,} | {total_params / 1e9:.3f} | {total_bytes / GIB:.3f} |")
    return "\n".join(rows)


# GPU memory sizes of common cards, in GiB, and what the driver and CUDA
# context leave unavailable on each.
CARDS_GIB = (12, 16, 24, 40, 48, 80)
CONTEXT_GIB = 0.6


def memory_modes_table(arch: dict[str, Any], max_batch_images: int = 8) -> str:
    """Every memory mode: its weights on the GPU (computed from ``arch``) and which cards it fits."""
    shape = shape_of_pipeline(build_random_pipeline(arch, "meta", torch.bfloat16))
    header = " | ".join(f"{gib} GB" for gib in CARDS_GIB)
    rows = [
        f"| MEMORY_MODE | transformer | T5-XXL | CLIP-L + CLIP-G | VAE | on the GPU | {header} |",
        "|---|---:|---:|---:|---:|---:|" + "---|" * len(CARDS_GIB),
    ]
    for name, mode in MODES.items():
        sizes = shape.weight_bytes(mode)
        cells = []
        for gib in CARDS_GIB:
            free = int((gib - CONTEXT_GIB) * GIB)
            try:
                plan = fit(name, shape, free, max_batch_images)
            except MemoryModeError:
                cells.append("no")
                continue
            cells.append("yes" if plan.max_batch_images == max_batch_images else f"batch ≤ {plan.max_batch_images}")

        def size(component: str, sizes: dict[str, int] = sizes) -> str:
            return f"{sizes[component] / GIB:.1f}" if component in sizes else "—"

        clip = (sizes["text_encoder"] + sizes["text_encoder_2"]) / GIB
        on_gpu = shape.resident_bytes(mode) / GIB
        rows.append(
            f"| `{name}` | {size('transformer')} | {size('text_encoder_3')} | {clip:.1f} | {size('vae')} "
            f"| {on_gpu:.1f}{' (largest component)' if mode.offload else ''} | {' | '.join(cells)} |"
        )
    picks = []
    for gib in CARDS_GIB:
        plan = fit("auto", shape, int((gib - CONTEXT_GIB) * GIB), max_batch_images)
        picks.append(f"{gib} GB → `{plan.mode.name}`")
    working = shape.working_bytes(max_batch_images) / GIB
    return "\n".join(
        [
            *rows,
            "",
            f"GiB of weights; a card fits a mode when the weights plus the working memory of a batch of "
            f"{max_batch_images} images at 1024² ({working:.1f} GiB with the VAE decoding one image at a time) fit in "
            f"the card's memory less {CONTEXT_GIB} GiB for the CUDA context; 'batch ≤ N' means MAX_BATCH_IMAGES is "
            f"capped to N there. MEMORY_MODE=auto tries {', '.join(AUTO_ORDER)}: {'; '.join(picks)}.",
        ]
    )


# --- the checkpoint: random weights on disk, loaded by the service's own loader ---

# The service's loader, kept before harness.serve puts the recording one in its place.
LOAD_PIPELINE = loading.load_pipeline


def save_random_checkpoint(arch: dict[str, Any], directory: Path, device: str, dtype: torch.dtype) -> Path:
    """A diffusers checkpoint of ``arch`` with random weights (seed 0), reused while ``arch`` and ``dtype`` hold.

    Every scenario then loads it through ``load_pipeline`` exactly as a real
    checkpoint is loaded, quantization included: the benchmark measures the
    service's own loading path, not a copy of it.
    """
    stamp = {"arch": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(), "dtype": str(dtype)}
    marker = directory / "sd35-random-checkpoint.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        log(f"reusing the random checkpoint in {directory}")
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    started = time.perf_counter()
    pipe = build_random_pipeline(arch, device, dtype)
    pipe.save_pretrained(directory)
    marker.write_text(json.dumps(stamp))
    release({"pipeline": pipe})
    log(f"saved a random checkpoint to {directory} in {time.perf_counter() - started:.0f} s")
    return directory


def recording_loader(record: dict[str, Any]) -> Callable[[Settings, int], tuple[Any, str]]:
    """``load_pipeline`` itself, timed; the pipeline goes into ``record`` so the scenario can free it."""

    def loader(settings: Settings, worker_index: int = 1) -> tuple[Any, str]:
        started = time.perf_counter()
        pipe, device = LOAD_PIPELINE(settings, worker_index)
        record.update(pipeline=pipe, device=device, memory_mode=settings.memory_mode)
        record["max_batch_images"] = settings.max_batch_images
        record["weight_gib"] = sum(component_bytes(pipe).values()) / GIB
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
            record["vram_after_load_gib"] = torch.cuda.memory_allocated(device) / GIB
        record["load_s"] = time.perf_counter() - started
        return pipe, device

    return loader


# --- quality against full on the same seeds ---------------------------------


def quality_images(base_url: str, args: argparse.Namespace) -> list[np.ndarray]:
    """Fixed-seed images of this scenario, to compare with ``baseline``'s."""
    images = []
    with httpx.Client(base_url=base_url, timeout=600) as http:
        for seed in range(args.quality_seeds):
            body = {
                "prompt": args.prompt,
                "size": f"{args.size}x{args.size}",
                "num_inference_steps": args.steps,
                "seed": QUALITY_SEED + seed,
                "output_format": "png",
            }
            response = http.post("/v1/images/generations", json=body)
            response.raise_for_status()
            data = base64.b64decode(response.json()["data"][0]["b64_json"])
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return images


def compare(images: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    """Mean absolute difference (of 255) and PSNR (dB) against the reference images, over all seeds."""
    diff = np.stack(images).astype(np.float64) - np.stack(reference).astype(np.float64)
    mse = float(np.mean(diff**2))
    return {"mad": float(np.mean(np.abs(diff))), "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)}


def release(record: dict[str, Any]) -> None:
    """Free the scenario's pipeline even if something still holds the object.

    The engine's worker thread and BentoML's service instance may outlive the
    server; moving every module to "meta" drops the tensors' storage anyway.
    """
    pipe = record.pop("pipeline", None)
    if pipe is not None:
        with contextlib.suppress(Exception):
            pipe.remove_all_hooks()  # accelerate's offload hooks hold modules
        if record.get("cache_dit"):
            import cache_dit

            with contextlib.suppress(Exception):
                cache_dit.disable_cache(pipe)  # its context holds the cached residuals
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                with contextlib.suppress(Exception):
                    component.to("meta")
    del pipe
    # Compiled graphs keep references to the parameters they were traced with.
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- running a scenario ------------------------------------------------------


def failures(result: harness.LoadResult) -> str | None:
    bad = {status: count for status, count in result.statuses.items() if status != 200}
    if not bad:
        return None
    return f"{sum(bad.values())} of {result.requests} requests failed (HTTP status: count {bad})"


def run_scenario(
    scenario: Scenario, args: argparse.Namespace, checkpoint: Path, device: str, references: dict[str, Any]
) -> dict[str, Any]:
    env = {
        **BASE_ENV,
        "MODEL_ID": str(checkpoint),
        "DEVICE": args.device,
        "DEFAULT_NUM_INFERENCE_STEPS": str(args.steps),
        "LOG_LEVEL": args.log_level,
        **dict(args.env),
        **scenario.env,
    }
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "about": scenario.about,
        "knobs": {key: env[key] for key in ("MEMORY_MODE", "TORCH_COMPILE", "VAE_CHANNELS_LAST", "ENABLE_CACHE_DIT")},
        "ok": False,
        "error": None,
    }
    body = {
        "prompt": args.prompt,
        "n": 1,
        "size": f"{args.size}x{args.size}",
        "num_inference_steps": args.steps,
        "output_format": args.output_format,
    }
    record: dict[str, Any] = {}
    if device.startswith("cuda"):
        # Anything still allocated here was left by an earlier scenario.
        result["vram_before_gib"] = torch.cuda.memory_allocated(device) / GIB
        if result["vram_before_gib"] > 0.5:
            log(f"  warning: {result['vram_before_gib']:.1f} GiB still allocated from earlier scenarios")
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        with harness.serve(env, loader=recording_loader(record)) as base_url:
            result["ready_s"] = time.perf_counter() - started
            result["load_s"] = record.get("load_s")
            result["warmup_s"] = result["ready_s"] - record.get("load_s", 0.0)
            on_cuda = device.startswith("cuda")
            result["device"] = record.get("device")
            result["memory_mode"] = record.get("memory_mode")
            result["max_batch_images"] = record.get("max_batch_images")
            result["weight_gib"] = record.get("weight_gib")
            result["vram_after_load_gib"] = record.get("vram_after_load_gib")
            result["vram_peak_load_gib"] = torch.cuda.max_memory_allocated(device) / GIB if on_cuda else None
            log(
                f"  {scenario.name}: ready in {result['ready_s']:.1f} s (load {result['load_s']:.1f} s); "
                f"{args.sequential} sequential requests"
            )
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            # Untimed priming. The warm-up ran one image; the first batch of
            # several images still picks kernels, and under torch.compile
            # recompiles (dynamic shapes specialise a batch of 1): a request
            # for 2 images guarantees such a batch, then one concurrent round.
            primed = time.perf_counter()
            harness.load(base_url, {**body, "n": 2}, clients=1, per_client=1)
            harness.load(base_url, body, clients=args.clients, per_client=1)
            result["priming_s"] = time.perf_counter() - primed
            sequential = harness.load(base_url, body, clients=1, per_client=args.sequential)
            result["p50_s"] = sequential.p50
            result["p95_s"] = sequential.p95
            result["mean_s"] = sum(sequential.latencies) / len(sequential.latencies)
            log(f"  {scenario.name}: p50 {sequential.p50:.3f} s; {args.clients} clients × {args.per_client}")
            concurrent = harness.load(base_url, body, clients=args.clients, per_client=args.per_client)
            result["images_per_second"] = concurrent.images_per_second
            result["concurrent_requests"] = concurrent.requests
            result["concurrent_seconds"] = concurrent.seconds
            result["concurrent_p50_s"] = concurrent.p50
            result["concurrent_p95_s"] = concurrent.p95
            result["statuses"] = {
                str(status): sequential.statuses.get(status, 0) + concurrent.statuses.get(status, 0)
                for status in {*sequential.statuses, *concurrent.statuses}
            }
            if on_cuda:
                result["vram_peak_traffic_gib"] = torch.cuda.max_memory_allocated(device) / GIB
                result["vram_reserved_peak_gib"] = torch.cuda.max_memory_reserved(device) / GIB
            else:
                result["vram_peak_traffic_gib"] = result["vram_reserved_peak_gib"] = None
            if "pipeline" in record and scenario.env.get("ENABLE_CACHE_DIT") == "true":
                result["cached_steps"] = acceleration.cached_steps(record["pipeline"])
            images = quality_images(base_url, args)
            if scenario.name == "baseline":
                references["baseline"] = images
            elif "baseline" in references:
                result["quality_vs_baseline"] = compare(images, references["baseline"])
            result["error"] = failures(sequential) or failures(concurrent)
            result["ok"] = result["error"] is None
    # A failing scenario (OOM, compile error, a bad variable: service.py exits on
    # those) is a result, not the end of the run.
    except (Exception, SystemExit) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}".strip()
        result["traceback"] = traceback.format_exc(limit=8)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            result["error"] = "CUDA out of memory: " + str(exc).splitlines()[0]
    finally:
        release(record)
    result["seconds"] = time.perf_counter() - started
    return result


def judge(result: dict[str, Any], judged: bool) -> dict[str, str | None]:
    if not judged or not result["ok"]:
        return {"p50": None, "images_per_second": None}
    return {
        "p50": "PASS" if result["p50_s"] <= TARGET_P50_S else "FAIL",
        "images_per_second": "PASS" if result["images_per_second"] >= TARGET_IMAGES_PER_SECOND else "FAIL",
    }


# --- output ------------------------------------------------------------------


def log(message: str) -> None:
    print(message, flush=True)


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    return format(value, spec)


def baseline_of(runs: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any] | None:
    """The latest successful baseline measured like ``run`` (same model and settings), maybe in an earlier run."""
    for other in reversed(runs[: runs.index(run) + 1]):
        if (other["model"], other["settings"]) != (run["model"], run["settings"]):
            continue
        for r in reversed(other["scenarios"]):
            if r["scenario"] == "baseline" and r["ok"]:
                return r
    return None


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "–"
    return f"×{value / reference:.2f}"


def scenario_table(run: dict[str, Any], runs: list[dict[str, Any]] | None = None) -> str:
    """One row per scenario; the ``vs baseline`` columns show each knob's effect (×0.5 p50 = twice as fast)."""
    baseline = baseline_of(runs or [run], run)
    base_p50 = baseline["p50_s"] if baseline else None
    base_ips = baseline["images_per_second"] if baseline else None
    clients = run["settings"]["clients"]
    rows = [
        f"| scenario | mode | weights GiB | max batch | load s | warm-up s | priming s | p50 s | p95 s "
        f"| p50 vs baseline | img/s ({clients} clients) | img/s vs baseline | p50 s under load | GiB after load "
        "| peak GiB load | peak GiB traffic | MAD vs baseline | PSNR dB | p50 target | img/s target | error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in run["scenarios"]:
        verdict = r.get("targets") or {}
        error = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")
        quality = r.get("quality_vs_baseline") or {}
        rows.append(
            f"| {r['scenario']} | {r.get('memory_mode') or '–'} | {fmt(r.get('weight_gib'), '.2f')} "
            f"| {fmt(r.get('max_batch_images'), 'd')} | {fmt(r.get('load_s'), '.1f')} "
            f"| {fmt(r.get('warmup_s'), '.1f')} | {fmt(r.get('priming_s'), '.1f')} "
            f"| {fmt(r.get('p50_s'))} | {fmt(r.get('p95_s'))} | {ratio(r.get('p50_s'), base_p50)} "
            f"| {fmt(r.get('images_per_second'), '.2f')} | {ratio(r.get('images_per_second'), base_ips)} "
            f"| {fmt(r.get('concurrent_p50_s'))} | {fmt(r.get('vram_after_load_gib'), '.1f')} "
            f"| {fmt(r.get('vram_peak_load_gib'), '.1f')} | {fmt(r.get('vram_peak_traffic_gib'), '.1f')} "
            f"| {fmt(quality.get('mad'), '.2f')} | {fmt(quality.get('psnr_db'), '.1f')} "
            f"| {verdict.get('p50') or 'n/a'} | {verdict.get('images_per_second') or 'n/a'} | {error[:300]} |"
        )
    return "\n".join(rows)


def verdicts(run: dict[str, Any]) -> list[str]:
    """Which scenarios meet each target, for a run where they are judged."""
    if not run["judged"]:
        return []
    lines = []
    for key, target in (
        ("p50", f"p50 ≤ {TARGET_P50_S} s"),
        ("images_per_second", f"≥ {TARGET_IMAGES_PER_SECOND:g} img/s"),
    ):
        passing = [r["scenario"] for r in run["scenarios"] if (r.get("targets") or {}).get(key) == "PASS"]
        lines.append(f"- {target}: {'PASS with ' + ', '.join(passing) if passing else 'FAIL in every scenario run'}")
    if "H100" not in run["machine"]:
        lines.append("- the targets are stated for an H100; this GPU is another one")
    return lines


def targets_line() -> str:
    return (
        f"Targets ({TARGET_SIZE}², {TARGET_STEPS} steps, on an H100): p50 ≤ {TARGET_P50_S} s end-to-end over HTTP "
        f"for n=1; ≥ {TARGET_IMAGES_PER_SECOND:g} images/s sustained with {TARGET_CLIENTS} concurrent clients."
    )


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["# SD3.5 Large architecture, random weights: GPU benchmark", "", targets_line(), ""]
    for run in runs:
        s = run["settings"]
        lines += [
            f"## {run['started']} — {run['model']} on {run['device']}",
            "",
            f"`{run['command']}`",
            "",
            f"Machine: {run['machine']}",
            "",
            f"{s['size']}², {s['steps']} steps, output {s['output_format']}; sequential: {s['sequential']} requests "
            f"after an untimed priming round; concurrent: {s['clients']} clients × {s['per_client']} requests. "
            f"Targets judged: {'yes' if run['judged'] else 'no (' + run['not_judged_because'] + ')'}.",
            "",
            components_table(run["components"], run["dtype"]),
            "",
            scenario_table(run, runs),
            "",
            *verdicts(run),
        ]
        for r in run["scenarios"]:
            if r.get("cached_steps") is not None:
                lines.append(f"- {r['scenario']}: steps served from the cache in the last call: {r['cached_steps']}")
            if r.get("vram_before_gib", 0) > 0.5:
                lines.append(
                    f"- {r['scenario']}: started with {r['vram_before_gib']:.1f} GiB left by earlier scenarios"
                )
        lines.append("")
    return "\n".join([*lines, COLUMNS])


COLUMNS = """Columns: *mode*: the MEMORY_MODE the service resolved (what `auto` chose); *weights GiB*: the weights
the loaded pipeline holds, quantized ones at their stored size; *max batch*: MAX_BATCH_IMAGES after the memory plan
(capped where a full batch would not fit); *MAD vs baseline* / *PSNR dB*: mean absolute difference (of 255) and
PSNR of fixed-seed images against the same seeds in baseline (bf16) in this run: on random weights this measures
numeric drift, not perceived quality, which needs the real weights; *load s*: load_pipeline reading the random
checkpoint from disk and applying the knobs (quantizing, for the quantized modes); *warm-up s*: from then until the
service is ready (the service's start and one 1024² warm-up generation, which includes torch.compile's
compilation); *priming s*: untimed requests before measuring (one for 2 images, then one per client: the first
multi-image batch, which torch.compile compiles again); *p50/p95 s*: sequential n=1 requests over HTTP, end to
end (image encoding included); *img/s*: images per second with the concurrent clients, whom the engine batches;
*vs baseline*: the same figure over the latest baseline measured with the same settings; *GiB after load*:
torch.cuda.memory_allocated once the knobs are applied; *peak GiB load*: max_memory_allocated through load and
warm-up; *peak GiB traffic*: max_memory_allocated during the priming, sequential and
concurrent requests, reset after warm-up.
"""


def device_kind(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def save(out: Path, stem: str, runs: list[dict[str, Any]]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    md_path.write_text(markdown(runs))
    return json_path, md_path


def previous_runs(path: Path) -> list[dict[str, Any]]:
    """Runs already in today's file for this device, so split invocations accumulate."""
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["runs"])
    except (ValueError, KeyError, TypeError):
        log(f"warning: {path} is not a results file of this script; it will be overwritten")
        return []


# --- the command line --------------------------------------------------------

FULL_DEFAULTS = {"size": 1024, "sequential": 20, "clients": 16, "per_client": 4, "quality_seeds": 4}
QUICK_DEFAULTS = {"size": 256, "sequential": 3, "clients": 2, "per_client": 2, "quality_seeds": 2}


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the sd35 service on the full-size SD3.5 Large architecture with random weights.",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, run in this order (default: all): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (sd35.tiny's sizes): runs on a CPU")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="256² images, 3 sequential requests, 2 clients × 2 (explicit options still win)",
    )
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024; --quick 256)")
    parser.add_argument("--steps", type=int, default=TARGET_STEPS, help="denoising steps (default 4)")
    parser.add_argument("--sequential", type=int, help="timed sequential n=1 requests (default 20; --quick 3)")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 16; --quick 2)")
    parser.add_argument("--per-client", type=int, help="requests per concurrent client (default 4; --quick 2)")
    parser.add_argument("--output-format", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--device", default="auto", help="DEVICE for the service: auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--env",
        type=env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra service variable for every scenario (e.g. MAX_BATCH_IMAGES=16); repeatable",
    )
    parser.add_argument("--log-level", default="WARNING", help="the service's LOG_LEVEL (default WARNING)")
    parser.add_argument("--arch", type=Path, default=DEFAULT_ARCH, help="the published component configurations")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the .json and .md results")
    parser.add_argument(
        "--describe",
        action="store_true",
        help="only print the parameter counts and every memory mode's weights and fits, then exit",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="where the random checkpoint is saved and reused (default: a folder in the temp directory)",
    )
    parser.add_argument(
        "--quality-seeds", type=int, help="fixed-seed images compared with baseline's (default 4; --quick 2)"
    )
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        parser.error(f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SCENARIOS)}")
    args.scenario_names = names
    if not args.arch.is_file():
        parser.error(f"no architecture file at {args.arch}; pass --arch PATH to {ARCH_NAME}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    published = load_arch(args.arch)
    arch = tiny_arch(published) if args.tiny else published
    model_id = "random-sd3.5-large-tiny" if args.tiny else "random-sd3.5-large"
    device = resolve_device(args.device)
    # The run's dtype is load_pipeline's; --describe reports bf16, the GPU's, on any machine.
    dtype = torch.bfloat16 if device.startswith("cuda") or args.describe else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")

    components = describe(arch, dtype)
    log(f"{model_id} ({dtype_name}), from {args.arch}:\n{components_table(components, dtype_name)}")
    if args.describe:
        log("\nMemory modes (weights computed from the architecture):\n" + memory_modes_table(arch))
        return 0

    checkpoint = args.checkpoint or Path(tempfile.gettempdir()) / f"sd35-{model_id}-{dtype_name}"
    save_random_checkpoint(arch, checkpoint, device, dtype)
    references: dict[str, Any] = {}
    reasons = []
    if args.tiny:
        reasons.append("tiny shapes")
    if not device.startswith("cuda"):
        reasons.append(f"device {device}")
    if (args.size, args.steps, args.clients) != (TARGET_SIZE, TARGET_STEPS, TARGET_CLIENTS):
        reasons.append(f"{args.size}², {args.steps} steps, {args.clients} clients")
    started = dt.datetime.now().astimezone()
    stem = f"gpu-{started.date().isoformat()}-{device_kind(device)}{'-tiny' if args.tiny else ''}"
    runs = previous_runs(args.out / f"{stem}.json")
    run: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": "python -m bench.gpu " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": harness.machine(),
        "device": device,
        "model": model_id,
        "dtype": dtype_name,
        "settings": {
            "size": args.size,
            "steps": args.steps,
            "sequential": args.sequential,
            "clients": args.clients,
            "per_client": args.per_client,
            "output_format": args.output_format,
            "env": dict(args.env),
        },
        "targets": {
            "size": TARGET_SIZE,
            "steps": TARGET_STEPS,
            "p50_s": TARGET_P50_S,
            "images_per_second": TARGET_IMAGES_PER_SECOND,
            "clients": TARGET_CLIENTS,
        },
        "judged": not reasons,
        "not_judged_because": ", ".join(reasons),
        "components": components,
        "scenarios": [],
    }
    runs.append(run)
    log(f"{run['machine']}\n{targets_line()}")
    for index, name in enumerate(args.scenario_names, 1):
        scenario = SCENARIOS[name]
        log(f"[{index}/{len(args.scenario_names)}] {name}: {scenario.about}")
        result = run_scenario(scenario, args, checkpoint, device, references)
        result["targets"] = judge(result, run["judged"])
        run["scenarios"].append(result)
        json_path, md_path = save(args.out, stem, runs)
        if result["ok"]:
            log(
                f"[{index}/{len(args.scenario_names)}] {name}: p50 {result['p50_s']:.3f} s, "
                f"p95 {result['p95_s']:.3f} s, {result['images_per_second']:.2f} images/s "
                f"({result['seconds']:.0f} s in all)"
            )
        else:
            log(f"[{index}/{len(args.scenario_names)}] {name}: FAILED: {result['error']}")
    log("\n" + scenario_table(run, runs))
    for line in verdicts(run):
        log(line)
    log(f"\nwrote {json_path} and {md_path}")
    failed = [r["scenario"] for r in run["scenarios"] if not r["ok"]]
    if failed:
        log(f"failed: {', '.join(failed)} (the error of each is in the table and the JSON)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
