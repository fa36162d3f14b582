"""The CUDA image, as users get it: `make containerize` with its default torch (PyPI's CUDA 13 build).

`make container-test-cuda` runs this module (marker ``container``, and a file of its
own: `make test` and `make container-test` leave it out). The build downloads
~3 GB of CUDA wheels and takes minutes. There is no GPU here: the image runs
the tiny model with ``DEVICE=cpu`` (PyPI's CUDA torch runs on a CPU), and the
full-size model without ``DEVICE`` must refuse to start, as on a host where
``docker run`` was given no ``--gpus all``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.test_container import ROOT, docker, free_port, loopback, model_dir, run_container, wait_for

pytestmark = pytest.mark.container

IMAGE = os.environ.get("CUDA_IMAGE", "sd35:cuda")
BUILD_TIMEOUT = 3600
__all__ = ["model_dir"]  # the tiny model fixture, shared with tests/test_container.py


def _lock_version(name: str) -> str:
    return re.search(rf"^{name}==(\S+)", (ROOT / "requirements-torch.lock").read_text(), re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def cuda_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`make containerize` with nothing but the build host's network option (no bridge here)."""
    if docker("info", check=False).returncode != 0:
        pytest.fail("no Docker daemon answers: run `make container-test-cuda`, which starts one")
    log = tmp_path_factory.mktemp("build") / "containerize.log"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home"))}
    started = time.monotonic()
    with open(log, "wb") as out:
        result = subprocess.run(
            ["make", "containerize", f"IMAGE={IMAGE}", "CONTAINERIZE_OPTS=--opt network=host"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
        )
    assert result.returncode == 0, log.read_text(errors="replace")[-6000:]
    size = int(docker("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout)
    print(f"\n{IMAGE}: built in {time.monotonic() - started:.0f} s, {size / 1e9:.2f} GB")
    return IMAGE


def test_torch_is_the_cuda_build_the_lock_names(cuda_image: str) -> None:
    script = "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
    result = docker("run", "--rm", "--network", "none", "--entrypoint", "python", cuda_image, "-c", script)
    version, cuda, available = result.stdout.split()
    runtime = _lock_version("nvidia-cuda-runtime")  # e.g. 13.0.96: the CUDA the wheel was built for
    assert version.split("+")[0] == _lock_version("torch")  # PyPI's build says 2.13.0+cu130
    assert (cuda, available) == (".".join(runtime.split(".")[:2]), "False")
    print(f"\ninside {cuda_image}: torch {version}, torch.version.cuda {cuda}, GPU visible: {available}")


def test_serves_the_tiny_model_on_the_cpu(cuda_image: str, model_dir: Path) -> None:
    port = free_port()
    env = {"HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu", "WARMUP": "false"}
    with run_container(cuda_image, model_dir, "--network", "host", env=env) as container:
        wait_for(lambda: _healthy(port), 300, lambda: container.logs()[-4000:])
        response = httpx.post(
            f"{loopback(port)}/v1/images/generations",
            json={"prompt": "a lighthouse", "size": "256x256", "num_inference_steps": 2},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 1
        print(f"\n/health: {httpx.get(f'{loopback(port)}/health', timeout=10).json()}; generation: 200")


def test_the_full_size_model_without_a_gpu_refuses_to_start(cuda_image: str, tmp_path: Path) -> None:
    """What `docker run` without `--gpus all` does with the real model: exit at once, saying what to do."""
    from bench.gpu.arch import DEFAULT_ARCH, load_arch, write_sparse_checkpoint

    sparse = tmp_path / "sd35-large"
    write_sparse_checkpoint(load_arch(DEFAULT_ARCH), sparse)
    for path in [sparse, *sparse.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    name = f"sd35-refusal-{os.getpid()}"
    started = time.monotonic()
    result = docker(
        "run", "--name", name, "--network", "none", "-e", "MODEL_ID=/models/sd35-large",
        "-v", f"{sparse}:/models/sd35-large:ro", cuda_image, check=False, timeout=180,
    )  # fmt: skip
    try:
        seconds = time.monotonic() - started
        assert result.returncode != 0
        output = result.stdout + result.stderr
        [line] = [line for line in output.splitlines() if "refusing to start" in line]
        assert "--gpus all" in line and "DEVICE=cpu" in line and "Traceback" not in output
        print(f"\nrefused in {seconds:.1f} s (docker run to exit): {line}")
    finally:
        docker("rm", "-f", name, check=False)


def _healthy(port: int) -> bool:
    try:
        response = httpx.get(f"{loopback(port)}/health", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()["status"] == "healthy"
