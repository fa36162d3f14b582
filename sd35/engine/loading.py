"""Loading the pipeline: the device, the weights as ``MEMORY_MODE`` says, and load errors a user can act on."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35.config import DEFAULT_MODEL_ID, Settings
from sd35.engine.memory import GIB
from sd35.engine.refusal import LoadRefusedError

if TYPE_CHECKING:
    from sd35.engine.memory import MemoryPlan

logger = logging.getLogger(__name__)


def resolve_device(requested: str, worker_index: int = 1) -> str:
    """The torch device for this worker: with several visible GPUs, worker N takes GPU N-1."""
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{(worker_index - 1) % torch.cuda.device_count()}"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={requested} but no CUDA GPU is visible to this process (check --gpus all)")
    return requested


def looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


# Above this much weight a model is not one to serve on a CPU by accident: SD3.5
# Large holds ~27 GiB and would take many minutes per image there. The tiny
# test model holds a few MB.
CPU_FALLBACK_LIMIT_BYTES = 4 * GIB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# Hub checkpoints known to be far above the limit, for when they are not yet in the cache.
LARGE_HUB_PREFIXES = ("stabilityai/stable-diffusion-3.5-", "stabilityai/stable-diffusion-3-")


def weight_bytes_on_disk(model_id: str) -> int | None:
    """Bytes of ``model_id``'s weight files as stored: a local directory, or its snapshot in the Hugging Face
    cache; None when it is neither (a Hub model not downloaded yet). Reads only the files' sizes."""
    if looks_like_path(model_id):
        root: Path | None = Path(model_id).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "model_index.json")
        root = Path(cached).parent if isinstance(cached, str) else None
    if root is None or not root.is_dir():
        return None
    # The Hub cache links snapshot files to blobs: stat follows the links.
    return sum(path.stat().st_size for path in root.rglob("*") if path.suffix in WEIGHT_SUFFIXES and path.is_file())


def refuse_cpu_fallback(settings: Settings) -> None:
    """Refuse ``DEVICE=auto`` on a machine without a visible GPU when the model is too large for a CPU.

    Such a start is nearly always a container run without ``--gpus all``:
    serving would load ~30 GB into RAM and take many minutes per image, or die
    of memory. The check reads only file sizes (and imports torch only when
    the model is large), so the refusal comes within seconds of the start.
    """
    if settings.device != "auto":
        return
    size = weight_bytes_on_disk(settings.model_id)
    if size is None and not settings.model_id.lower().startswith(LARGE_HUB_PREFIXES):
        return  # a Hub model not in the cache: its size is unknown until it downloads
    if size is not None and size <= CPU_FALLBACK_LIMIT_BYTES:
        return
    import torch

    if torch.cuda.is_available():
        return
    held = f"holds {size / GIB:.1f} GiB of weights" if size is not None else "is a full-size model (tens of GB)"
    raise LoadRefusedError(
        f"no CUDA GPU is visible and MODEL_ID={settings.model_id} {held}: on a CPU it would take many minutes "
        "per image. Give the container the GPU (docker run --gpus all ...; on Kubernetes a nvidia.com/gpu "
        "limit), or set DEVICE=cpu to run it on the CPU anyway"
    )


def describe_load_error(exc: BaseException, settings: Settings) -> str:
    """A cause a user can act on, from whatever loading raised."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    model = settings.model_id
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__

    def caused_by(*kinds: type[BaseException]) -> bool:
        return any(isinstance(e, kinds) for e in chain)

    if isinstance(exc, LoadRefusedError):  # MemoryModeError and AdapterError too
        return str(exc)
    if looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            return f"MODEL_ID={model} looks like a local path, but no such directory exists"
        if not (path / "model_index.json").is_file():
            return f"{model} is not a diffusers model directory: it has no model_index.json"
        return f"{model} is an incomplete or damaged model directory: {exc}"
    # GatedRepoError is a RepositoryNotFoundError: test it first.
    if caused_by(GatedRepoError):
        token = "the token given has no access" if settings.hf_token else "no token is set"
        return (
            f"{model} is a gated model and {token}: accept its license on https://huggingface.co/{model} "
            "and set HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) to a token of that account"
        )
    if caused_by(RepositoryNotFoundError):
        return (
            f"model {model!r} was not found on the Hugging Face Hub: check MODEL_ID (a hub id such as "
            f"{DEFAULT_MODEL_ID}, or a local directory)"
            + ("" if settings.hf_token else "; a private model also needs HF_TOKEN")
        )
    offline = caused_by(OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)
    if offline or any("Connect" in type(e).__name__ or "Timeout" in type(e).__name__ for e in chain):
        return (
            f"could not download {model}: the Hugging Face Hub is unreachable (no network, a proxy, or "
            "HF_HUB_OFFLINE=1) and the weights are not in the local cache (HF_HOME); connect the machine "
            "to the internet or mount a cache that holds the model"
        )
    return f"could not load {model}: {type(exc).__name__}: {exc}"


def resolve_memory(settings: Settings, device: str) -> tuple[Settings, MemoryPlan]:
    """``settings`` with ``MEMORY_MODE`` resolved for ``device`` (never ``auto``) and the batch capped to what fits."""
    from sd35.engine.memory import plan_memory

    plan = plan_memory(settings, device)
    resolved = replace(
        settings,
        memory_mode=plan.mode.name,
        max_batch_images=plan.max_batch_images,
        vae_slicing=settings.vae_slicing or plan.vae_slicing,
    )
    return resolved, plan


def load_pipeline(settings: Settings, worker_index: int = 1) -> tuple[Any, str]:
    """Load ``MODEL_ID`` onto this worker's device, as ``MEMORY_MODE`` says; returns (pipeline, device)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from sd35 import acceleration
    from sd35.engine import adapters
    from sd35.engine.memory import MODES, component_bytes, quantization_config

    refuse_cpu_fallback(settings)
    device = resolve_device(settings.device, worker_index)
    if settings.memory_mode == "auto":
        settings, _ = resolve_memory(settings, device)
    mode = MODES[settings.memory_mode]
    quantization = quantization_config(mode)
    # bf16 halves memory and runs at full tensor-core speed on GPUs; CPUs run
    # bf16 slowly, so they get float32 - except quantized weights, which
    # diffusers computes in bf16, so the rest of the pipeline must match.
    dtype = torch.bfloat16 if device.startswith("cuda") or quantization is not None else torch.float32
    # Without T5 the prompt is encoded by the two CLIP models alone: ~9.5 GB
    # less, and prompts beyond 77 tokens lose their tail.
    drop_t5 = {"text_encoder_3": None, "tokenizer_3": None} if mode.t5 == "dropped" else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(
        settings.model_id, dtype=dtype, token=settings.hf_token, quantization_config=quantization, **drop_t5
    )
    pipe.set_progress_bar_config(disable=True)
    if mode.offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if settings.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    adapters.load_adapters(pipe, settings)  # before compiling: hot-swapping needs the slot in the graph
    sizes = component_bytes(pipe)
    logger.info(
        "weights on %s: %.2f GiB in MEMORY_MODE=%s (%s)",
        "the host (offloaded)" if mode.offload and device.startswith("cuda") else device,
        sum(sizes.values()) / GIB,
        mode.name,
        ", ".join(f"{name} {size / GIB:.2f}" for name, size in sizes.items()),
    )
    if settings.enable_cache_dit:
        acceleration.enable_cache_dit(pipe)
    if settings.torch_compile != "off":
        acceleration.compile_transformer(pipe, settings.torch_compile)
    return pipe, device
