"""Request and response models of the OpenAI Images API, field by field.

Fields follow OpenAI's order and nullability (clients send ``null`` for
"default"); fields OpenAI defines that cannot change an SD3.5 image are
accepted and ignored, and unknown fields are ignored rather than rejected, as
strict servers break real clients. Our extensions sit in a marked block.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from sd35.imaging import SIZE_RULE, parse_size

MAX_PROMPT_CHARS = 4096
MAX_IMAGES_PER_REQUEST = 4
MAX_SEED = 2**64 - 1
# OpenAI answers these models with URLs when response_format is absent; every
# other model (gpt-image-1, ours) with base64.
URL_BY_DEFAULT = frozenset({"dall-e-2", "dall-e-3"})
MODEL_DESCRIPTION = (
    "A LoRA adapter's name (see `/v1/models`) selects it; anything else - the base model's id, `dall-e-3`, "
    "`gpt-image-1`, nothing - means the base model."
)
RESPONSE_FORMAT_DESCRIPTION = (
    "`b64_json` returns the image inline, `url` a link. When absent: `url` if `model` is `dall-e-2` or "
    "`dall-e-3` (as at OpenAI), else `b64_json`."
)
LORA_SCALE_DESCRIPTION = "With an adapter as `model`: its strength, 0–2 (default: the adapter's configured scale)."


def _has_text(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must contain some text, not only whitespace")
    return prompt


Prompt = Annotated[str, AfterValidator(_has_text)]


class _ResponseFormatDefault(BaseModel):
    """Fills an absent (or null) ``response_format`` with OpenAI's per-model default."""

    @model_validator(mode="after")
    def _default_response_format(self) -> Self:
        if getattr(self, "response_format", None) is None:
            model = (getattr(self, "model", None) or "").strip().lower()
            self.response_format = "url" if model in URL_BY_DEFAULT else "b64_json"
        return self


StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


class ImageGenerationRequest(_ResponseFormatDefault):
    """Body of ``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description=f"What to draw, 1–{MAX_PROMPT_CHARS} characters.",
        examples=["A lighthouse on a cliff at dawn, oil painting"],
    )
    background: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    model: str | None = Field(default=None, description=MODEL_DESCRIPTION, examples=["dall-e-3"])
    moderation: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    n: StrictInt | None = Field(
        default=1, ge=1, le=MAX_IMAGES_PER_REQUEST, description=f"Number of images, 1–{MAX_IMAGES_PER_REQUEST}."
    )
    output_compression: StrictInt | None = Field(
        default=100, ge=0, le=100, description="0–100; quality for jpeg and webp (100 = lossless webp)."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default="png", description="Image encoding.")
    partial_images: StrictInt | None = Field(
        default=None, ge=0, le=3, description="With `stream`: previews sent before the final image, 0–3."
    )
    quality: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    response_format: Literal["b64_json", "url"] | None = Field(default=None, description=RESPONSE_FORMAT_DESCRIPTION)
    size: str | None = Field(default="1024x1024", description=f"Image size: {SIZE_RULE}.", examples=["1024x1024"])
    stream: StrictBool | None = Field(
        default=False, description="Server-sent events: `image_generation.partial_image`, then `.completed`."
    )
    style: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
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

    def dimensions(self) -> tuple[int, int]:
        """(width, height) to generate."""
        return parse_size(self.size or "auto")


class ImageData(BaseModel):
    b64_json: str | None = Field(default=None, description="The image, base64-encoded.")
    url: str | None = Field(default=None, description="Where to fetch the image, without an API key.")
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time in seconds.")
    data: list[ImageData]
    background: Literal["transparent", "opaque"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    quality: str | None = None
    size: str | None = Field(default=None, examples=["1024x1024"])


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
    """Fields shared by edits and variations (multipart forms: every value arrives as text)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description=MODEL_DESCRIPTION)
    n: int | None = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST, description="Number of images, 1–4.")
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
        "small values stay close (default 0.6 without a mask).",
    )

    @field_validator("size")
    @classmethod
    def _size_is_supported(cls, size: str | None) -> str | None:
        if size is not None and size.strip().lower() != "auto":
            parse_size(size)
        return size


class ImageEditRequest(_UploadRequest):
    """Form fields of ``POST /v1/images/edits`` (besides the files ``image``/``image[]`` and ``mask``)."""

    prompt: Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the edited image shows.")
    background: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    input_fidelity: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    moderation: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    output_compression: int | None = Field(default=100, ge=0, le=100, description="0–100 for jpeg and webp.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default="png", description="Image encoding.")
    quality: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    partial_images: int | None = Field(default=None, ge=0, le=3, description="With `stream`: previews, 0–3.")
    stream: bool | None = Field(default=False, description="Server-sent events: `image_edit.partial_image`, ...")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="What to avoid.")


class ImageVariationRequest(_UploadRequest):
    """Form fields of ``POST /v1/images/variations`` (besides the file ``image``)."""


class StreamUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    total_tokens: int


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
    usage: StreamUsage | None = Field(default=None, description="Only on `*.completed` events.")


class StreamErrorEvent(BaseModel):
    """``data`` of an ``error`` event: the request failed after the stream had started."""

    type: Literal["error"]
    error: ErrorDetail
