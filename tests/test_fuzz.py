"""Fuzzing: schemathesis against the service's own /openapi.json, hypothesis against the request body.

The pipeline is an instant stand-in (zeros of the right shape): everything
else is the real service — middleware, auth, validation, the engine's queue and
batching, encoding, error shaping. A schema-valid request may ask for four
1024² images at 50 steps, which the tiny model takes tens of seconds to make;
the fuzz is about the HTTP surface, not the pixels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.harness import serve
from sd35.config import Settings

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class InstantPipeline:
    """Answers like StableDiffusion3Pipeline(output_type="pt"), instantly, checking what a real one checks."""

    def __call__(self, *, prompt: list[str], height: int, width: int, generator: list, **_: Any) -> SimpleNamespace:
        assert height % 16 == 0 and width % 16 == 0 and len(generator) == len(prompt)
        return SimpleNamespace(images=torch.zeros(len(prompt), 3, height, width))


class InstantEditPipeline(InstantPipeline):
    """Image-to-image and inpainting stand-ins: inpainting answers latents, which the engine decodes itself."""

    transformer = None
    vae = SimpleNamespace(
        config=SimpleNamespace(scaling_factor=1.5305, shift_factor=0.0609),
        dtype=torch.float32,
        decode=lambda latents: SimpleNamespace(
            sample=torch.zeros(len(latents), 3, *(8 * d for d in latents.shape[2:]))
        ),
    )

    def __call__(self, *, output_type: str = "pt", **kwargs: Any) -> SimpleNamespace:
        assert len(kwargs["image"]) == len(kwargs["prompt"]) and 0 < kwargs["strength"] <= 1
        images = super().__call__(**kwargs).images
        if output_type == "latent":
            return SimpleNamespace(images=torch.zeros(len(images), 16, images.shape[2] // 8, images.shape[3] // 8))
        return SimpleNamespace(images=images)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[str]:
    def loader(config: Settings, worker_index: int) -> tuple[Any, str]:
        return InstantPipeline(), "cpu"

    env = {"MODEL_ID": "instant", "API_KEY": KEY, "WARMUP": "false", "MAX_QUEUE_IMAGES": "64"}
    with serve(env, loader=loader) as base_url:
        import service

        edit = InstantEditPipeline()
        service.app.state.serving.engine.runner._edit_pipelines.update({"img2img": edit, "inpaint": edit})
        yield base_url


def test_schemathesis_finds_no_5xx_and_no_schema_violation(fuzz_server: str) -> None:
    statuses: list[int] = []
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    checks = [
        schemathesis.checks.not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]

    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/images/generations", "GET /v1/models"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            statuses.append(case.call_and_validate(headers=AUTH, checks=checks).status_code)

        run()
    assert statuses.count(200) >= 100, "the fuzz must reach the success path, not only validation errors"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
printable = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=40)
VALID = {
    "n": st.integers(1, 4),
    "size": st.sampled_from(["256x256", "512x256", "256x768", "auto"]),
    "response_format": st.just("b64_json"),
    "output_format": st.sampled_from(["png", "jpeg", "webp"]),
    "output_compression": st.integers(0, 100),
    "seed": st.integers(0, 2**64 - 1),
    "num_inference_steps": st.integers(1, 50),
    "guidance_scale": st.floats(0, 20, allow_nan=False),
    "negative_prompt": st.text(max_size=20),
    "model": st.text(max_size=10),
    "quality": st.sampled_from(["auto", "hd", "standard", "high"]),
}
INVALID = {
    "prompt": st.sampled_from(["", "   ", "x" * 4097]) | json_values.filter(lambda v: not isinstance(v, str)),
    "n": st.sampled_from([0, 5, -1, 1.5, "2", True]),
    "size": st.sampled_from(["1000x1000", "64x64", "x", "", "2048x2048", "99999x1"]),
    "response_format": st.sampled_from(["png", "URL", ""]),
    "output_format": st.sampled_from(["gif", "PNG", "jpg"]),
    "output_compression": st.sampled_from([-1, 101, 50.5]),
    "seed": st.sampled_from([-1, 2**64, "7"]),
    "num_inference_steps": st.sampled_from([0, 51, 2.0]),
    "guidance_scale": st.sampled_from([-0.1, 20.5, "3"]),
    "negative_prompt": st.just("x" * 4097),
    "stream": st.sampled_from(["yes", 1]),
}
valid_bodies = st.fixed_dictionaries({"prompt": printable.filter(str.strip)}, optional=VALID)  # type: ignore[arg-type]
corrupted_bodies = st.tuples(valid_bodies, st.sampled_from(sorted(INVALID))).flatmap(
    lambda pair: INVALID[pair[1]].map(lambda bad: {**pair[0], pair[1]: bad})
)
bodies = valid_bodies | corrupted_bodies | json_values
FIELDS = {"prompt", *VALID, *INVALID}


OUTCOMES: list[tuple[int, int]] = []


@given(body=bodies)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_any_json_body_gets_200_or_an_openai_400(fuzz_server: str, body: Any) -> None:
    response = httpx.post(
        f"{fuzz_server}/v1/images/generations",
        content=json.dumps(body),
        headers={**AUTH, "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code in (200, 400), response.text
    payload = response.json()
    if response.status_code == 400:
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "validation_error"
        assert error["param"] is None or error["param"] in FIELDS
    else:
        assert len(payload["data"]) == (body.get("n") or 1)
    OUTCOMES.append((response.status_code, len(payload.get("data", []))))


def test_the_body_fuzz_reached_generation() -> None:
    assert OUTCOMES, "runs after test_any_json_body_gets_200_or_an_openai_400"
    assert sum(1 for status, _ in OUTCOMES if status == 200) >= 20
    assert any(count > 1 for _, count in OUTCOMES)
