"""Configuration: every variable, its default, and one clear line for a bad value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sd35.config import DEFAULT_MODEL_ID, ConfigError, load_settings, published_defaults
from tests.server import failed_start


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.model_id == DEFAULT_MODEL_ID
    assert settings.hf_token is None and settings.api_keys == () and not settings.auth_enabled
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.enable_cache_dit is False
    assert (settings.default_num_inference_steps, settings.default_guidance_scale) == (4, 0.0)
    assert settings.device == "auto"
    assert (settings.memory_mode, settings.torch_compile, settings.vae_channels_last) == ("auto", "off", False)
    assert (settings.warmup, settings.workers) == (True, 1)
    assert (settings.body_read_timeout, settings.max_buffered_bytes) == (30.0, 256 << 20)
    assert (settings.body_min_rate, settings.image_store_timeout) == (4096.0, 20.0)
    assert settings.image_store_s3_prefix == "sd35/"


def test_every_variable_is_read() -> None:
    settings = load_settings(
        {
            "MODEL_ID": "/models/sd35",
            "HUGGING_FACE_HUB_TOKEN": "hf_b",
            "API_KEY": " k1 , k2 ",
            "HOST": "127.0.0.1",
            "PORT": "9000",
            "ENABLE_CACHE_DIT": "TRUE",
            "DEFAULT_NUM_INFERENCE_STEPS": "8",
            "DEFAULT_GUIDANCE_SCALE": "1.5",
            "DEVICE": "cuda:1",
            "MAX_QUEUE_IMAGES": "10",
            "MAX_BATCH_IMAGES": "2",
            "REQUEST_TIMEOUT": "30",
            "MAX_BODY_BYTES": "4096",
            "LOG_LEVEL": "debug",
            "MEMORY_MODE": "cpu_offload",
            "TORCH_COMPILE": "Blocks",
            "VAE_CHANNELS_LAST": "yes",
            "WARMUP": "false",
            "WORKERS": "4",
            "BODY_READ_TIMEOUT": "2.5",
            "BODY_MIN_RATE": "0",
            "MAX_BUFFERED_BYTES": str(128 << 20),
            "IMAGE_STORE_TIMEOUT": "7.5",
            "IMAGE_STORE_S3_PREFIX": "/team/images/",
        }
    )
    assert settings.model_id == "/models/sd35" and settings.hf_token == "hf_b"
    assert settings.api_keys == ("k1", "k2") and settings.auth_enabled
    assert (settings.host, settings.port, settings.enable_cache_dit) == ("127.0.0.1", 9000, True)
    assert (settings.default_num_inference_steps, settings.default_guidance_scale) == (8, 1.5)
    assert (settings.device, settings.max_queue_images, settings.max_batch_images) == ("cuda:1", 10, 2)
    assert (settings.request_timeout, settings.max_body_bytes, settings.log_level) == (30.0, 4096, "DEBUG")
    assert (settings.memory_mode, settings.torch_compile) == ("cpu_offload", "blocks")
    assert (settings.vae_channels_last, settings.warmup, settings.workers) == (True, False, 4)
    assert (settings.body_read_timeout, settings.max_buffered_bytes) == (2.5, 128 << 20)
    assert (settings.body_min_rate, settings.image_store_timeout) == (0.0, 7.5)
    assert settings.image_store_s3_prefix == "team/images/"


def test_hf_token_wins_over_the_long_name() -> None:
    assert load_settings({"HF_TOKEN": "a", "HUGGING_FACE_HUB_TOKEN": "b"}).hf_token == "a"
    assert load_settings({"HUGGING_FACE_HUB_TOKEN": "b"}).hf_token == "b"


def test_secrets_stay_out_of_repr_and_summary() -> None:
    settings = load_settings({"HF_TOKEN": "hf_secret", "API_KEY": "sk-secret,sk-secret2"})
    assert "secret" not in repr(settings)
    assert "secret" not in settings.summary()
    assert "auth=on (2 keys)" in settings.summary() and "hf_token=set" in settings.summary()


@pytest.mark.parametrize(
    ("model_id", "steps", "guidance"),
    [
        ("stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0),
        ("stabilityai/stable-diffusion-3.5-large", 28, 3.5),
        ("stabilityai/stable-diffusion-3.5-medium", 40, 4.5),
        ("/some/local/dir", 4, 0.0),
    ],
)
def test_model_defaults(model_id: str, steps: int, guidance: float) -> None:
    assert published_defaults(model_id).num_inference_steps == steps
    settings = load_settings({"MODEL_ID": model_id})
    assert (settings.default_num_inference_steps, settings.default_guidance_scale) == (steps, guidance)


def test_explicit_defaults_override_the_model() -> None:
    settings = load_settings(
        {"MODEL_ID": "stabilityai/stable-diffusion-3.5-large", "DEFAULT_NUM_INFERENCE_STEPS": "20"}
    )
    assert (settings.default_num_inference_steps, settings.default_guidance_scale) == (20, 3.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "0"),
        ("PORT", "70000"),
        ("HOST", "not a host"),
        ("ENABLE_CACHE_DIT", "maybe"),
        ("API_KEY", "a,,b"),
        ("API_KEY", "two words"),
        ("DEFAULT_NUM_INFERENCE_STEPS", "0"),
        ("DEFAULT_GUIDANCE_SCALE", "-1"),
        ("DEVICE", "tpu"),
        ("MAX_QUEUE_IMAGES", "0"),
        ("MAX_BATCH_IMAGES", "x"),
        ("MAX_IMAGES_PER_REQUEST", "0"),
        ("MAX_IMAGES_PER_REQUEST", "11"),
        ("MAX_IMAGES_PER_REQUEST", "four"),
        ("REQUEST_TIMEOUT", "0"),
        ("MAX_BODY_BYTES", "10"),
        ("LOG_LEVEL", "loud"),
        ("MEMORY_MODE", "tiny"),
        ("TORCH_COMPILE", "yes"),
        ("VAE_CHANNELS_LAST", "2"),
        ("WARMUP", "sometimes"),
        ("WORKERS", "0"),
        ("BODY_READ_TIMEOUT", "0"),
        ("MAX_BUFFERED_BYTES", "many"),
        ("MAX_BUFFERED_BYTES", str(32 << 20)),
        ("BODY_MIN_RATE", "-1"),
        ("IMAGE_STORE_TIMEOUT", "0"),
        ("IMAGE_STORE_S3_PREFIX", "/"),
        ("IMAGE_STORE_S3_PREFIX", "//"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({name: value})
    message = str(raised.value)
    assert message.startswith(f"{name}=") and "\n" not in message
    assert "expected" in message


def test_buffered_bytes_must_hold_the_largest_body() -> None:
    settings = load_settings({"MAX_BUFFERED_BYTES": str(8 << 20), "MAX_UPLOAD_BYTES": str(8 << 20)})
    assert settings.max_buffered_bytes == settings.max_upload_bytes == 8 << 20
    with pytest.raises(ConfigError, match="MAX_UPLOAD_BYTES"):
        load_settings({"MAX_BUFFERED_BYTES": str(8 << 20), "MAX_UPLOAD_BYTES": str(9 << 20)})


def test_max_images_per_request() -> None:
    assert load_settings({}).max_images_per_request == 4
    assert load_settings({"MAX_IMAGES_PER_REQUEST": "10"}).max_images_per_request == 10
    # The default cap stays valid beside a small queue (whose own 400 names MAX_QUEUE_IMAGES); a cap set above it not.
    assert load_settings({"MAX_QUEUE_IMAGES": "2"}).max_images_per_request == 4
    with pytest.raises(ConfigError, match="MAX_IMAGES_PER_REQUEST=8 is invalid: expected at most MAX_QUEUE_IMAGES"):
        load_settings({"MAX_IMAGES_PER_REQUEST": "8", "MAX_QUEUE_IMAGES": "6"})


def test_blank_values_mean_unset() -> None:
    settings = load_settings({"PORT": "", "API_KEY": "  ", "MODEL_ID": ""})
    assert (settings.port, settings.api_keys, settings.model_id) == (8000, (), DEFAULT_MODEL_ID)


def test_bentoml_serve_stops_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "PORT": "eighty", "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    assert failed_start(env, mentioning="PORT") == [
        "sd35: configuration error: PORT='eighty' is invalid: expected an integer port between 1 and 65535"
    ]


def test_lora_adapters_local_hub_and_scales(tmp_path: Path) -> None:
    (tmp_path / "ink").mkdir()
    (tmp_path / "neon.safetensors").write_bytes(b"")
    raw = (
        f" ink={tmp_path / 'ink'} , neon = {tmp_path / 'neon.safetensors'}@0.8,"
        "hub=owner/repo-name,file=owner/repo/sub/weights.safetensors@2"
    )
    adapters = load_settings({"LORA_ADAPTERS": raw}).lora_adapters
    assert [(a.name, a.source, a.weight_name, a.scale) for a in adapters] == [
        ("ink", str(tmp_path / "ink"), None, 1.0),
        ("neon", str(tmp_path), "neon.safetensors", 0.8),
        ("hub", "owner/repo-name", None, 1.0),
        ("file", "owner/repo", "sub/weights.safetensors", 2.0),
    ]
    assert adapters[3].location == "owner/repo/sub/weights.safetensors"
    assert load_settings({}).lora_adapters == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ink", "LORA_ADAPTERS entry 'ink' is invalid: expected name=source[@scale], comma-separated"),
        ("=owner/repo", "LORA_ADAPTERS entry '=owner/repo' is invalid"),
        ("bad name=owner/repo", "LORA_ADAPTERS: adapter name 'bad name' is invalid"),
        ("ink=owner/repo@3", "LORA_ADAPTERS: adapter 'ink' has scale '3': expected a number from 0 to 2 after '@'"),
        ("ink=owner/repo@strong", "has scale 'strong'"),
        ("ink=/no/such/dir", "LORA_ADAPTERS: adapter 'ink': /no/such/dir does not exist"),
        ("ink=not a repo", "is neither an existing local path nor a Hugging Face repo id"),
        ("ink=a/b,ink=c/d", "LORA_ADAPTERS: the name 'ink' is used twice"),
        ("x=a/b,owner/model=c/d", "adapter name 'owner/model' is invalid"),
    ],
)
def test_bad_lora_adapters_name_the_variable(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"LORA_ADAPTERS": value})
    assert str(raised.value).startswith("LORA_ADAPTERS") and expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_adapter_cannot_take_the_base_models_name() -> None:
    with pytest.raises(ConfigError, match="the base model's id"):
        load_settings({"MODEL_ID": "sd35-local", "LORA_ADAPTERS": "sd35-local=a/b"})
