"""Start and stop a real `bentoml serve` process on a loopback port for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.harness import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(
    env: dict[str, str],
    workdir: Path,
    target: str = "service:SD35",
    timeout: float = 180,
    ready: bool = True,
    cli_port: bool = False,
) -> Iterator[Server]:
    """Serve ``target`` with ``env`` (plus HOST/PORT on loopback); yields the server once ready
    (or, with ``ready=False``, once it answers at all: for a model that is loading or failed).
    ``cli_port``: the port is given as ``bentoml serve --port`` instead, and PORT names another one."""
    port = free_port()
    log_path = workdir / f"server-{port}.log"
    full_env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(free_port() if cli_port else port),
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "IMAGE_STORE_DIR": str(workdir / f"images-{port}"),
        **env,
    }
    bentoml = Path(sys.executable).with_name("bentoml")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(bentoml), "serve", target, *(["--port", str(port)] if cli_port else [])],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                probe = httpx.get(f"{base_url}/readyz" if ready else f"{base_url}/livez", timeout=2)
                if probe.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {timeout} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)
        yield Server(base_url, process, log_path)
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's group, then SIGKILL it if it has not exited within 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@contextmanager
def moto_s3(bucket: str, **credentials: str) -> Iterator[str]:
    """moto's real S3 HTTP server on a loopback port with ``bucket`` made; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, **credentials).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def failed_start(env: dict[str, str], mentioning: str) -> list[str]:
    """Run ``bentoml serve`` with ``env``, which must make it exit non-zero; its output lines naming ``mentioning``."""
    bentoml = Path(sys.executable).with_name("bentoml")
    result = subprocess.run(
        [str(bentoml), "serve", "service:SD35"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in (result.stdout + result.stderr).splitlines() if mentioning in line]
