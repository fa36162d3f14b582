"""An AUTOMATIC1111 request as engine work, and the ``info`` it is answered with.

Pure functions (no engine, no HTTP): each check raises
:class:`~sd35.errors.ValidationError` naming the field, which the HTTP layer
answers as AUTOMATIC1111 does, a 422 with ``detail``.
"""

from __future__ import annotations

import binascii
import json
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pybase64
from PIL import Image, ImageOps

from sd35.a1111.protocol import RANDOM_SEED, Img2ImgRequest, Txt2ImgRequest
from sd35.config import MAX_LORA_SCALE, Settings
from sd35.engine.params import SEED_MODULUS, GenerationParams
from sd35.errors import ValidationError
from sd35.imaging import MAX_PIXELS, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, UploadError, auto_size, fit, read_upload

SAMPLER = "Euler"
SAMPLER_ALIASES = ["k_euler", "euler", "flow_match_euler", "FlowMatchEulerDiscreteScheduler"]
SCHEDULER = "automatic"
SCHEDULER_LABEL = "Automatic"
SEED_BITS = 32
VERSION = "sd35"
MAX_INIT_IMAGES = 16
DEFAULT_SIDE = 1024
DEFAULT_STRENGTH = 0.75

# AUTOMATIC1111's extra networks: <kind:name[:multiplier[:...]]>. All of them
# are taken out of the prompt, as AUTOMATIC1111 does; lora (and its alias lyco)
# selects an adapter, any other kind is ignored.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = {"lora", "lyco"}


@dataclass(frozen=True)
class Checkpoint:
    """What ``sd_model_checkpoint`` can name: the base model, or a LoRA adapter served as a model."""

    title: str
    model_name: str
    filename: str
    adapter: str | None = None


def checkpoints(settings: Settings) -> list[Checkpoint]:
    base = settings.served_model_name
    return [
        Checkpoint(base, base.rsplit("/", 1)[-1], settings.model_id),
        *(Checkpoint(a.name, a.name, a.location, adapter=a.name) for a in settings.lora_adapters),
    ]


def base_checkpoint(settings: Settings) -> Checkpoint:
    return checkpoints(settings)[0]


def find_checkpoint(settings: Settings, name: object, param: str) -> Checkpoint:
    """The checkpoint a title, model name or file names; a ValidationError naming ``param`` otherwise."""
    if isinstance(name, str):
        # AUTOMATIC1111's titles carry " [hash]": ours have none, but clients may add one.
        bare = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", name.strip())
        for checkpoint in checkpoints(settings):
            if bare in (checkpoint.title, checkpoint.model_name, checkpoint.filename):
                return checkpoint
    titles = ", ".join(repr(c.title) for c in checkpoints(settings))
    raise ValidationError(
        f"Invalid value for '{param}': {name!r} is not a model of this server; it has {titles} "
        "(GET /sdapi/v1/sd-models lists the base model, /sdapi/v1/loras the adapters).",
        param=param,
    )


@dataclass(frozen=True)
class PromptNetworks:
    """A prompt with its ``<kind:...>`` tags taken out: the LoRA they select, and the tags that were ignored."""

    prompt: str
    lora: tuple[str, float | None] | None
    ignored: list[str]


def parse_prompt(settings: Settings, prompt: str) -> PromptNetworks:
    """``"a cat <lora:ink:0.8>"`` → prompt ``"a cat"``, LoRA ``("ink", 0.8)``."""
    loras: list[tuple[str, float | None]] = []
    ignored: list[str] = []
    for match in _EXTRA_NETWORK.finditer(prompt):
        kind, args = match.group(1).lower(), match.group(2).split(":")
        if kind not in _LORA_KINDS:
            ignored.append(match.group(0))
            continue
        name = args[0].strip()
        if settings.adapter(name) is None:
            names = ", ".join(a.name for a in settings.lora_adapters) or "none"
            raise ValidationError(
                f"Invalid value for 'prompt': {match.group(0)} names an unknown LoRA {name!r}; this server has: "
                f"{names} (GET /sdapi/v1/loras).",
                param="prompt",
            )
        weight: float | None = None
        if len(args) > 1 and args[1].strip():
            try:
                weight = float(args[1])
            except ValueError:
                weight = -1.0
            if not 0 <= weight <= MAX_LORA_SCALE:
                raise ValidationError(
                    f"Invalid value for 'prompt': the weight in {match.group(0)} must be a number from 0 to "
                    f"{MAX_LORA_SCALE:g}.",
                    param="prompt",
                )
        loras.append((name, weight))
    if len(loras) > 1:
        raise ValidationError(
            "Invalid value for 'prompt': it has more than one <lora:...> tag; sd35 applies one LoRA per request.",
            param="prompt",
        )
    cleaned = re.sub(r"\s{2,}", " ", _EXTRA_NETWORK.sub("", prompt)).strip()
    return PromptNetworks(cleaned, loras[0] if loras else None, ignored)


def check_size(width: int, height: int) -> None:
    """The engine's size rule, phrased for AUTOMATIC1111's ``width`` and ``height`` fields."""
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
            raise ValidationError(
                f"Invalid value for '{name}': {side} must be a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to "
                f"{MAX_SIDE}.",
                param=name,
            )
    if width * height > MAX_PIXELS:
        raise ValidationError(
            f"Invalid value for 'width': {width}x{height} has more than {MAX_PIXELS} pixels (1536x1536); "
            "make it smaller.",
            param="width",
        )


# --- images in requests ----------------------------------------------------------


def decode_image(value: object, name: str, param: str) -> Image.Image:
    """A base64 image (bare, or as a ``data:`` URI) decoded within the upload limits."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"Invalid value for '{name}': expected a base64-encoded image.", param=param)
    text = value.strip()
    if text.startswith(("http://", "https://")):
        raise ValidationError(
            f"Invalid value for '{name}': images are not fetched from URLs here; send the image itself, base64.",
            param=param,
        )
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"Invalid value for '{name}': it is not valid base64.", param=param) from None
    try:
        return read_upload(data, name, param)
    except UploadError as exc:
        raise ValidationError(f"Invalid value for '{name}': {exc}.", param=param) from None


def repaint_mask(mask: Image.Image, invert: bool) -> np.ndarray:
    """AUTOMATIC1111's mask polarity: white (over 128) is repainted; in a mask with transparency, opaque is.

    Returns a boolean array, True where the image is to be repainted.
    """
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            repaint = np.asarray(alpha) > 128
            return ~repaint if invert else repaint
    repaint = np.asarray(mask.convert("L")) > 128
    return ~repaint if invert else repaint


def _resized(image: Image.Image, width: int, height: int, resize_mode: int, resample: Image.Resampling) -> Image.Image:
    if resize_mode == 1:  # crop and resize: fill the frame, keep the aspect ratio
        return ImageOps.fit(image, (width, height), resample)
    return fit(image, width, height, resample)


# --- the plan ----------------------------------------------------------------------


@dataclass
class Plan:
    """One request as engine work: ``n_iter`` jobs of ``batch_size`` images, and what ``info`` will say."""

    kind: str
    jobs: list[GenerationParams]
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    cfg_scale: float
    batch_size: int
    model: str
    denoising_strength: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _truthy(value: Any) -> bool:
    return bool(value) and value not in ("None", "none")


# Fields sd35 ignores whose values would change AUTOMATIC1111's result: info names them.
_IGNORED_WHEN_SET = (
    "styles",
    "subseed_strength",
    "restore_faces",
    "tiling",
    "refiner_checkpoint",
    "script_name",
    "alwayson_scripts",
    "enable_hr",
    "inpaint_full_res",
)


def _ignored(request: Txt2ImgRequest | Img2ImgRequest) -> list[str]:
    names = [
        name for name in _IGNORED_WHEN_SET if name in request.model_fields_set and _truthy(getattr(request, name, None))
    ]
    overrides = sorted(set(request.override_settings or {}) - {"sd_model_checkpoint"})
    return names + [f"override_settings.{name}" for name in overrides]


def plan(
    settings: Settings,
    request: Txt2ImgRequest | Img2ImgRequest,
    checkpoint_name: str,
) -> Plan:
    """Everything but the images: validated, with defaults resolved. ``checkpoint_name``: the caller's
    ``sd_model_checkpoint`` option (``override_settings`` wins over it)."""
    override = (request.override_settings or {}).get("sd_model_checkpoint")
    if override is not None:
        checkpoint = find_checkpoint(settings, override, "override_settings.sd_model_checkpoint")
    else:
        checkpoint = find_checkpoint(settings, checkpoint_name, "sd_model_checkpoint")
    networks = parse_prompt(settings, request.prompt or "")
    adapter, scale = _adapter(settings, checkpoint, networks)

    batch_size, n_iter = request.batch_size or 1, request.n_iter or 1
    # One iteration is one engine job (progress, interrupt and skip follow it), so it must fit one pipeline call.
    most = min(settings.max_images_per_request, settings.max_batch_images)
    if batch_size > most:
        raise ValidationError(
            f"Invalid value for 'batch_size': {batch_size} is more than {most} images at once "
            f"(MAX_IMAGES_PER_REQUEST={settings.max_images_per_request}, "
            f"MAX_BATCH_IMAGES={settings.max_batch_images}); "
            "use n_iter for more.",
            param="batch_size",
        )
    if batch_size * n_iter > settings.max_queue_images:
        raise ValidationError(
            f"Invalid value for 'n_iter': batch_size × n_iter = {batch_size * n_iter} images is more than this "
            f"server queues at once (MAX_QUEUE_IMAGES={settings.max_queue_images}).",
            param="n_iter",
        )
    width = DEFAULT_SIDE if request.width is None else request.width
    height = DEFAULT_SIDE if request.height is None else request.height
    check_size(width, height)
    steps = request.steps or settings.default_num_inference_steps
    cfg_scale = settings.default_guidance_scale if request.cfg_scale is None else request.cfg_scale
    seed = secrets.randbits(SEED_BITS) if request.seed in (None, RANDOM_SEED) else request.seed
    extra = {"Schedule type": SCHEDULER_LABEL}
    if adapter is not None:
        extra["Lora"] = f"{adapter}:{scale:g}"
    ignored = _ignored(request) + networks.ignored
    sampler = request.sampler_name or request.sampler_index
    if sampler and sampler.lower() not in {SAMPLER.lower(), *(alias.lower() for alias in SAMPLER_ALIASES)}:
        extra["Sampler requested"] = sampler
    if ignored:
        extra["Ignored"] = ", ".join(ignored)
    common = {
        "prompt": networks.prompt,
        "negative_prompt": request.negative_prompt or None,
        "width": width,
        "height": height,
        "num_images": batch_size,
        "num_inference_steps": steps,
        "guidance_scale": cfg_scale,
        "adapter": adapter,
        "lora_scale": scale,
    }
    jobs = [GenerationParams(seed=(seed + i * batch_size) % SEED_MODULUS, **common) for i in range(n_iter)]
    return Plan(
        kind="txt2img",
        jobs=jobs,
        prompt=request.prompt or "",
        negative_prompt=request.negative_prompt or "",
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        cfg_scale=cfg_scale,
        batch_size=batch_size,
        model=checkpoint.title,
        extra=extra,
    )


def plan_img2img(settings: Settings, request: Img2ImgRequest, checkpoint_name: str) -> Plan:
    """:func:`plan` plus the input image and mask, decoded (CPU work: run it off the event loop)."""
    images = request.init_images or []
    if not images:
        raise ValidationError(
            "Missing required parameter: 'init_images' (a list of base64 images).", param="init_images"
        )
    if len(images) > MAX_INIT_IMAGES:
        raise ValidationError(
            f"Invalid value for 'init_images': at most {MAX_INIT_IMAGES} images; the first one is used.",
            param="init_images",
        )
    source = decode_image(images[0], "init_images[0]", "init_images")
    mask_image = None if request.mask is None else decode_image(request.mask, "mask", "mask")
    if request.width is None and request.height is None:
        width, height = auto_size(*source.size)
        request = request.model_copy(update={"width": width, "height": height})
    result = plan(settings, request, checkpoint_name)
    strength = DEFAULT_STRENGTH if request.denoising_strength is None else request.denoising_strength
    # The engine runs the last steps - int(steps - steps × strength) of the schedule.
    if result.steps - int(result.steps - result.steps * strength) < 1:
        raise ValidationError(
            f"Invalid value for 'denoising_strength': {strength:g} of {result.steps} steps runs none; "
            "raise it or use more steps.",
            param="denoising_strength",
        )
    resize_mode = request.resize_mode or 0
    init = np.array(_resized(source.convert("RGB"), result.width, result.height, resize_mode, Image.LANCZOS))
    repaint = None
    if mask_image is not None:
        repaint = repaint_mask(
            _resized(mask_image, result.width, result.height, resize_mode, Image.NEAREST),
            invert=bool(request.inpainting_mask_invert),
        )
    ignored = [f"init_images[1:] ({len(images) - 1} more)"] if len(images) > 1 else []
    if resize_mode > 1:
        ignored.append(f"resize_mode {resize_mode} (ran as 0)")
    if ignored:
        result.extra["Ignored"] = ", ".join(filter(None, [result.extra.get("Ignored"), *ignored]))
    result.kind = "img2img"
    result.denoising_strength = strength
    result.extra["Mask"] = "none" if repaint is None else "inverted" if request.inpainting_mask_invert else "white"
    result.jobs = [replace(job, init_image=init, mask=repaint, strength=strength) for job in result.jobs]
    return result


def _adapter(settings: Settings, checkpoint: Checkpoint, networks: PromptNetworks) -> tuple[str | None, float]:
    """One adapter per request: the prompt's ``<lora:...>``, else the checkpoint if it is an adapter."""
    if networks.lora is None:
        if checkpoint.adapter is None:
            return None, 0.0
        spec = settings.adapter(checkpoint.adapter)
        assert spec is not None
        return spec.name, spec.scale
    name, weight = networks.lora
    if checkpoint.adapter is not None and checkpoint.adapter != name:
        raise ValidationError(
            f"Invalid value for 'prompt': <lora:{name}> and the model {checkpoint.adapter!r} are two LoRA adapters; "
            "sd35 applies one per request.",
            param="prompt",
        )
    spec = settings.adapter(name)
    assert spec is not None
    return spec.name, spec.scale if weight is None else weight


# --- the answer ----------------------------------------------------------------------


def _quote(value: str) -> str:
    """AUTOMATIC1111's infotext quoting: values with separators in them become JSON strings."""
    return json.dumps(value, ensure_ascii=False) if any(ch in value for ch in ',:\n"') else value


def infotext(plan: Plan, seed: int, negative: str) -> str:
    """The one-image summary AUTOMATIC1111 writes under a picture (and into its PNG)."""
    fields = {
        "Steps": str(plan.steps),
        "Sampler": SAMPLER,
        "CFG scale": f"{plan.cfg_scale:g}",
        "Seed": str(seed),
        "Size": f"{plan.width}x{plan.height}",
        "Model": plan.model,
        **({"Denoising strength": f"{plan.denoising_strength:g}"} if plan.denoising_strength is not None else {}),
        **plan.extra,
        "Version": VERSION,
    }
    lines = [plan.prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def info(plan: Plan, seeds: list[int], job_timestamp: str) -> str:
    """``info``: JSON text in the shape of AUTOMATIC1111's ``Processed.js()``, saying what was used."""
    count = len(seeds)
    return json.dumps(
        {
            "prompt": plan.prompt,
            "all_prompts": [plan.prompt] * count,
            "negative_prompt": plan.negative_prompt,
            "all_negative_prompts": [plan.negative_prompt] * count,
            "seed": seeds[0] if seeds else plan.seed,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * count,
            "subseed_strength": 0,
            "width": plan.width,
            "height": plan.height,
            "sampler_name": SAMPLER,
            "cfg_scale": plan.cfg_scale,
            "steps": plan.steps,
            "batch_size": plan.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": plan.model,
            "sd_model_hash": None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": plan.denoising_strength,
            "extra_generation_params": plan.extra,
            "index_of_first_image": 0,
            "infotexts": [infotext(plan, seed, plan.negative_prompt) for seed in seeds],
            "styles": [],
            "job_timestamp": job_timestamp,
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": VERSION,
        },
        ensure_ascii=False,
    )


def parameters(request: Txt2ImgRequest | Img2ImgRequest) -> dict[str, Any]:
    """``parameters``: the request as understood, as AUTOMATIC1111 echoes it (inputs only on request)."""
    echoed = request.model_dump(mode="json")
    if isinstance(request, Img2ImgRequest) and not request.include_init_images:
        echoed["init_images"] = None
        echoed["mask"] = None
    return echoed
