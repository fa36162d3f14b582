"""AUTOMATIC1111's clients against a real server: the `webuiapi` package, and replays of Open WebUI's and
SillyTavern's request sequences as their source sends them (open-webui backend/open_webui/routers/images.py;
SillyTavern src/endpoints/stable-diffusion.js and public/scripts/extensions/stable-diffusion/index.js)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server import Server, running_server

KEY = "sk-webui"
A = "/sdapi/v1"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "API_KEY": KEY,
        "LORA_ADAPTERS": f"ink={tiny_loras['ink']}",
        "WARMUP": "false",
    }
    with running_server(env, tmp_path_factory.mktemp("a1111-server")) as running:
        yield running
        assert "Traceback" not in running.log_text()


def basic(credentials: str) -> dict[str, str]:
    """The header Open WebUI and SillyTavern build from a "user:password" string."""
    return {"authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def left_half_white(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    return Image.fromarray(mask, "L")


def wait_for_progress(read: Any, running: Any) -> dict[str, Any]:
    """Poll progress (there is nothing to await) until the job is between its first and last step."""
    deadline = time.monotonic() + 120
    while True:
        progress = read()
        if 0 < progress["progress"] < 1 and progress["state"]["sampling_step"] > 0:
            return progress
        assert not running.done(), "the job ended before its progress was seen"
        assert time.monotonic() < deadline, progress
        time.sleep(0.02)


@pytest.mark.server
def test_webuiapi_drives_sd35(server: Server, tiny_model_dir: Path) -> None:
    import webuiapi

    api = webuiapi.WebUIApi(baseurl=f"{server.url}{A}", sampler="Euler", steps=2)
    api.set_auth("webui", KEY)  # then GET scripts, as webuiapi does
    base = tiny_model_dir.name
    assert api.util_get_model_names() == [base]
    assert api.util_get_sampler_names() == ["Euler"]
    assert api.util_get_scheduler_names() == ["automatic"]
    assert [lora["name"] for lora in api.get_loras()] == ["ink"]
    assert api.get_options()["sd_model_checkpoint"] == base
    api.set_options({"sd_model_checkpoint": "ink"})
    assert api.util_get_current_model() == "ink"
    api.util_set_model(base)
    assert api.util_get_current_model() == base

    # Everything webuiapi sends (about 40 fields, CFG 7 and sampler "Euler" by default), twice with one seed.
    first = api.txt2img(prompt="a lighthouse", seed=5, width=256, height=256)
    second = api.txt2img(prompt="a lighthouse", seed=5, width=256, height=256)
    assert first.image.size == (256, 256)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image)), "same seed, same pixels"
    assert first.info["all_seeds"] == [5] and first.info["cfg_scale"] == 7 and first.info["steps"] == 2

    edited = api.img2img(images=[first.image], prompt="at night", seed=1, denoising_strength=0.5, width=256, height=256)
    assert edited.image.size == (256, 256) and edited.info["denoising_strength"] == 0.5
    assert not np.array_equal(np.asarray(edited.image), np.asarray(first.image))
    inpainted = api.img2img(
        images=[first.image],
        mask_image=left_half_white(256, 256),
        prompt="a door",
        seed=1,
        denoising_strength=1.0,
        width=256,
        height=256,
    )
    kept, original = np.asarray(inpainted.image)[:, 128:], np.asarray(first.image.convert("RGB"))[:, 128:]
    assert np.array_equal(kept, original), "black in the mask is kept"

    # progress during a long job, then interrupt: the request is answered with what was made
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(api.txt2img, prompt="a long one", seed=9, steps=50, width=512, height=512, cfg_scale=0)
        seen = wait_for_progress(api.get_progress, long)
        assert seen["state"]["sampling_steps"] == 50 and seen["state"]["job_count"] == 1
        assert seen["eta_relative"] > 0
        assert api.interrupt() == {}
        result = long.result(timeout=120)
    assert len(result.images) == 1 and result.image.size == (512, 512)
    assert result.info["extra_generation_params"]["Interrupted"].startswith("after ")
    api.util_wait_for_ready(check_interval=0.1)  # returns at once: progress 0, no job

    stranger = webuiapi.WebUIApi(baseurl=f"{server.url}{A}")
    stranger.set_auth("webui", "not-the-key")
    with pytest.raises(RuntimeError) as refused:
        stranger.txt2img(prompt="x", width=256, height=256)
    assert refused.value.args[0] == 401 and json.loads(refused.value.args[1]) == {"detail": "Invalid API key"}


@pytest.mark.server
def test_open_webui_automatic1111_engine(server: Server, tiny_model_dir: Path) -> None:
    headers = basic(f"admin:{KEY}")  # AUTOMATIC1111_API_AUTH, as get_automatic1111_api_auth encodes it
    with httpx.Client(base_url=server.url, timeout=120) as http:
        # verify_url
        http.get(f"{A}/options", headers=headers).raise_for_status()
        # get_models
        models = [
            {"id": m["title"], "name": m["model_name"]} for m in http.get(f"{A}/sd-models", headers=headers).json()
        ]
        assert models == [{"id": tiny_model_dir.name, "name": tiny_model_dir.name}]

        def set_image_model(model: str) -> None:
            options = http.get(f"{A}/options", headers=headers).json()
            if model != options["sd_model_checkpoint"]:
                options["sd_model_checkpoint"] = model
                http.post(f"{A}/options", json=options, headers=headers).raise_for_status()

        def generate(model: str, n: int, size: int) -> dict[str, Any]:
            set_image_model(model)  # an admin's form_data.model
            current = http.get(f"{A}/options", headers=headers).json()["sd_model_checkpoint"]  # get_image_model
            data = {"prompt": "a castle", "batch_size": n, "width": size, "height": size}
            data |= {"steps": 2, "negative_prompt": "blurry"}
            res = http.post(f"{A}/txt2img", json=data, headers=headers).json()
            for image in res["images"]:  # get_image_data: no "," in it, so base64 of a PNG
                assert "," not in image
                decoded = Image.open(io.BytesIO(base64.b64decode(image)))
                assert decoded.format == "PNG" and decoded.size == (size, size)
            info = json.loads(res["info"])
            assert info["sd_model_name"] == current == model and len(res["images"]) == n
            return info

        # An adapter typed in as the model, then the listed checkpoint (Open WebUI's default size, 512x512).
        assert generate("ink", 1, 256)["extra_generation_params"]["Lora"] == "ink:1"
        assert "Lora" not in generate(models[0]["id"], 2, 512)["extra_generation_params"]


@pytest.mark.server
def test_sillytavern_stable_diffusion_webui_source(server: Server, tiny_model_dir: Path) -> None:
    auth = f"st:{KEY}"  # extension_settings.sd.auto_auth
    headers = {"Authorization": basic(auth)["authorization"]}
    json_headers = {**headers, "Content-Type": "application/json"}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

            async def get(path: str) -> Any:
                result = await http.get(f"{A}/{path}", headers=headers)
                assert result.is_success, result.text
                return result.json()

            # /api/sd/ping
            await get("options")
            # loadSettingOptions(): samplers, models (get-model, models, upscalers + latent modes), schedulers, vaes
            samplers, current, models, upscalers, latent, schedulers, vaes = await asyncio.gather(
                get("samplers"),
                get("options"),
                get("sd-models"),
                get("upscalers"),
                get("latent-upscale-modes"),
                get("schedulers"),
                get("sd-vae"),
            )
            names = [x["name"] for x in upscalers]
            names[1:1] = [x["name"] for x in latent]  # 0 = None, then latent upscalers, then upscalers
            assert [x["name"] for x in samplers] == ["Euler"] and names == ["None"]
            assert [x["name"] for x in schedulers] == ["automatic"] and [x["model_name"] for x in vaes] == []
            model = current["sd_model_checkpoint"]
            assert [{"value": x["title"], "text": x["title"]} for x in models] == [{"value": model, "text": model}]

            # /api/sd/set-model: options, then progress until idle
            options = json.dumps({"sd_model_checkpoint": model})
            assert (await http.post(f"{A}/options", content=options, headers=json_headers)).is_success
            state = await get("progress")
            assert state["progress"] == 0.0 and state["state"]["job_count"] == 0

            # /api/sd/generate: the extension's whole body, SillyTavern's url and auth included (seed -1: absent)
            body = {
                "url": server.url,
                "auth": auth,
                "prompt": "a knight, best quality",
                "negative_prompt": "lowres",
                "sampler_name": "DDIM",
                "scheduler": "Karras",
                "steps": 2,
                "cfg_scale": 7,
                "width": 512,
                "height": 512,
                "restore_faces": False,
                "enable_hr": False,
                "hr_upscaler": "Latent",
                "hr_scale": 2.0,
                "denoising_strength": 0.7,
                "hr_second_pass_steps": 0,
                "override_settings": {"CLIP_stop_at_last_layers": 1},
                "override_settings_restore_afterwards": True,
                "clip_skip": 1,
                "save_images": True,
                "send_images": True,
                "do_not_save_grid": False,
                "do_not_save_samples": False,
            }
            result = await http.post(f"{A}/txt2img", content=json.dumps(body), headers=json_headers)
            assert result.is_success, result.text
            data = result.json()
            assert Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).size == (512, 512)
            assert "auth" not in data["parameters"]
            info = json.loads(data["info"])
            assert info["sampler_name"] == "Euler" and info["extra_generation_params"]["Sampler requested"] == "DDIM"

            # The user aborts: SillyTavern's request goes away and it POSTs interrupt.
            long = asyncio.ensure_future(
                http.post(f"{A}/txt2img", content=json.dumps({**body, "steps": 50}), headers=json_headers)
            )
            deadline = time.monotonic() + 120
            while (await get("progress"))["state"]["sampling_step"] == 0:
                assert not long.done() and time.monotonic() < deadline
                await asyncio.sleep(0.02)
            long.cancel()
            interrupted = await http.post(f"{A}/interrupt", headers=headers)
            assert interrupted.status_code == 200 and interrupted.json() == {}
            while (await get("progress"))["state"]["job_count"]:
                assert time.monotonic() < deadline, "the abandoned job stopped"
                await asyncio.sleep(0.02)

    asyncio.run(scenario())
