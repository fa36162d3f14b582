"""Requests and responses of AUTOMATIC1111's API, field by field (``modules/api/models.py``).

AUTOMATIC1111 builds its request models from the processing classes'
parameters: every field is optional, ``null`` means the default, and unknown
fields are dropped (SillyTavern sends its own ``url`` and ``auth`` along). The
fields sd35 honours are typed and validated; the ones it cannot honour (hires
fix, scripts, styles, face restoration, ...) are accepted with any value and
ignored, and the response's ``info`` says what was used. Where a field is
absent sd35 uses the model's defaults (4 steps without guidance for Turbo), not
AUTOMATIC1111's 20-50 steps at CFG 7, which would be slow and burnt on a
distilled model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sd35.engine.params import SEED_MODULUS
from sd35.protocol import MAX_PROMPT_CHARS

RANDOM_SEED = -1
MAX_SEED = SEED_MODULUS - 1

Ignored = Any


class _Generation(BaseModel):
    """Fields txt2img and img2img share."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(
        default="",
        max_length=MAX_PROMPT_CHARS,
        description="What to draw. `<lora:NAME:WEIGHT>` selects a LoRA adapter (see `/sdapi/v1/loras`) "
        "at that weight and is removed from the prompt.",
    )
    negative_prompt: str | None = Field(
        default="", max_length=MAX_PROMPT_CHARS, description="What to avoid; only used when `cfg_scale` > 1."
    )
    styles: Ignored = Field(default=None, description="Accepted; ignored (sd35 has no prompt styles).")
    seed: int | None = Field(
        default=RANDOM_SEED,
        ge=RANDOM_SEED,
        le=MAX_SEED,
        description="Seed of the first image, -1 for a random one; image i uses seed + i. `info` reports the seeds.",
    )
    subseed: Ignored = Field(default=-1, description="Accepted; ignored (no variation seeds).")
    subseed_strength: Ignored = Field(default=0, description="Accepted; ignored.")
    seed_resize_from_h: Ignored = Field(default=-1, description="Accepted; ignored.")
    seed_resize_from_w: Ignored = Field(default=-1, description="Accepted; ignored.")
    sampler_name: str | None = Field(
        default=None,
        description="`Euler` (the model's flow-matching Euler scheduler) is the one sampler; any other name "
        "runs as Euler too, and `info` says so.",
    )
    scheduler: str | None = Field(default=None, description="`automatic`, the model's own sigma schedule; any value.")
    batch_size: int | None = Field(default=1, ge=1, description="Images per iteration, generated together.")
    n_iter: int | None = Field(default=1, ge=1, description="Iterations; `batch_size` × `n_iter` images in all.")
    steps: int | None = Field(
        default=None, ge=1, le=50, description="Denoising steps, 1-50 (default: the model's, 4 for Turbo)."
    )
    cfg_scale: float | None = Field(
        default=None, ge=0, le=20, description="Classifier-free guidance, 0-20 (default: the model's, 0 for Turbo)."
    )
    width: int | None = Field(
        default=None, description="Multiple of 16, 256-2048 (default 1024; img2img: the input's size)."
    )
    height: int | None = Field(default=None, description="Multiple of 16, 256-2048; width × height at most 1536².")
    restore_faces: Ignored = Field(default=None, description="Accepted; ignored.")
    tiling: Ignored = Field(default=None, description="Accepted; ignored.")
    do_not_save_samples: Ignored = Field(default=False, description="Accepted; ignored (nothing is saved).")
    do_not_save_grid: Ignored = Field(default=False, description="Accepted; ignored.")
    eta: Ignored = Field(default=None, description="Accepted; ignored.")
    s_min_uncond: Ignored = Field(default=None, description="Accepted; ignored.")
    s_churn: Ignored = Field(default=None, description="Accepted; ignored.")
    s_tmax: Ignored = Field(default=None, description="Accepted; ignored.")
    s_tmin: Ignored = Field(default=None, description="Accepted; ignored.")
    s_noise: Ignored = Field(default=None, description="Accepted; ignored.")
    override_settings: dict[str, Any] | None = Field(
        default=None,
        description="Only `sd_model_checkpoint` is honoured (the base model or a LoRA adapter, for this request).",
    )
    override_settings_restore_afterwards: Ignored = Field(default=True, description="Accepted; ignored.")
    refiner_checkpoint: Ignored = Field(default=None, description="Accepted; ignored.")
    refiner_switch_at: Ignored = Field(default=None, description="Accepted; ignored.")
    disable_extra_networks: Ignored = Field(default=False, description="Accepted; ignored.")
    firstpass_image: Ignored = Field(default=None, description="Accepted; ignored.")
    comments: Ignored = Field(default=None, description="Accepted; ignored.")
    sampler_index: str | None = Field(default="Euler", description="The older name of `sampler_name`.")
    script_name: Ignored = Field(default=None, description="Accepted; ignored (sd35 has no scripts).")
    script_args: Ignored = Field(default=[], description="Accepted; ignored.")
    send_images: bool | None = Field(default=True, description="False answers without the images.")
    save_images: Ignored = Field(default=False, description="Accepted; ignored (nothing is saved).")
    alwayson_scripts: Ignored = Field(default={}, description="Accepted; ignored.")
    force_task_id: Ignored = Field(default=None, description="Accepted; ignored.")
    infotext: Ignored = Field(default=None, description="Accepted; ignored.")


class Txt2ImgRequest(_Generation):
    """Body of ``POST /sdapi/v1/txt2img``."""

    enable_hr: Ignored = Field(default=False, description="Accepted; ignored (no hires fix).")
    denoising_strength: Ignored = Field(default=None, description="Hires fix only: accepted; ignored.")
    firstphase_width: Ignored = Field(default=0, description="Accepted; ignored.")
    firstphase_height: Ignored = Field(default=0, description="Accepted; ignored.")
    hr_scale: Ignored = Field(default=2.0, description="Accepted; ignored.")
    hr_upscaler: Ignored = Field(default=None, description="Accepted; ignored.")
    hr_second_pass_steps: Ignored = Field(default=0, description="Accepted; ignored.")
    hr_resize_x: Ignored = Field(default=0, description="Accepted; ignored.")
    hr_resize_y: Ignored = Field(default=0, description="Accepted; ignored.")
    hr_checkpoint_name: Ignored = Field(default=None, description="Accepted; ignored.")
    hr_sampler_name: Ignored = Field(default=None, description="Accepted; ignored.")
    hr_scheduler: Ignored = Field(default=None, description="Accepted; ignored.")
    hr_prompt: Ignored = Field(default="", description="Accepted; ignored.")
    hr_negative_prompt: Ignored = Field(default="", description="Accepted; ignored.")


class Img2ImgRequest(_Generation):
    """Body of ``POST /sdapi/v1/img2img``."""

    init_images: list[str] | None = Field(
        default=None,
        description="The input: base64 PNG, JPEG or WebP, bare or as a `data:image/...;base64,` URI "
        "(URLs are not fetched). The first one is used.",
    )
    resize_mode: int | None = Field(
        default=0, ge=0, le=3, description="0 stretches the input to width × height, 1 crops it to fit; 2, 3 as 0."
    )
    denoising_strength: float | None = Field(
        default=0.75, gt=0, le=1, description="How much to repaint, (0, 1]; steps × strength of them are run."
    )
    image_cfg_scale: Ignored = Field(default=None, description="Accepted; ignored.")
    mask: str | None = Field(
        default=None,
        description="Inpainting mask (base64 image): white repaints, black keeps (with transparency: opaque "
        "repaints); resized to the output.",
    )
    mask_blur_x: Ignored = Field(default=4, description="Accepted; ignored.")
    mask_blur_y: Ignored = Field(default=4, description="Accepted; ignored.")
    mask_blur: Ignored = Field(default=None, description="Accepted; ignored (the mask is used as it is).")
    mask_round: Ignored = Field(default=True, description="Accepted; ignored.")
    inpainting_fill: Ignored = Field(default=0, description="Accepted; ignored (the masked area starts as the input).")
    inpaint_full_res: Ignored = Field(default=True, description="Accepted; ignored.")
    inpaint_full_res_padding: Ignored = Field(default=0, description="Accepted; ignored.")
    inpainting_mask_invert: int | None = Field(default=0, ge=0, le=1, description="1: black repaints, white keeps.")
    initial_noise_multiplier: Ignored = Field(default=None, description="Accepted; ignored.")
    latent_mask: Ignored = Field(default=None, description="Accepted; ignored.")
    include_init_images: bool | None = Field(
        default=False, description="Echo `init_images` and `mask` back in `parameters`."
    )


# --- responses ------------------------------------------------------------------


class ImagesResponse(BaseModel):
    """What txt2img and img2img answer."""

    images: list[str] | None = Field(default=None, description="The images, base64 PNG (no `data:` prefix).")
    parameters: dict[str, Any] = Field(description="The request's fields as understood (sd35 adds no others).")
    info: str = Field(description="JSON text: what was used (seed, all_seeds, width, height, sampler_name, ...).")


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int = Field(description="Your jobs (iterations) not yet answered, queued ones included.")
    job_timestamp: str
    job_no: int = Field(description="Of those, how many are finished.")
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float = Field(description="0-1 over your running requests; 0 when nothing is queued or running.")
    eta_relative: float = Field(description="Seconds left, estimated from the denoising steps so far.")
    state: ProgressState
    current_image: str | None = Field(default=None, description="Always null: sd35 sends no previews here.")
    textinfo: str | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


class LatentUpscalerModeItem(BaseModel):
    name: str


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str] | None = None
    img2img: list[str] | None = None


class Options(BaseModel):
    """The settings sd35 has; ``sd_model_checkpoint`` is the one that can be set."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    sd_model_checkpoint: str = Field(description="The base model's title or a LoRA adapter's name.")
    sd_checkpoint_hash: str | None = None
    sd_vae: str = "Automatic"
    sd_lora: str = "None"
    CLIP_stop_at_last_layers: int = 1
    samples_format: str = "png"
    eta_noise_seed_delta: int = 0


class A1111Error(BaseModel):
    detail: str = Field(description="What went wrong; for a 422, the field that is invalid and why.")
