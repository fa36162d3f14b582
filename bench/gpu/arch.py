"""The SD3.5 Large architecture from its published configurations, with random weights: build, count, describe.

``bench/sd35-large-architecture.json`` holds the published component
configurations (the MMDiT transformer, the VAE, CLIP-L, CLIP-G and the T5-XXL
encoder). Built with random weights they have the real model's shapes, so its
FLOPs and memory, with no download and no gated licence.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd35 import tiny
from sd35.engine.memory import AUTO_ORDER, GIB, MODES, MemoryModeError, component_bytes, fit, shape_of_pipeline

ROOT = Path(__file__).resolve().parents[2]
ARCH_NAME = "sd35-large-architecture.json"
# The published configurations: a copy in bench/ if there is one, else the
# shared reference folder inside or beside the checkout.
ARCH_CANDIDATES = (
    ROOT / "bench" / ARCH_NAME,
    ROOT / "shared" / "reference" / ARCH_NAME,
    ROOT.parent / "shared" / "reference" / ARCH_NAME,
)
DEFAULT_ARCH = next((path for path in ARCH_CANDIDATES if path.is_file()), ARCH_CANDIDATES[-1])

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


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


def auto_pick(arch: dict[str, Any], card_gib: float, max_batch_images: int = 8) -> tuple[str, str]:
    """The mode ``MEMORY_MODE=auto`` picks for ``arch`` on a card of ``card_gib`` (weights computed, nothing loaded),
    and the plan's reason; ``("none", why)`` when nothing fits."""
    shape = shape_of_pipeline(build_random_pipeline(arch, "meta", torch.bfloat16))
    try:
        plan = fit("auto", shape, int((card_gib - CONTEXT_GIB) * GIB), max_batch_images)
    except MemoryModeError as exc:
        return "none", str(exc)
    return plan.mode.name, plan.reason


# --- a sparse checkpoint: the real names and shapes, no data -------------------

_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_sparse_checkpoint(arch: dict[str, Any], directory: Path, dtype: torch.dtype = torch.bfloat16) -> int:
    """A diffusers directory of ``arch`` whose weight files have real safetensors headers and no data.

    Each file is extended to its full length without writing the data, so the
    file system keeps it sparse: a full-size SD3.5 Large checkpoint says ~27 GB
    and occupies a few hundred KB. Good for anything that reads names, shapes
    or sizes; loading it gives zeros. Returns the weights' total bytes.
    """
    pipe = build_random_pipeline(arch, "meta", dtype)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_config(directory)  # model_index.json
    total = 0
    for name, component in pipe.components.items():
        target = directory / name
        if isinstance(component, torch.nn.Module):
            target.mkdir(exist_ok=True)
            config = getattr(component, "config", None)
            if hasattr(config, "save_pretrained"):
                config.save_pretrained(target)  # transformers: config.json
            else:
                component.save_config(target)  # diffusers
            filename = (
                "model.safetensors" if hasattr(config, "save_pretrained") else "diffusion_pytorch_model.safetensors"
            )
            total += _write_sparse_safetensors(component.state_dict(), target / filename)
        elif hasattr(component, "save_pretrained"):
            component.save_pretrained(target)  # tokenizers
        elif hasattr(component, "save_config"):
            component.save_config(target)  # the scheduler
    return total


def _write_sparse_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    # The format: an 8-byte little-endian header length, the JSON header
    # (dtype, shape, byte offsets per tensor), then the data.
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        out.truncate(8 + len(encoded) + offset)
    return offset
