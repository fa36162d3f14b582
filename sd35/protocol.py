"""Request and response models of the OpenAI Images API, field by field.

Fields follow OpenAI's order and nullability (clients send ``null`` for
"default"); fields OpenAI defines that cannot change an SD3.5 image are
accepted and ignored, and unknown fields are ignored rather than rejected, as
strict servers break real clients. Our extensions sit in a marked block.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sd35.config import MAX_IMAGES_PER_REQUEST_LIMIT
from sd35.imaging import SIZE_RULE, parse_size

MAX_PROMPT_CHARS = 4096
MAX_SEED = 2**64 - 1
# OpenAI answers these models with URLs when response_format is absent; every
# other model (gpt-image-1, ours) with base64. Requests naming them keep the
# leniency of the old API: any quality, style, background or moderation.
DALL_E_MODELS = frozenset({"dall-e-2", "dall-e-3"})
URL_BY_DEFAULT = DALL_E_MODELS
# OpenAI's GPT image models (gpt-image-1, -1-mini, -1.5, -2, dated snapshots;
# chatgpt-image-latest) answer in base64 only.
GPT_IMAGE_PREFIX = "gpt-image-"
GPT_IMAGE_ALIASES = frozenset({"chatgpt-image-latest"})

# The values OpenAI accepts today: its OpenAPI document (openai-openapi,
# CreateImageRequest / CreateImageEditRequest) and the newer openai-python 3.57
# (which adds quality xhigh and max, and complexity, for gpt-image-2.5 models).
# Anything else is a 400 naming the parameter.
QUALITY_CHOICES = ("standard", "hd", "low", "medium", "high", "xhigh", "max", "auto")
EDIT_QUALITY_CHOICES = ("standard", "low", "medium", "high", "xhigh", "max", "auto")
BACKGROUND_CHOICES = ("transparent", "opaque", "auto")
MODERATION_CHOICES = ("low", "auto")
STYLE_CHOICES = ("vivid", "natural")
INPUT_FIDELITY_CHOICES = ("high", "low")
COMPLEXITY_CHOICES = ("low", "medium", "high")

MODEL_DESCRIPTION = (
    "A LoRA adapter's name (see `/v1/models`) selects it; anything else - the base model's id, `gpt-image-2`, "
    "`dall-e-3`, nothing - means the base model. GPT image names (`gpt-image-*`) answer in base64 only, as at "
    "OpenAI; `dall-e-2`/`dall-e-3` keep the old API's leniency (any `quality`, `style`, `background`, `moderation`)."
)
RESPONSE_FORMAT_DESCRIPTION = (
    "`b64_json` returns the image inline, `url` a link (not for `gpt-image-*` models, which return base64 only, "
    "as at OpenAI). When absent: `url` if `model` is `dall-e-2` or `dall-e-3` (as at OpenAI), else `b64_json`."
)
N_DESCRIPTION = (
    "Number of images, 1 to the server's MAX_IMAGES_PER_REQUEST (default 4, at most 10: OpenAI's range). "
    "More than MAX_BATCH_IMAGES run as several batches, image i with seed + i."
)
LORA_SCALE_DESCRIPTION = "With an adapter as `model`: its strength, 0–2 (default: the adapter's configured scale)."
QUALITY_DESCRIPTION = (
    "One of OpenAI's values; a 4-step distilled model has no quality levels to choose from, so it changes nothing "
    "(and the response carries no `quality`)."
)
BACKGROUND_DESCRIPTION = (
    "`opaque` or `auto`: SD3.5 draws opaque images. `transparent` is refused (400): with `jpeg` as OpenAI refuses it, "
    "otherwise because this model cannot draw transparency."
)
MODERATION_DESCRIPTION = "`low` or `auto`; accepted and ignored: this server runs no moderation model."
STYLE_DESCRIPTION = "`vivid` or `natural` (dall-e-3's); accepted and ignored."
COMPLEXITY_DESCRIPTION = "`low`, `medium` or `high` (gpt-image-2.5's planning effort); accepted and ignored."
N_SCHEMA = {"minimum": 1, "maximum": MAX_IMAGES_PER_REQUEST_LIMIT}


def _has_text(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must contain some text, not only whitespace")
    return prompt


Prompt = Annotated[str, AfterValidator(_has_text)]


def _model_name(model: str | None) -> str:
    return (model or "").strip().lower()


def is_dall_e(model: str | None) -> bool:
    """The request names dall-e-2 or dall-e-3: OpenAI's old models, whose loose parameters we keep accepting."""
    return _model_name(model) in DALL_E_MODELS


def is_gpt_image(model: str | None) -> bool:
    """The request names one of OpenAI's GPT image models, which answer in base64 only."""
    name = _model_name(model)
    return name.startswith(GPT_IMAGE_PREFIX) or name in GPT_IMAGE_ALIASES


def _one_of(choices: tuple[str, ...]) -> str:
    quoted = [f"'{choice}'" for choice in choices]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


def _check_choice(value: str | None, info: ValidationInfo, choices: tuple[str, ...]) -> str | None:
    """OpenAI's enum for a parameter, except for requests naming dall-e-2/dall-e-3 (accepted as before)."""
    if value is None or is_dall_e(info.data.get("model")) or value in choices:
        return value
    raise ValueError(f"input should be {_one_of(choices)}; got {value!r}")


def _check_response_format(value: str | None, info: ValidationInfo) -> str | None:
    model = info.data.get("model")
    if value == "url" and is_gpt_image(model):
        raise ValueError(
            f"{model.strip()} returns images as base64 only, as at OpenAI; leave response_format out (or "
            "send 'b64_json'), or name another model (dall-e-3, or this server's own model id) to get a URL"
        )
    return value


def _check_background(value: str | None, info: ValidationInfo) -> str | None:
    value = _check_choice(value, info, BACKGROUND_CHOICES)
    if value != "transparent" or is_dall_e(info.data.get("model")):
        return value
    if info.data.get("output_format") == "jpeg":
        raise ValueError("'transparent' needs an output_format with an alpha channel: 'png' or 'webp', not 'jpeg'")
    raise ValueError("'transparent' is not supported: SD3.5 draws opaque images; send 'opaque' or 'auto'")


class _ResponseFormatDefault(BaseModel):
    """Fills an absent (or null) ``response_format`` with OpenAI's per-model default."""

    @model_validator(mode="after")
    def _default_response_format(self) -> Self:
        if getattr(self, "response_format", None) is None:
            self.response_format = "url" if is_dall_e(getattr(self, "model", None)) else "b64_json"
        return self


StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


class ImageGenerationRequest(_ResponseFormatDefault):
    """Body of ``POST /v1/images/generations``.

    Fields in OpenAI's order (``CreateImageRequest``): validators that depend
    on ``model`` or ``output_format`` run after those fields.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description=f"What to draw, 1–{MAX_PROMPT_CHARS} characters.",
        examples=["A lighthouse on a cliff at dawn, oil painting"],
    )
    model: str | None = Field(default=None, description=MODEL_DESCRIPTION, examples=["gpt-image-2"])
    # The range is the server's (MAX_IMAGES_PER_REQUEST), checked when the request is served.
    n: StrictInt | None = Field(default=1, description=N_DESCRIPTION, json_schema_extra=N_SCHEMA)
    quality: str | None = Field(
        default=None, description=QUALITY_DESCRIPTION, json_schema_extra={"enum": [*QUALITY_CHOICES, None]}
    )
    response_format: Literal["b64_json", "url"] | None = Field(default=None, description=RESPONSE_FORMAT_DESCRIPTION)
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default="png", description="Image encoding.")
    output_compression: StrictInt | None = Field(
        default=100,
        ge=0,
        le=100,
        description="0–100: the quality of jpeg and webp (100 = lossless webp); png is always lossless.",
    )
    stream: StrictBool | None = Field(
        default=False, description="Server-sent events: `image_generation.partial_image`, then `.completed`."
    )
    partial_images: StrictInt | None = Field(
        default=None, ge=0, le=3, description="With `stream`: previews sent before the final image, 0–3."
    )
    size: str | None = Field(default="1024x1024", description=f"Image size: {SIZE_RULE}.", examples=["1024x1024"])
    moderation: str | None = Field(
        default=None, description=MODERATION_DESCRIPTION, json_schema_extra={"enum": [*MODERATION_CHOICES, None]}
    )
    background: str | None = Field(
        default=None, description=BACKGROUND_DESCRIPTION, json_schema_extra={"enum": ["opaque", "auto", None]}
    )
    style: str | None = Field(
        default=None, description=STYLE_DESCRIPTION, json_schema_extra={"enum": [*STYLE_CHOICES, None]}
    )
    complexity: str | None = Field(
        default=None, description=COMPLEXITY_DESCRIPTION, json_schema_extra={"enum": [*COMPLEXITY_CHOICES, None]}
    )
    user: str | None = Field(default=None, description="Accepted for compatibility; ignored.")

    # --- sd35 extensions (not part of the OpenAI API) ---
    seed: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the first image; image i uses seed + i. Same seed and parameters, same image.",
    )
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="What to avoid; only used when guidance_scale > 1."
    )
    num_inference_steps: StrictInt | None = Field(
        default=None, ge=1, le=50, description="Denoising steps, 1–50 (default: the model's, 4 for Turbo)."
    )
    guidance_scale: StrictFloat | None = Field(
        default=None, ge=0, le=20, description="Classifier-free guidance, 0–20 (default: the model's, 0 for Turbo)."
    )
    lora_scale: StrictFloat | None = Field(default=None, ge=0, le=2, description=LORA_SCALE_DESCRIPTION)

    @field_validator("size")
    @classmethod
    def _size_is_supported(cls, size: str | None) -> str | None:
        if size is not None:
            parse_size(size)
        return size

    @field_validator("quality")
    @classmethod
    def _quality(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_choice(value, info, QUALITY_CHOICES)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_response_format(value, info)

    @field_validator("moderation")
    @classmethod
    def _moderation(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_choice(value, info, MODERATION_CHOICES)

    @field_validator("background")
    @classmethod
    def _background(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_background(value, info)

    @field_validator("style")
    @classmethod
    def _style(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_choice(value, info, STYLE_CHOICES)

    @field_validator("complexity")
    @classmethod
    def _complexity(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_choice(value, info, COMPLEXITY_CHOICES)

    def dimensions(self) -> tuple[int, int]:
        """(width, height) to generate."""
        return parse_size(self.size or "auto")


class ImageData(BaseModel):
    b64_json: str | None = Field(default=None, description="The image, base64-encoded.")
    url: str | None = Field(default=None, description="Where to fetch the image, without an API key.")
    revised_prompt: str | None = None


class InputTokensDetails(BaseModel):
    text_tokens: int = Field(description="Prompt tokens as the text encoder with the longest context read them.")
    image_tokens: int = Field(description="Latent patches of the edited input image: (W/16)·(H/16); 0 otherwise.")


class OutputTokensDetails(BaseModel):
    image_tokens: int = Field(description="All of output_tokens.")
    text_tokens: int = Field(description="Always 0: the model writes no text.")


class ImagesUsage(BaseModel):
    """Token counts of the request, counted as SD3.5's MMDiT processes them (see the README)."""

    input_tokens: int = Field(description="text_tokens + image_tokens.")
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(description="Latent patches the transformer denoised: (W/16)·(H/16) per image.")
    output_tokens_details: OutputTokensDetails | None = Field(default=None, description="Not in stream events.")
    total_tokens: int = Field(description="input_tokens + output_tokens.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time in seconds.")
    data: list[ImageData]
    background: Literal["transparent", "opaque"] | None = Field(default=None, description="Always `opaque`.")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    quality: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(
        default=None, description="Never sent: quality changes nothing here (see the request's `quality`)."
    )
    size: str | None = Field(default=None, examples=["1024x1024"])
    usage: ImagesUsage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    model_loaded: bool
    model: str
    detail: str | None = Field(default=None, description="Why the model is not loaded yet, or why loading failed.")
    memory_mode: str | None = Field(
        default=None, description="The resolved MEMORY_MODE (what `auto` chose), once loading has begun."
    )
    weight_bytes: int | None = Field(
        default=None, description="Bytes of model weights held, quantized weights at their stored size."
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # As vLLM lists LoRA adapters: root is where the weights come from,
    # parent the model an adapter applies to (None for the base model).
    root: str | None = Field(default=None, description="The weights: the base model's id, or the adapter's source.")
    parent: str | None = Field(default=None, description="For an adapter: the id of the model it applies to.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _UploadRequest(_ResponseFormatDefault):
    """Fields shared by edits and variations (multipart forms: every value arrives as text).

    ``model`` comes first: the validators of later fields depend on it.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description=MODEL_DESCRIPTION)
    n: int | None = Field(default=1, description=N_DESCRIPTION, json_schema_extra=N_SCHEMA)
    response_format: Literal["b64_json", "url"] | None = Field(default=None, description=RESPONSE_FORMAT_DESCRIPTION)
    size: str | None = Field(
        default="auto", description=f"Output size: {SIZE_RULE}; `auto` keeps the input's aspect ratio."
    )
    user: str | None = Field(default=None, description="Accepted for compatibility; ignored.")

    # --- sd35 extensions (not part of the OpenAI API) ---
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Seed of the first image; image i: seed + i.")
    num_inference_steps: int | None = Field(default=None, ge=1, le=50, description="Denoising steps, 1–50.")
    guidance_scale: float | None = Field(default=None, ge=0, le=20, description="Classifier-free guidance, 0–20.")
    lora_scale: float | None = Field(default=None, ge=0, le=2, description=LORA_SCALE_DESCRIPTION)
    strength: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="How much of the input to repaint, (0, 1]: 1 ignores it (default with a mask), "
        "small values stay close (default 0.6 without a mask, 0.4 with `input_fidelity: high`).",
    )

    @field_validator("size")
    @classmethod
    def _size_is_supported(cls, size: str | None) -> str | None:
        if size is not None and size.strip().lower() != "auto":
            parse_size(size)
        return size

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_response_format(value, info)


class ImageEditRequest(_UploadRequest):
    """Form fields of ``POST /v1/images/edits`` (besides the files ``image``/``image[]`` and ``mask``).

    ``output_format`` comes before ``background``, whose check depends on it.
    """

    prompt: Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the edited image shows.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default="png", description="Image encoding.")
    output_compression: int | None = Field(default=100, ge=0, le=100, description="0–100 for jpeg and webp.")
    background: str | None = Field(
        default=None, description=BACKGROUND_DESCRIPTION, json_schema_extra={"enum": ["opaque", "auto", None]}
    )
    complexity: str | None = Field(
        default=None, description=COMPLEXITY_DESCRIPTION, json_schema_extra={"enum": [*COMPLEXITY_CHOICES, None]}
    )
    input_fidelity: str | None = Field(
        default=None,
        description="`high` keeps more of the input image: without a mask and without `strength`, the edit "
        "repaints 0.4 of it instead of 0.6. `low` (OpenAI's default) changes nothing.",
        json_schema_extra={"enum": [*INPUT_FIDELITY_CHOICES, None]},
    )
    moderation: str | None = Field(
        default=None, description=MODERATION_DESCRIPTION, json_schema_extra={"enum": [*MODERATION_CHOICES, None]}
    )
    quality: str | None = Field(
        default=None, description=QUALITY_DESCRIPTION, json_schema_extra={"enum": [*EDIT_QUALITY_CHOICES, None]}
    )
    partial_images: int | None = Field(default=None, ge=0, le=3, description="With `stream`: previews, 0–3.")
    stream: bool | None = Field(default=False, description="Server-sent events: `image_edit.partial_image`, ...")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="What to avoid.")

    @field_validator("background")
    @classmethod
    def _background(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_background(value, info)

    @field_validator("complexity")
    @classmethod
    def _complexity(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_choice(value, info, COMPLEXITY_CHOICES)

    @field_validator("input_fidelity")
    @classmethod
    def _input_fidelity(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_choice(value, info, INPUT_FIDELITY_CHOICES)

    @field_validator("moderation")
    @classmethod
    def _moderation(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_choice(value, info, MODERATION_CHOICES)

    @field_validator("quality")
    @classmethod
    def _quality(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_choice(value, info, EDIT_QUALITY_CHOICES)


class ImageVariationRequest(_UploadRequest):
    """Form fields of ``POST /v1/images/variations`` (besides the file ``image``)."""


class ImageStreamEvent(BaseModel):
    """``data`` of an ``image_generation.*`` / ``image_edit.*`` server-sent event."""

    type: Literal[
        "image_generation.partial_image",
        "image_generation.completed",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    b64_json: str
    background: Literal["opaque"]
    created_at: int
    output_format: Literal["png", "jpeg", "webp"]
    quality: Literal["auto"]
    size: str
    image_index: int = Field(description="sd35 extension: which of the request's n images this event is about.")
    partial_image_index: int | None = Field(default=None, description="Only on `*.partial_image` events.")
    usage: ImagesUsage | None = Field(
        default=None, description="Only on `*.completed` events: the whole request's usage, the same on each."
    )


class StreamErrorEvent(BaseModel):
    """``data`` of an ``error`` event: the request failed after the stream had started."""

    type: Literal["error"]
    error: ErrorDetail
