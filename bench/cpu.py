"""CPU benchmarks with the tiny model (`make bench`): HTTP overhead, batching, encoders.

1. HTTP end-to-end vs the bare pipeline call plus encoding, 512², same process,
   same run, requests interleaved (target: ≤ 1.15×).
2. Throughput with 1, 4 and 16 concurrent clients, batching on vs off
   (target: batching ≥ 1.5× at 16 clients): through HTTP at 256², the
   smallest size the API accepts, and at the engine (the GPU worker's queue,
   no HTTP) at 64², the size the target is set for.
3. Encoding time per format and size, on a smooth, photo-like image.

Results go to ``bench/results/cpu-<date>.md``. Timings depend on the machine:
the file records which one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from bench.harness import LoadResult, load, machine, median_ms, serve
from sd35.config import Settings
from sd35.engine import GenerationEngine, GenerationParams
from sd35.engine.loading import load_pipeline
from sd35.imaging import encode_image, to_base64
from sd35.tiny import write_tiny_pipeline

HTTP_TARGET = 1.15
BATCHING_TARGET = 1.5


def bare_call(pipe, size: int, seed: int, steps: int) -> str:
    """What the service does for one image, minus HTTP: pipeline, uint8, PNG, base64."""
    with torch.inference_mode():
        images = pipe(
            prompt=["a lighthouse at dawn"],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            output_type="pt",
        ).images
        pixels = (images.float().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).contiguous().cpu().numpy()
    return to_base64(encode_image(pixels[0], "png"))


def http_overhead(model_dir: Path, size: int, rounds: int, steps: int) -> tuple[list[str], dict]:
    pipe, _ = load_pipeline(Settings(model_id=str(model_dir), warmup=False))
    bare, http = [], []
    body = {"prompt": "a lighthouse at dawn", "size": f"{size}x{size}", "num_inference_steps": steps}
    with serve({"MODEL_ID": str(model_dir), "WARMUP": "false"}) as base_url, httpx.Client(timeout=120) as client:
        for i in range(rounds + 2):  # two warm-up rounds, not counted
            started = time.perf_counter()
            bare_call(pipe, size, seed=i, steps=steps)
            bare_seconds = time.perf_counter() - started
            started = time.perf_counter()
            response = client.post(f"{base_url}/v1/images/generations", json={**body, "seed": i})
            response.json()
            http_seconds = time.perf_counter() - started
            assert response.status_code == 200, response.text
            if i >= 2:
                bare.append(bare_seconds)
                http.append(http_seconds)
    ratio = statistics.median(http) / statistics.median(bare)
    lines = [
        f"## 1. HTTP end-to-end vs bare pipeline + encoding ({size}², {steps} steps, n=1, {rounds} interleaved rounds)",
        "",
        "| path | median ms | min ms |",
        "|---|---|---|",
        f"| bare pipeline + uint8 + PNG + base64 | {median_ms(bare):.1f} | {min(bare) * 1000:.1f} |",
        f"| HTTP through the BentoML service | {median_ms(http):.1f} | {min(http) * 1000:.1f} |",
        "",
        f"Ratio HTTP / bare: **{ratio:.3f}** (target ≤ {HTTP_TARGET}: {'PASS' if ratio <= HTTP_TARGET else 'FAIL'})",
        "",
    ]
    return lines, {"ratio": ratio}


def _row(mode: str, result: LoadResult) -> str:
    return (
        f"| {mode} | {result.clients} | {result.requests} | {result.images_per_second:.1f} | "
        f"{result.p50 * 1000:.0f} | {result.p95 * 1000:.0f} |"
    )


def _gain_lines(title: str, rows: list[str], by_mode: dict[tuple[str, int], LoadResult]) -> tuple[list[str], float]:
    top = max(clients for _, clients in by_mode)
    gain = by_mode[("on", top)].images_per_second / by_mode[("off", top)].images_per_second
    lines = [
        title,
        "",
        "| batching | clients | requests | images/s | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Batching gain at {top} clients: **{gain:.2f}×** "
        f"(target ≥ {BATCHING_TARGET}: {'PASS' if gain >= BATCHING_TARGET else 'FAIL'})",
        "",
    ]
    return lines, gain


def http_throughput(model_dir: Path, size: int, steps: int, total: int, client_counts: list[int]):
    body = {"prompt": "a lighthouse at dawn", "size": f"{size}x{size}", "num_inference_steps": steps}
    rows, by_mode = [], {}
    for mode, batch in (("on", "8"), ("off", "1")):
        env = {"MODEL_ID": str(model_dir), "WARMUP": "false", "MAX_BATCH_IMAGES": batch, "MAX_QUEUE_IMAGES": "256"}
        with serve(env) as base_url:
            load(base_url, body, clients=2, per_client=2)  # warm the path
            for clients in client_counts:
                result = load(base_url, body, clients=clients, per_client=max(2, total // clients))
                assert set(result.statuses) == {200}, result.statuses
                by_mode[(mode, clients)] = result
                rows.append(_row(mode, result))
    title = f"## 2a. Throughput through HTTP, batching on (MAX_BATCH_IMAGES=8) vs off (=1), {size}², {steps} steps"
    lines, gain = _gain_lines(title, rows, by_mode)
    return lines, {"gain": gain}


async def _engine_load(engine: GenerationEngine, size: int, steps: int, clients: int, per_client: int) -> LoadResult:
    latencies: list[float] = []

    async def client(index: int) -> None:
        for i in range(per_client):
            params = GenerationParams(
                prompt="a lighthouse at dawn",
                width=size,
                height=size,
                num_images=1,
                seed=index * 1000 + i,
                num_inference_steps=steps,
                guidance_scale=0.0,
            )
            started = time.perf_counter()
            await engine.generate(params)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(clients)))
    seconds = time.perf_counter() - started
    return LoadResult(clients, clients * per_client, clients * per_client, seconds, latencies, {200: len(latencies)})


def engine_throughput(model_dir: Path, size: int, steps: int, total: int, client_counts: list[int]):
    pipe, device = load_pipeline(Settings(model_id=str(model_dir), warmup=False))
    rows, by_mode = [], {}
    for mode, batch in (("on", 8), ("off", 1)):
        settings = Settings(model_id=str(model_dir), warmup=False, max_batch_images=batch, max_queue_images=256)
        engine = GenerationEngine(settings, loader=lambda *_: (pipe, device))
        engine.start()
        while not engine.ready:
            time.sleep(0.01)
        asyncio.run(_engine_load(engine, size, steps, 2, 2))
        for clients in client_counts:
            result = asyncio.run(_engine_load(engine, size, steps, clients, max(2, total // clients)))
            by_mode[(mode, clients)] = result
            rows.append(_row(mode, result))
        engine.close()
    title = f"## 2b. Throughput at the engine (no HTTP), batching on vs off, {size}², {steps} steps"
    lines, gain = _gain_lines(title, rows, by_mode)
    return lines, {"gain": gain}


def photo_like(width: int, height: int) -> np.ndarray:
    """Smooth colour fields with mild grain: compresses like a generated picture, unlike noise."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.float32)
    return np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)


def encoders(rounds: int) -> tuple[list[str], dict]:
    def pillow_png(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    variants = [
        ("png (sd35: imagecodecs, level 1)", lambda px: encode_image(px, "png")),
        ("png (Pillow default, level 6)", pillow_png),
        ("jpeg (output_compression 100 → q95)", lambda px: encode_image(px, "jpeg", 100)),
        ("jpeg (output_compression 80)", lambda px: encode_image(px, "jpeg", 80)),
        ("webp (output_compression 100: lossless)", lambda px: encode_image(px, "webp", 100)),
        ("webp (output_compression 80)", lambda px: encode_image(px, "webp", 80)),
    ]
    rows = []
    results = {}
    for width, height in ((512, 512), (1024, 1024), (1536, 1024)):
        pixels = photo_like(width, height)
        for name, encode in variants:
            encode(pixels)
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                data = encode(pixels)
                samples.append(time.perf_counter() - started)
            started = time.perf_counter()
            base64.b64encode(data)
            b64_ms = (time.perf_counter() - started) * 1000
            results[(name, width, height)] = median_ms(samples)
            rows.append(
                f"| {width}x{height} | {name} | {median_ms(samples):.1f} | {len(data) / 1e6:.2f} | {b64_ms:.1f} |"
            )
    lines = [
        "## 3. Encoding a photo-like image (median of runs, one thread)",
        "",
        "| size | format | encode ms | MB | base64 ms |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    return lines, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds for section 1")
    parser.add_argument("--requests", type=int, default=48, help="requests per client count in section 2")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (fewer rounds and requests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests = 3, 8
    clients = [1, 4, 16] if not args.quick else [1, 4]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_pipeline(Path(tmp) / "tiny-sd3")
        report = [f"# CPU benchmark — {date.today().isoformat()}", "", f"Machine: {machine()}", ""]
        report += ["Model: the tiny random SD3 pipeline (`python -m sd35.tiny`), float32 on CPU.", ""]
        for section in (
            lambda: http_overhead(model_dir, 512, args.rounds, steps=4),
            lambda: http_throughput(model_dir, 256, 4, args.requests, clients),
            lambda: engine_throughput(model_dir, 64, 4, args.requests, clients),
            lambda: encoders(max(3, args.rounds // 3)),
        ):
            lines, _ = section()
            print("\n".join(lines), flush=True)
            report += lines
    report.append(f"Total benchmark time: {time.monotonic() - started:.0f} s; command: `make bench`.")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-{date.today().isoformat()}{'-quick' if args.quick else ''}.md"
    path.write_text("\n".join(report) + "\n")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
