"""GPU memory policy: what each memory mode keeps on the GPU, what a batch needs, and which mode fits.

Every number here is computed from the model's own configuration (parameter
counts on the meta device, the transformer's width, the VAE's channels) and
from the batch (images × pixels), never from the model's name, so the same
rules serve SD3.5 Large, Medium, and the tiny test model.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from sd35.engine.refusal import LoadRefusedError

logger = logging.getLogger(__name__)

GIB = 1 << 30
T5 = "text_encoder_3"


@dataclass(frozen=True)
class MemoryMode:
    """What one ``MEMORY_MODE`` does to the weights."""

    name: str
    transformer: str  # bf16, fp8, int8 or nf4
    t5: str  # bf16, int8, nf4 or dropped
    offload: bool  # accelerate's model offload: one component on the GPU at a time
    quality: str
    needs: str = ""  # what the device must have: "" (anything), "cuda", "fp8"


MODES: dict[str, MemoryMode] = {
    m.name: m
    for m in (
        MemoryMode("full", "bf16", "bf16", False, "the reference: every component in bf16"),
        MemoryMode(
            "fp8",
            "fp8",
            "bf16",
            False,
            "transformer weights and activations in float8 (e4m3, per-row scales): small numeric differences, faster "
            "matrix multiplies on GPUs with FP8 units",
            needs="fp8",
        ),
        MemoryMode(
            "int8",
            "int8",
            "int8",
            False,
            "transformer and T5 weights in int8 (per-channel scales), computed in bf16: close to full quality",
        ),
        MemoryMode(
            "nf4",
            "nf4",
            "nf4",
            False,
            "transformer and T5 weights in 4-bit NormalFloat (bitsandbytes, double-quantized scales), computed in "
            "bf16: slightly softer detail than full",
            needs="cuda",
        ),
        MemoryMode(
            "nf4_no_t5",
            "nf4",
            "dropped",
            False,
            "nf4, and no T5: prompts are read by the CLIP encoders alone (77 tokens)",
            needs="cuda",
        ),
        MemoryMode("no_t5", "bf16", "dropped", False, "no T5: prompts are read by the CLIP encoders alone (77 tokens)"),
        MemoryMode(
            "cpu_offload", "bf16", "bf16", True, "full quality; each component moves to the GPU when it runs (slow)"
        ),
    )
}
# MEMORY_MODE=auto tries these in order and takes the first that fits. fp8 is
# left out until a GPU measurement shows it keeps quality.
AUTO_ORDER = ("full", "int8", "nf4", "nf4_no_t5", "cpu_offload")

# Bytes per weight of a quantized Linear layer: int8/fp8 keep one byte and a
# scale per output row; NF4 packs two weights per byte plus an 8-bit absmax
# per 64 weights and a float32 per 256 of those (double quantization).
_LINEAR_BYTES_PER_WEIGHT = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}

# Working memory (beyond the weights) while a batch runs. The transformer holds
# about this many hidden-sized bf16 tensors per token at its peak (the block's
# input, norms, Q/K/V, attention output, the 4x-wide MLP in and out, residuals);
# the VAE decoder's peak is at full resolution, where about this many tensors of
# its second-widest stage (upsampled, convolved, normalised) are alive at once.
TRANSFORMER_LIVE_TENSORS = 16
VAE_LIVE_TENSORS = 4
# CUDA workspaces, the text encoders' activations, allocator fragmentation.
FIXED_WORKING_BYTES = GIB + GIB // 2
# The size a full batch is planned for; larger images batch less (the OOM
# recovery splits a batch that does not fit).
PLANNED_PIXELS = 1024 * 1024


class MemoryModeError(LoadRefusedError):
    """A memory mode cannot work on this machine; the message says why and what would."""


@dataclass(frozen=True)
class ComponentSize:
    """Parameters of one component: the weights of its Linear layers (what quantization shrinks) and the rest."""

    linear_weights: int
    other_params: int

    def bytes_as(self, precision: str) -> int:
        if precision == "dropped":
            return 0
        return int(self.linear_weights * _LINEAR_BYTES_PER_WEIGHT[precision] + self.other_params * 2)


@dataclass(frozen=True)
class ModelShape:
    """What the memory rules need to know about a model: component sizes and activation widths."""

    components: dict[str, ComponentSize]
    transformer_width: int  # heads x head dim
    text_tokens: int  # CLIP (77) + T5 (256) tokens the transformer attends to
    vae_wide_channels: int  # channels of the VAE decoder's stages that run at full resolution
    patch: int = 16  # pixels per latent token side (VAE factor 8 x patch 2)

    def weight_bytes(self, mode: MemoryMode) -> dict[str, int]:
        sizes = {}
        for name, size in self.components.items():
            precision = "bf16"
            if name == "transformer":
                precision = mode.transformer
            elif name == T5:
                precision = mode.t5
            if precision != "dropped":
                sizes[name] = size.bytes_as(precision)
        return sizes

    def resident_bytes(self, mode: MemoryMode) -> int:
        """Weights on the GPU at once: all of them, or with offload the largest component."""
        sizes = self.weight_bytes(mode)
        return max(sizes.values(), default=0) if mode.offload else sum(sizes.values())

    def working_bytes(self, images: int, pixels: int = PLANNED_PIXELS, vae_slicing: bool = True) -> int:
        """Activations of a batch of ``images`` at ``pixels`` each; with slicing the VAE decodes one at a time."""
        tokens = pixels // (self.patch * self.patch) + self.text_tokens
        transformer = images * tokens * self.transformer_width * 2 * TRANSFORMER_LIVE_TENSORS
        vae = (1 if vae_slicing else images) * pixels * self.vae_wide_channels * 2 * VAE_LIVE_TENSORS
        return FIXED_WORKING_BYTES + max(transformer, vae)


@dataclass(frozen=True)
class MemoryPlan:
    """The resolved memory mode, the batch it leaves room for, and why."""

    mode: MemoryMode
    max_batch_images: int
    vae_slicing: bool = False
    weight_bytes: int | None = None  # planned bytes of weights on the GPU; None on a CPU
    reason: str = ""
    notes: tuple[str, ...] = field(default=())


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def fit(requested: str, shape: ModelShape, free_bytes: int, max_batch_images: int, device: str = "cuda") -> MemoryPlan:
    """The plan for ``requested`` (a mode or ``auto``) with ``free_bytes`` of GPU memory.

    A mode fits when its weights plus the working memory of a full batch of
    ``max_batch_images`` at 1024² fit; the VAE then decodes the batch at once
    if that fits too, else one image at a time. ``auto`` takes the first of
    :data:`AUTO_ORDER` that fits; when none fits a full batch, the first that
    fits a smaller one, with the batch capped. An explicit mode is capped the
    same way, and refused, naming modes that would fit, when not one image fits.
    """
    candidates = AUTO_ORDER if requested == "auto" else (requested,)
    for name in candidates:
        plan = _fit_full_batch(MODES[name], shape, free_bytes, max_batch_images)
        if plan is not None:
            reason = _describe(plan, shape, free_bytes)
            if requested == "auto" and name != candidates[0]:
                skipped = ", ".join(
                    f"{other} needs {_gib(_need(MODES[other], shape, max_batch_images))}"
                    for other in candidates[: candidates.index(name)]
                )
                reason += f" ({skipped})"
            return replace(plan, reason=reason)
    for name in candidates:
        images = _largest_batch(MODES[name], shape, free_bytes, max_batch_images)
        if images:
            plan = MemoryPlan(MODES[name], images, True, shape.resident_bytes(MODES[name]))
            note = (
                f"MAX_BATCH_IMAGES capped from {max_batch_images} to {images}: a batch of {max_batch_images} at "
                f"1024² needs {_gib(_need(plan.mode, shape, max_batch_images))} in MEMORY_MODE={name}"
            )
            return replace(plan, reason=_describe(plan, shape, free_bytes), notes=(note,))
    fitting = [
        f"MEMORY_MODE={name} (needs about {_gib(_need(MODES[name], shape, 1))})"
        for name in AUTO_ORDER
        if name not in candidates and _largest_batch(MODES[name], shape, free_bytes, 1)
    ]
    need = _need(MODES[candidates[-1]], shape, 1)
    raise MemoryModeError(
        f"MEMORY_MODE={requested} does not fit on {device}: "
        + (
            f"{candidates[-1]} needs about {_gib(need)} for one 1024² image"
            if requested != "auto"
            else f"no memory mode fits; the smallest ({candidates[-1]}) needs about {_gib(need)} for one image"
        )
        + f" but {_gib(free_bytes)} is free; "
        + (f"try {' or '.join(fitting)}" if fitting else "free GPU memory or use a larger GPU")
    )


def _need(mode: MemoryMode, shape: ModelShape, images: int) -> int:
    return shape.resident_bytes(mode) + shape.working_bytes(images)


def _fit_full_batch(mode: MemoryMode, shape: ModelShape, free_bytes: int, images: int) -> MemoryPlan | None:
    resident = shape.resident_bytes(mode)
    if resident + shape.working_bytes(images, vae_slicing=False) <= free_bytes:
        return MemoryPlan(mode, images, False, resident)
    if resident + shape.working_bytes(images) <= free_bytes:
        return MemoryPlan(mode, images, True, resident)
    return None


def _largest_batch(mode: MemoryMode, shape: ModelShape, free_bytes: int, most: int) -> int:
    resident = shape.resident_bytes(mode)
    return max((n for n in range(1, most + 1) if resident + shape.working_bytes(n) <= free_bytes), default=0)


def _describe(plan: MemoryPlan, shape: ModelShape, free_bytes: int) -> str:
    working = shape.working_bytes(plan.max_batch_images, vae_slicing=plan.vae_slicing)
    return (
        f"{_gib(plan.weight_bytes or 0)} of weights + {_gib(working)} for a batch of {plan.max_batch_images} "
        f"at 1024²{' (VAE decoding one image at a time)' if plan.vae_slicing else ''} fit in {_gib(free_bytes)} free"
    )


def check_device(mode: MemoryMode, device: str, capability: tuple[int, int] | None, gpu_name: str = "") -> None:
    """Refuse a mode whose kernels this device lacks, saying what to use instead."""
    if mode.needs == "":
        return
    if not device.startswith("cuda"):
        kind = "float8 kernels (torchao)" if mode.needs == "fp8" else "bitsandbytes' 4-bit kernels"
        raise MemoryModeError(
            f"MEMORY_MODE={mode.name} needs a CUDA GPU for {kind}, and this worker runs on {device}; "
            "on a CPU use MEMORY_MODE=full or int8"
        )
    if mode.needs == "fp8" and capability is not None and capability < (8, 9):
        raise MemoryModeError(
            f"MEMORY_MODE=fp8 needs a GPU with FP8 units (Ada, Hopper or Blackwell: compute capability 8.9 or "
            f"newer); {device} is {gpu_name or 'a GPU'} with compute capability {capability[0]}.{capability[1]}: "
            "use MEMORY_MODE=int8 for the same memory"
        )


# --- measuring a model without loading it ----------------------------------


def _linear_split(module: Any) -> ComponentSize:
    import torch

    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
    return ComponentSize(linear, total - linear)


def shape_of_pipeline(pipe: Any) -> ModelShape:
    """The memory shape of a loaded (or meta-device) pipeline."""
    import torch

    components = {
        name: _linear_split(module) for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
    }
    return _shape(components, pipe.transformer.config, pipe.vae.config, pipe.tokenizer_max_length)


def _shape(components: dict[str, ComponentSize], transformer: Any, vae: Any, clip_tokens: int) -> ModelShape:
    channels = list(vae["block_out_channels"] if isinstance(vae, dict) else vae.block_out_channels)
    get = transformer.get if isinstance(transformer, dict) else lambda key: getattr(transformer, key)
    return ModelShape(
        components=components,
        transformer_width=get("num_attention_heads") * get("attention_head_dim"),
        text_tokens=clip_tokens + 256,
        # The decoder's last two stages run at full resolution (one after the
        # upsampling into it): the wider of the two sets the peak.
        vae_wide_channels=max(channels[:2]),
        patch=8 * get("patch_size"),
    )


def shape_of_checkpoint(model_id: str, token: str | None = None, drop: Iterable[str] = ()) -> ModelShape:
    """The memory shape of ``model_id`` from its configuration files alone (the weights stay unread).

    Each component is built on the meta device, which allocates nothing: the
    parameter counts are exact, and the decision comes before any download of
    weights.
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model_id, token=token)
    components: dict[str, ComponentSize] = {}
    configs: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_") or name in drop or not isinstance(spec, list | tuple) or spec[0] is None:
            continue
        library, class_name = spec
        if library not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(library), class_name)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizers, schedulers
        if library == "diffusers":
            config = cls.load_config(model_id, subfolder=name, token=token)
            with init_empty_weights():
                module = cls.from_config(config)
            configs[name] = config
        else:
            from transformers import AutoConfig

            with init_empty_weights():
                module = cls._from_config(AutoConfig.from_pretrained(model_id, subfolder=name, token=token))
            module.tie_weights()  # T5's input embedding is shared: count it once, as loading does
        components[name] = _linear_split(module)
    return _shape(components, configs["transformer"], configs["vae"], clip_tokens=77)


def free_gpu_bytes(device: str) -> int:
    """GPU memory this process can still take: the driver's free memory, within the process's own cap.

    ``torch.cuda.set_per_process_memory_fraction`` caps what PyTorch's
    allocator may reserve (a GPU shared with other work, or the benchmark's
    simulated smaller cards); the driver's free memory does not show that cap.
    """
    import torch

    free, total = torch.cuda.mem_get_info(device)
    # torch.cuda.get_per_process_memory_fraction is recent (absent before 2.8).
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0)(device)
    if fraction < 1.0:
        free = min(free, int(total * fraction) - torch.cuda.memory_reserved(device))
    return max(free, 0)


def plan_memory(settings: Any, device: str) -> MemoryPlan:
    """Resolve ``MEMORY_MODE`` for this worker's device; log what was chosen and why in one line."""
    requested = settings.memory_mode
    if not device.startswith("cuda"):
        mode = MODES["full" if requested == "auto" else requested]
        check_device(mode, device, None)
        reason = "no GPU: auto is full" if requested == "auto" else "on a CPU"
        plan = MemoryPlan(mode, settings.max_batch_images, reason=reason)
    else:
        import torch

        capability = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if requested != "auto":
            check_device(MODES[requested], device, capability, name)
        drop = (T5,) if requested in ("no_t5", "nf4_no_t5") else ()
        shape = shape_of_checkpoint(settings.model_id, settings.hf_token, drop)
        plan = fit(requested, shape, free_gpu_bytes(device), settings.max_batch_images, device)
        check_device(plan.mode, device, capability, name)
    logger.info("memory: MEMORY_MODE=%s → %s on %s: %s", requested, plan.mode.name, device, plan.reason)
    for note in plan.notes:
        logger.warning("memory: %s", note)
    return plan


def quantization_config(mode: MemoryMode) -> Any:
    """diffusers' per-component quantization for ``mode`` (None for bf16 modes)."""
    if mode.transformer == "bf16" and mode.t5 in ("bf16", "dropped"):
        return None
    import torch
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig, TorchAoConfig
    from transformers import BitsAndBytesConfig as TransformersBitsAndBytesConfig
    from transformers import TorchAoConfig as TransformersTorchAoConfig

    def torchao(precision: str) -> Any:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

        if precision == "fp8":
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        return Int8WeightOnlyConfig()

    nf4 = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": torch.bfloat16,
        "bnb_4bit_use_double_quant": True,
    }
    mapping: dict[str, Any] = {}
    if mode.transformer in ("int8", "fp8"):
        mapping["transformer"] = TorchAoConfig(torchao(mode.transformer))
    elif mode.transformer == "nf4":
        mapping["transformer"] = BitsAndBytesConfig(**nf4)
    if mode.t5 == "int8":
        mapping[T5] = TransformersTorchAoConfig(torchao("int8"))
    elif mode.t5 == "nf4":
        mapping[T5] = TransformersBitsAndBytesConfig(**nf4)
    return PipelineQuantizationConfig(quant_mapping=mapping)


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor really holds, looking inside quantized tensor subclasses (torchao) at their parts."""
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def component_bytes(pipe: Any) -> dict[str, int]:
    """Bytes of parameters and buffers per pipeline component, as stored (quantized weights at their size)."""
    import torch

    sizes = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            sizes[name] = sum(tensor_bytes(t) for t in tensors)
    return sizes
