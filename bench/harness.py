"""Benchmark plumbing: the real service, the bare pipeline, and concurrent HTTP clients.

Two ways to serve: :func:`serve_process` runs ``bentoml serve`` in processes of
its own, as in production (the CPU benchmark measures HTTP against it);
:func:`serve` runs BentoML's whole ASGI app behind uvicorn in a thread of this
process (the GPU benchmark, which swaps in its own pipeline loader).
:class:`BarePipeline` makes the bare pipeline call in a process of its own, the
same kind of process as a BentoML worker, so that the two compare fairly.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

import sd35.engine.loading
from sd35.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def forget_bentoml_metrics() -> None:
    """Let the next in-process service register its metrics again.

    BentoML registers its request metrics in the process-wide Prometheus
    registry each time it builds an app; a real server builds one per worker
    process, benchmarks and tests build many in one process.
    """
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if any(name.startswith("bentoml_") for name in names):
            REGISTRY.unregister(collector)


@contextlib.contextmanager
def serve(env: dict[str, str], loader: Callable[[Settings, int], Any] | None = None) -> Iterator[str]:
    """Serve the sd35 service configured by ``env``; yields its base URL once ready."""
    images = tempfile.TemporaryDirectory()
    env = {"IMAGE_STORE_DIR": images.name, **env}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    original_loader = sd35.engine.loading.load_pipeline
    if loader is not None:
        sd35.engine.loading.load_pipeline = loader
    try:
        import service

        service = importlib.reload(service)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(service.SD35.to_asgi(), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            yield _wait_ready(f"http://127.0.0.1:{port}")
        finally:
            server.should_exit = True
            thread.join(60)
    finally:
        sd35.engine.loading.load_pipeline = original_loader
        forget_bentoml_metrics()
        images.cleanup()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serve_process(env: dict[str, str], timeout: float = 600, tree: Path = ROOT) -> Iterator[str]:
    """``bentoml serve`` of the sd35 service configured by ``env``, on a loopback port; yields its base URL.

    ``tree`` is the source tree it serves (another revision's checkout, to compare against), run with this
    environment's packages.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryFile() as log:
        full_env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "BENTOML_HOME": home,
            "BENTOML_DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": "1",
            "IMAGE_STORE_DIR": str(Path(home) / "images"),
            **env,
        }
        bentoml = Path(sys.executable).with_name("bentoml")
        process = subprocess.Popen(
            [str(bentoml), "serve", "service:SD35"],
            cwd=tree,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield _wait_ready(f"http://127.0.0.1:{port}", timeout, process)
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


class BarePipeline:
    """The bare pipeline call (``output_type="pt"``, nothing else) in a process of its own.

    One JSON line per call goes to ``python -m bench.bare``; it answers with
    the seconds the call took, timed around the call alone.
    """

    def __init__(self, model_dir: Path) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.bare", str(model_dir)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        ready = self._process.stdout.readline()  # type: ignore[union-attr]
        if ready.strip() != "ready":
            raise RuntimeError(f"bench.bare did not start: {ready!r}")

    def call(self, size: int, seed: int, steps: int, n: int = 1) -> float:
        request = {"size": size, "seed": seed, "steps": steps, "n": n}
        self._process.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        self._process.stdin.flush()  # type: ignore[union-attr]
        return float(self._process.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        self._process.stdin.close()  # type: ignore[union-attr]
        self._process.wait(60)

    def __enter__(self) -> BarePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_ready(base_url: str, timeout: float = 1800, process: subprocess.Popen | None = None) -> str:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                return base_url
        health = None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            health = httpx.get(f"{base_url}/health", timeout=5).json()
        if health and "failed" in str(health.get("detail")):
            raise RuntimeError(f"model failed to load: {health['detail']}")
        if time.monotonic() > deadline:
            raise RuntimeError("service not ready in time")
        time.sleep(0.1)


@dataclass
class LoadResult:
    clients: int
    requests: int
    images: int
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p95(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def _load(
    base_url: str, body: dict[str, Any], clients: int, per_client: int, headers: dict[str, str] | None
) -> LoadResult:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    images = 0

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal images
        for i in range(per_client):
            started = time.perf_counter()
            response = await http.post("/v1/images/generations", json={**body, "seed": index * 1000 + i})
            payload = response.json()
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                images += len(payload["data"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits, headers=headers) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(index, http) for index in range(clients)))
        seconds = time.perf_counter() - started
    return LoadResult(clients, clients * per_client, images, seconds, latencies, statuses)


def load(
    base_url: str, body: dict[str, Any], clients: int, per_client: int, headers: dict[str, str] | None = None
) -> LoadResult:
    """``clients`` concurrent clients, each sending ``per_client`` requests back to back."""
    return asyncio.run(_load(base_url, body, clients, per_client, headers))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )


def commit() -> str:
    """The commit measured, and whether the tree held uncommitted changes."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def load_average() -> str:
    """The machine's 1/5/15-minute load average, which each results file records at its start and end."""
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def write_report(out: Path, name: str, report: list[str]) -> Path:
    """A results file ``out/name``, printed where it went."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text("\n".join(report) + "\n")
    print(f"written to {path}")
    return path


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000
