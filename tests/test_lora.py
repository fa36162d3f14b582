"""LoRA adapters served as models: chosen by `model`, batched apart, switched without reloading, refused clearly."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from starlette.testclient import TestClient

from sd35 import metrics
from sd35.config import load_settings
from sd35.engine.adapters import AdapterError
from sd35.engine.calls import PipelineRunner
from sd35.engine.loading import load_pipeline
from sd35.engine.params import GenerationParams
from sd35.tiny import write_tiny_lora
from tests.conftest import assert_openai_error, pixels, service_client
from tests.server import failed_start, running_server
from tests.test_edits import photo, png
from tests.test_streaming import read_events

GEN = "/v1/images/generations"
# response_format explicit: dall-e-3 would otherwise get URLs (OpenAI's default for it).
BODY = {
    "prompt": "a lighthouse at dawn",
    "size": "256x256",
    "num_inference_steps": 2,
    "seed": 21,
    "response_format": "b64_json",
}


def adapters_env(loras: dict[str, Path], neon_scale: str = "@0.5") -> str:
    return f"ink={loras['ink']},neon={loras['neon']}{neon_scale}"


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, tiny_loras: dict[str, Path]) -> Iterator[TestClient]:
    env = {"MODEL_ID": str(tiny_model_dir), "LORA_ADAPTERS": adapters_env(tiny_loras), "WARMUP": "false"}
    with service_client(env) as test_client:
        yield test_client


def image(client: TestClient, **body) -> np.ndarray:
    response = client.post(GEN, json={**BODY, **body})
    assert response.status_code == 200, response.text
    return pixels(response.json()["data"][0]["b64_json"])


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# --- the API -------------------------------------------------------------------


def test_models_lists_the_base_model_and_every_adapter(client: TestClient, tiny_loras: dict[str, Path]) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert list(cards) == ["tiny-sd3", "ink", "neon"]
    assert cards["tiny-sd3"]["parent"] is None and cards["tiny-sd3"]["root"].endswith("tiny-sd3")
    for name in ("ink", "neon"):
        assert cards[name]["object"] == "model" and cards[name]["parent"] == "tiny-sd3"
        assert cards[name]["root"] == str(tiny_loras[name])


def test_two_adapters_each_change_the_image_differently(client: TestClient) -> None:
    base, ink, neon = image(client), image(client, model="ink"), image(client, model="neon")
    assert mean_diff(base, ink) > 2 and mean_diff(base, neon) > 2 and mean_diff(ink, neon) > 2
    assert np.array_equal(ink, image(client, model="ink")), "an adapter's seeded image is reproducible"


@pytest.mark.parametrize("model", ["dall-e-3", "gpt-image-1", "tiny-sd3", "", None, "no-such-adapter"])
def test_any_other_model_is_the_base_model(client: TestClient, model: str | None) -> None:
    base = image(client)
    assert np.array_equal(image(client, model=model), base)


def test_lora_scale_overrides_the_adapters_default(client: TestClient) -> None:
    base, ink = image(client), image(client, model="ink")
    assert np.abs(image(client, model="ink", lora_scale=0.0) - base).max() <= 1, "scale 0 is the base model"
    half = image(client, model="ink", lora_scale=0.5)
    assert mean_diff(half, base) > 1 and mean_diff(half, ink) > 1
    # neon is configured as neon=...@0.5: that is its default scale
    assert np.array_equal(image(client, model="neon"), image(client, model="neon", lora_scale=0.5))
    assert mean_diff(image(client, model="neon"), image(client, model="neon", lora_scale=1.0)) > 1
    assert np.array_equal(image(client, lora_scale=2.0), base), "without an adapter lora_scale changes nothing"


@pytest.mark.parametrize("value", [2.5, -0.1, "strong"])
def test_lora_scale_out_of_range_is_a_400(client: TestClient, value: object) -> None:
    response = client.post(GEN, json={**BODY, "model": "ink", "lora_scale": value})
    assert_openai_error(response, 400, "validation_error", "lora_scale")


def _edit(client: TestClient, path: str = "/v1/images/edits", **data: str) -> np.ndarray:
    form = {"prompt": "a harbour", "size": "256x256", "num_inference_steps": "4", "seed": "3", **data}
    if path.endswith("variations"):
        form.pop("prompt")
    response = client.post(path, data=form, files={"image": ("a.png", png(photo()), "image/png")})
    assert response.status_code == 200, response.text
    return pixels(response.json()["data"][0]["b64_json"])


def test_an_edit_and_a_variation_use_the_adapter(client: TestClient) -> None:
    for path in ("/v1/images/edits", "/v1/images/variations"):
        base, ink = _edit(client, path), _edit(client, path, model="ink")
        assert mean_diff(base, ink) > 1
        assert np.array_equal(ink, _edit(client, path, model="ink"))
        assert mean_diff(ink, _edit(client, path, model="ink", lora_scale="0.5")) > 0.5


def test_streaming_uses_the_adapter(client: TestClient) -> None:
    plain = client.post(GEN, json={**BODY, "model": "neon"}).json()["data"][0]["b64_json"]
    with client.stream("POST", GEN, json={**BODY, "model": "neon", "stream": True}) as response:
        events = read_events(response)
    assert events[-1][0] == "image_generation.completed"
    assert events[-1][1]["b64_json"] == plain


def test_images_are_counted_per_model(client: TestClient) -> None:
    def count(model: str) -> float:
        return metrics.IMAGES_GENERATED.labels(model=model)._value.get()

    before = {model: count(model) for model in ("tiny-sd3", "ink", "neon")}
    client.post(GEN, json={**BODY, "model": "ink", "n": 2})
    client.post(GEN, json={**BODY, "model": "dall-e-3", "response_format": "b64_json"})
    assert count("ink") - before["ink"] == 2
    assert count("tiny-sd3") - before["tiny-sd3"] == 1
    assert count("neon") == before["neon"]


def test_the_start_up_summary_lists_the_adapters(tiny_loras: dict[str, Path]) -> None:
    settings = load_settings({"LORA_ADAPTERS": adapters_env(tiny_loras)})
    assert "lora_adapters=ink,neon" in settings.summary()
    assert "lora_adapters=none" in load_settings({}).summary()


# --- batching: one adapter per call --------------------------------------------


def test_batch_key_separates_adapters_and_scales() -> None:
    base = GenerationParams("a", 64, 64, 1, 1, 2, 0.0)
    ink = GenerationParams("b", 64, 64, 1, 2, 2, 0.0, adapter="ink", lora_scale=1.0)
    assert ink.batch_key == GenerationParams("c", 64, 64, 1, 3, 2, 0.0, adapter="ink", lora_scale=1.0).batch_key
    assert (
        len(
            {
                base.batch_key,
                ink.batch_key,
                GenerationParams("d", 64, 64, 1, 4, 2, 0.0, adapter="neon").batch_key,
                GenerationParams("e", 64, 64, 1, 5, 2, 0.0, adapter="ink", lora_scale=0.5).batch_key,
            }
        )
        == 4
    )


def _hub_cache(cache: Path, repo: str, lora: Path) -> None:
    """Put ``lora`` into a Hugging Face cache as revision ``main`` of ``repo``, as a download leaves it."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    for file in lora.iterdir():
        (root / "snapshots" / commit / file.name).write_bytes(file.read_bytes())


def test_a_hub_adapter_comes_from_the_hugging_face_cache(
    tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hub_cache(tmp_path, "someone/tiny-ink", tiny_loras["ink"])
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hub = "someone/tiny-ink/pytorch_lora_weights.safetensors"
    env = {"MODEL_ID": str(tiny_model_dir), "LORA_ADAPTERS": f"hub={hub},local={tiny_loras['ink']}"}
    runner = PipelineRunner(load_pipeline(load_settings(env))[0])

    def run(adapter: str) -> np.ndarray:
        return runner([GenerationParams("a cat", 128, 128, 1, 5, 2, 0.0, adapter=adapter, lora_scale=1.0)])[0][0]

    assert np.array_equal(run("hub"), run("local"))


# --- what cannot be used stops the start ---------------------------------------


def _broken(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Unusable adapters: what LORA_ADAPTERS names, and what the refusal must say."""
    (tmp_path / "empty").mkdir()
    save_file(
        {
            "transformer.no_such_block.attn.to_q.lora_A.weight": torch.randn(4, 32),
            "transformer.no_such_block.attn.to_q.lora_B.weight": torch.randn(32, 4),
        },
        tmp_path / "nomatch.safetensors",
    )
    save_file(  # Kohya's SD3.5 layout: diffusers loads it as zero keys without an error
        {
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(4, 32),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(96, 4),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0),
        },
        tmp_path / "kohya.safetensors",
    )
    save_file({"weight": torch.randn(3)}, tmp_path / "plain.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    return {
        "nomatch": (str(tmp_path / "nomatch.safetensors"), "gives the transformer no LoRA layers"),
        "kohya": (str(tmp_path / "kohya.safetensors"), "gives the transformer no LoRA layers"),
        "plain": (str(tmp_path / "plain.safetensors"), "not a LoRA"),
        "garbage": (str(tmp_path / "garbage.safetensors"), "not a readable .safetensors file"),
        "empty": (str(tmp_path / "empty"), "no LoRA weights file found"),
        "hub": ("someone/no-such-lora", "not in the local cache"),
    }


@pytest.mark.parametrize("name", ["nomatch", "kohya", "plain", "garbage", "empty", "hub"])
def test_an_unusable_adapter_is_refused_naming_it(
    tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    source, reason = _broken(tmp_path)[name]
    env = {"MODEL_ID": str(tiny_model_dir), "LORA_ADAPTERS": f"ink={tiny_loras['ink']},{name}={source}"}
    with pytest.raises(AdapterError) as raised:
        load_pipeline(load_settings(env))
    message = str(raised.value)
    assert message.startswith(f"LORA_ADAPTERS: adapter {name!r} (") and reason in message, message
    assert "\n" not in message


def test_a_broken_adapter_stops_the_server_naming_it(
    tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    source, _ = _broken(tmp_path)["nomatch"]
    env = {"MODEL_ID": str(tiny_model_dir), "LORA_ADAPTERS": f"ink={tiny_loras['ink']},broken={source}"}
    with running_server({**env, "WARMUP": "false"}, tmp_path, ready=False) as server:
        for _ in range(240):
            health = httpx.get(f"{server.url}/health", timeout=5)
            if "failed" in health.json().get("detail", ""):
                break
            asyncio.run(asyncio.sleep(0.25))
        assert health.status_code == 503
        assert "adapter 'broken'" in health.json()["detail"] and "no LoRA layers" in health.json()["detail"]
        response = httpx.post(f"{server.url}{GEN}", json={**BODY, "model": "ink"}, timeout=30)
        assert_openai_error(response, 503, "model_not_loaded")
        lines = [line for line in server.log_text().splitlines() if "adapter 'broken'" in line]
        assert len(lines) == 1 and "model failed to load" in lines[0], lines


def test_a_config_error_stops_bentoml_serve_with_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MODEL_ID": str(tiny_model_dir),
        "LORA_ADAPTERS": f"ghost={tmp_path / 'missing'}",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    assert failed_start(env, mentioning="LORA_ADAPTERS") == [
        f"sd35: configuration error: LORA_ADAPTERS: adapter 'ghost': {tmp_path / 'missing'} does not exist "
        "(no such file or directory)"
    ]


# --- TORCH_COMPILE: hot-swapping --------------------------------------------------


def test_compiled_switching_hot_swaps_without_recompiling(tiny_model_dir: Path, tiny_loras: dict[str, Path]) -> None:
    env = {"MODEL_ID": str(tiny_model_dir), "LORA_ADAPTERS": adapters_env(tiny_loras, ""), "TORCH_COMPILE": "blocks"}
    eager_env = {**env, "TORCH_COMPILE": "off"}
    compiled = PipelineRunner(load_pipeline(load_settings(env))[0])
    eager = PipelineRunner(load_pipeline(load_settings(eager_env))[0])

    def run(runner: PipelineRunner, adapter: str | None, scale: float) -> np.ndarray:
        params = GenerationParams("a cat", 128, 128, 1, 5, 2, 0.0, adapter=adapter, lora_scale=scale)
        return runner([params])[0][0].astype(int)

    run(compiled, None, 0.0)  # compiles
    order = [("ink", 1.0), ("neon", 1.0), (None, 0.0), ("ink", 0.5), ("neon", 1.0), (None, 0.0)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        results = [run(compiled, adapter, scale) for adapter, scale in order]
    for (adapter, scale), got in zip(order, results, strict=True):
        assert np.abs(got - run(eager, adapter, scale)).max() <= 2, (adapter, scale)
    assert mean_diff(results[0], results[2]) > 2 and mean_diff(results[1], results[2]) > 2
    assert np.array_equal(results[1], results[4]) and np.array_equal(results[2], results[5])


def test_compile_refuses_adapters_that_cannot_hot_swap(tiny_model_dir: Path, tmp_path: Path) -> None:
    qk = write_tiny_lora(tmp_path / "qk", seed=3, target_modules=("to_q", "to_k"))
    v = write_tiny_lora(tmp_path / "v", seed=4, target_modules=("to_v",))
    env = {"MODEL_ID": str(tiny_model_dir), "LORA_ADAPTERS": f"qk={qk},v={v}", "TORCH_COMPILE": "blocks"}
    with pytest.raises(AdapterError) as raised:
        load_pipeline(load_settings(env))
    assert str(raised.value).startswith("LORA_ADAPTERS: adapter 'v' (")
    assert "targets 2 others (transformer_blocks.0.attn.to_v, transformer_blocks.1.attn.to_v)" in str(raised.value)
    assert "TORCH_COMPILE=off" in str(raised.value)
    # without compiling, the same two adapters are fine
    load_pipeline(load_settings({**env, "TORCH_COMPILE": "off"}))


def test_a_lora_with_text_encoder_layers_is_served_eagerly_and_refused_under_compile(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    both = write_tiny_lora(tmp_path / "both", seed=5, text_encoder=True)
    only_transformer = write_tiny_lora(tmp_path / "only", seed=5)
    env = {"MODEL_ID": str(tiny_model_dir), "LORA_ADAPTERS": f"both={both},only={only_transformer}"}
    runner = PipelineRunner(load_pipeline(load_settings(env))[0])
    assert any("both" in getattr(m, "lora_A", {}) for m in runner.pipeline.text_encoder.modules())

    def run(adapter: str | None) -> np.ndarray:
        return runner([GenerationParams("a cat", 128, 128, 1, 5, 2, 0.0, adapter=adapter, lora_scale=1.0)])[0][0]

    base, with_text, without_text = run(None), run("both"), run("only")
    assert mean_diff(with_text.astype(int), without_text.astype(int)) > 0.5, "the text-encoder layers take part"
    assert np.array_equal(run(None), base), "the base model's text encoder is back to itself"
    with pytest.raises(AdapterError, match=r"adapter 'both' .*text-encoder LoRA layers.*TORCH_COMPILE=off"):
        load_pipeline(load_settings({**env, "TORCH_COMPILE": "blocks"}))


# --- a real server: concurrent mixed traffic, the official SDK ------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    env = {"MODEL_ID": str(tiny_model_dir), "LORA_ADAPTERS": adapters_env(tiny_loras), "WARMUP": "false"}
    with running_server(env, tmp_path_factory.mktemp("lora-server")) as running:
        yield running


def _batch_calls(server_url: str) -> float:
    for line in httpx.get(f"{server_url}/metrics", timeout=30).text.splitlines():
        if line.startswith("sd35_batch_images_count"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.server
def test_concurrent_mixed_traffic_keeps_every_image_its_own(server) -> None:
    choices = [{}, {"model": "ink"}, {"model": "neon"}, {"model": "ink", "lora_scale": 0.5}, {"model": "dall-e-3"}]
    requests = [{**BODY, "seed": 100 + i, **choices[i % len(choices)]} for i in range(15)]

    async def send(http: httpx.AsyncClient, body: dict) -> np.ndarray:
        response = await http.post(GEN, json=body)
        assert response.status_code == 200, response.text
        return pixels(response.json()["data"][0]["b64_json"])

    async def scenario() -> tuple[list[np.ndarray], list[np.ndarray]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            alone = [await send(http, body) for body in requests]
            together = await asyncio.gather(*(send(http, body) for body in requests))
        return alone, together

    calls_before = _batch_calls(server.url)
    alone, together = asyncio.run(scenario())
    calls = _batch_calls(server.url) - calls_before
    assert calls < 2 * len(requests), "some concurrent requests shared a pipeline call"
    for body, a, b in zip(requests, alone, together, strict=True):
        diff = np.abs(a - b)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, body
    # and each image is its own adapter's: same seed, another adapter, another image
    same_seed = {**requests[0], "model": "ink"}
    other = asyncio.run(_one(server.url, same_seed))
    assert mean_diff(other, alone[0]) > 2


async def _one(url: str, body: dict) -> np.ndarray:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        return pixels((await http.post(GEN, json=body)).json()["data"][0]["b64_json"])


@pytest.mark.server
def test_the_openai_sdk_gets_urls_for_dall_e_and_base64_otherwise(server) -> None:
    import openai

    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    extra = {"seed": 4, "num_inference_steps": 1}
    for model in ("dall-e-3", "dall-e-2"):
        result = sdk.images.generate(model=model, prompt="a fox", size="256x256", extra_body=extra)
        assert result.data[0].url and result.data[0].b64_json is None, model
        fetched = httpx.get(result.data[0].url, timeout=30)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    for model in ("gpt-image-1", "ink", None):
        kwargs = {"model": model} if model else {}
        result = sdk.images.generate(prompt="a fox", size="256x256", extra_body=extra, **kwargs)
        assert result.data[0].b64_json and result.data[0].url is None, model
    explicit = sdk.images.generate(
        model="dall-e-3", prompt="a fox", size="256x256", response_format="b64_json", extra_body=extra
    )
    assert base64.b64decode(explicit.data[0].b64_json).startswith(b"\x89PNG")
    edit = sdk.images.edit(
        model="dall-e-2", image=("a.png", png(photo()), "image/png"), prompt="a moon", size="256x256"
    )
    assert edit.data[0].url and edit.data[0].b64_json is None
    variation = sdk.images.create_variation(
        model="dall-e-2", image=("a.png", png(photo()), "image/png"), size="256x256"
    )
    assert variation.data[0].url
    # the adapter through the SDK: its own image, not the base model's
    ink = sdk.images.generate(model="ink", prompt="a fox", size="256x256", extra_body=extra)
    base = sdk.images.generate(model="gpt-image-1", prompt="a fox", size="256x256", extra_body=extra)
    assert ink.data[0].b64_json != base.data[0].b64_json
