"""The real image: built by `make containerize`, run with Docker on the tiny model.

`make container-test` runs this module (marker ``container``; `make test` leaves it
out). It needs a Docker daemon and a ``python:3.11-slim`` base image, which
``scripts/container-test.sh`` provides. torch comes from the CPU wheel pip picks
on this machine, served on loopback as an index that holds torch alone, through
the same ``TORCH_INDEX_URL`` a user would pass. Containers use the host's
network (there is no bridge here) with the server on 127.0.0.1, or no network.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from bench.harness import free_port
from tests.conftest import assert_openai_error
from tests.test_bento import SECRET_VALUES

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "sd35:latest"
HF_HOME = "/home/bentoml/.cache/huggingface"
API_KEY = "container-test-key"
# A fixed port keeps TORCH_INDEX_URL, a build argument, the same from run to run,
# so that Docker's layer cache holds; another free port is taken when it is busy.
TORCH_INDEX_PORT = 18035
BUILD_TIMEOUT = 1800
# The warm-up (a 1024² generation, ≈ 10 s on 2 cores) only where the default is under test.
NO_WARMUP = {"WARMUP": "false"}


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def wait_for(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what()}")
        time.sleep(0.25)


@contextmanager
def torch_index() -> Iterator[str]:
    """A PEP 503 index on loopback holding only the torch wheel pip picks here (the CPU build)."""
    root = ROOT / "build" / "torch-index"
    project = root / "simple" / "torch"
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(
        [str(ROOT / "scripts" / "torch-wheel.sh"), str(project)],
        env={**os.environ, "PYTHON": sys.executable},
        check=True,
        capture_output=True,
        timeout=600,
    )
    handler = functools.partial(_QuietHandler, directory=str(root))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`make containerize` exactly as a user runs it, with secrets in the build environment."""
    if docker("info", check=False).returncode != 0:
        pytest.fail("no Docker daemon answers: run `make container-test`, which starts one")
    log = tmp_path_factory.mktemp("build") / "containerize.log"
    env = {
        **os.environ,
        # The Bento goes to a store of the test's own, not the user's ~/bentoml.
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home")),
        "HF_TOKEN": SECRET_VALUES[0],
        "API_KEY": SECRET_VALUES[1],
        "HUGGING_FACE_HUB_TOKEN": SECRET_VALUES[2],
    }
    with torch_index() as index_url, open(log, "wb") as out:
        result = subprocess.run(
            [
                "make",
                "containerize",
                f"IMAGE={IMAGE}",
                f"TORCH_INDEX_URL={index_url}",
                "CONTAINERIZE_OPTS=--opt network=host",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
        )
    assert result.returncode == 0, log.read_text(errors="replace")[-6000:]
    return IMAGE


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, readable by any uid (diffusers saves weights with mode 0600)."""
    target = tmp_path_factory.mktemp("model") / "tiny-sd3"
    shutil.copytree(tiny_model_dir, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def host_dir(tmp_path: Path, name: str, uid: int) -> Path:
    """An empty host directory owned by ``uid``, as a user's own cache directory is."""
    path = tmp_path / name
    path.mkdir()
    os.chown(path, uid, uid)
    return path


@dataclass
class Container:
    name: str

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def inspect(self) -> dict:
        return json.loads(docker("inspect", self.name).stdout)[0]

    def health(self) -> str:
        state = self.inspect()["State"]
        return state.get("Health", {}).get("Status", "none")

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *command, check=False)

    def wait_ready_line(self, timeout: float = 180) -> str:
        """The log line that says the model is loaded."""
        pattern = re.compile(r"model \S+ ready on cpu in [\d.]+ s")
        wait_for(lambda: bool(pattern.search(self.logs())), timeout, lambda: self.logs()[-4000:])
        return pattern.search(self.logs()).group(0)

    def wait_healthy(self, timeout: float = 120) -> None:
        wait_for(lambda: self.health() == "healthy", timeout, lambda: f"{self.health()}\n{self.logs()[-3000:]}")


@contextmanager
def run_container(image: str, model: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[Container]:
    """``docker run -d`` on the tiny model (mounted read-only); removed afterwards, volumes too."""
    name = f"sd35-test-{uuid.uuid4().hex[:10]}"
    variables = {"MODEL_ID": "/models/tiny-sd3", "HF_HUB_OFFLINE": "1", **(env or {})}
    env_args = [arg for key, value in variables.items() for arg in ("-e", f"{key}={value}")]
    # The image's check command as built; only the interval is shortened, or the
    # first check would come 30 s after the start.
    docker(
        "run", "-d", "--name", name, "--health-interval", "1s",
        "-v", f"{model}:/models/tiny-sd3:ro", *env_args, *options, image,
    )  # fmt: skip
    try:
        yield Container(name)
    finally:
        docker("rm", "-f", "-v", name, check=False)


def loopback(port: int) -> str:
    return f"http://127.0.0.1:{port}"


# --- the image itself ---------------------------------------------------------


def _locked(lock: Path) -> dict[str, str]:
    return {
        name.lower().replace("_", "-"): version
        for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock.read_text(), re.MULTILINE)
    }


def test_image_installs_exactly_the_lock(image: str) -> None:
    """Every package in the image's environment is the locked version, and the tests here run the same ones."""
    script = (
        "import json, importlib.metadata as m\n"
        "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))"
    )
    result = docker("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", script)
    installed = json.loads(result.stdout)
    torch_version = installed.pop("torch")
    assert torch_version == "2.13.0+cpu", "torch came from the loopback index (the CPU build)"
    assert installed == _locked(ROOT / "requirements.lock")

    from importlib.metadata import version

    for name, locked in installed.items():
        assert version(name) == locked, f"the test environment has {name} {version(name)}, the image {locked}"


def test_no_package_cache_in_the_image(image: str) -> None:
    result = docker(
        "run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "sh", image, "-c",
        "du -sk /root/.cache /home/bentoml/.cache /tmp /app/.cache 2>/dev/null;"
        " find / -xdev -type d \\( -path '*/.cache/uv' -o -path '*/.cache/pip' \\) -print 2>/dev/null",
    )  # fmt: skip
    sizes = dict(reversed(line.split("\t")) for line in result.stdout.splitlines() if "\t" in line)
    leftovers = [line for line in result.stdout.splitlines() if "\t" not in line and line.strip()]
    assert leftovers == [], f"package caches in the image: {leftovers}"
    assert all(int(size) < 512 for size in sizes.values()), sizes


def test_no_secret_in_the_image(image: str) -> None:
    """The build ran with HF_TOKEN, API_KEY and HUGGING_FACE_HUB_TOKEN set; none is in a layer or the config."""
    history = docker("history", "--no-trunc", image).stdout
    config = docker("inspect", image).stdout
    for secret in SECRET_VALUES:
        assert secret not in history and secret not in config, secret
    environment = json.loads(config)[0]["Config"]["Env"]
    assert not [line for line in environment if line.split("=")[0] in {"HF_TOKEN", "API_KEY", "HUGGING_FACE_HUB_TOKEN"}]


def test_image_metadata(image: str) -> None:
    config = json.loads(docker("inspect", image).stdout)[0]["Config"]
    assert config["User"] == "bentoml"
    assert set(config["ExposedPorts"]) == {"8000/tcp"}
    assert config["Volumes"] in (None, {}), "an anonymous volume would hide a mounted cache"
    assert f"HF_HOME={HF_HOME}" in config["Env"]
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])


# --- running it ---------------------------------------------------------------


def test_serves_on_the_port_it_is_given(image: str, model_dir: Path, tmp_path: Path) -> None:
    """The original README's run line: the host's cache mounted at /root/.cache/huggingface, a key, PORT."""
    port = free_port()
    cache = host_dir(tmp_path, "huggingface", 1000)
    with run_container(
        image, model_dir, "--network", "host", "-v", f"{cache}:/root/.cache/huggingface",
        env={"HOST": "127.0.0.1", "PORT": str(port), "API_KEY": API_KEY},
    ) as container:  # fmt: skip
        assert "ready on cpu" in container.wait_ready_line()
        container.wait_healthy()
        health = httpx.get(f"{loopback(port)}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "healthy", health.text

        client = openai.OpenAI(base_url=f"{loopback(port)}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        result = client.images.generate(prompt="a lighthouse", size="256x256", n=2, extra_body={"seed": 3})
        assert len(result.data) == 2 and all(len(item.b64_json) > 100 for item in result.data)

        refused = httpx.post(f"{loopback(port)}/v1/images/generations", json={"prompt": "x"}, timeout=10)
        assert_openai_error(refused, 401, "authentication_error")
        docs = httpx.get(f"{loopback(port)}/docs", timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()

        # The mounted host directory is the model cache, and the server's user can write to it.
        mounts = container.inspect()["Mounts"]
        assert [mount["Type"] for mount in mounts].count("volume") == 0, mounts
        probe = container.exec(
            "python", "-c",
            "import pathlib, huggingface_hub.constants as c;"
            " p = pathlib.Path(c.HF_HUB_CACHE); p.mkdir(parents=True, exist_ok=True);"
            " (p / 'written-by-the-container').write_text('ok'); print(c.HF_HUB_CACHE)",
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip() == f"{HF_HOME}/hub"
        written = cache / "hub" / "written-by-the-container"
        assert written.read_text() == "ok" and written.stat().st_uid == 1000


def test_default_port_and_any_user(image: str, model_dir: Path, tmp_path: Path) -> None:
    """No PORT: 8000. `--user UID:GID` for a uid the image does not know, with that user's cache directory."""
    uid = 2345
    cache = host_dir(tmp_path, "huggingface", uid)
    with run_container(
        image, model_dir, "--network", "none", "--user", f"{uid}:{uid}", "-v", f"{cache}:{HF_HOME}", env=NO_WARMUP
    ) as container:
        container.wait_ready_line()
        container.wait_healthy()
        ready = container.exec("curl", "-fsS", "http://127.0.0.1:8000/readyz")
        assert ready.returncode == 0, ready.stderr
        assert container.exec("sh", "-c", 'id -u; touch "$HF_HOME/probe"').stdout.split() == [str(uid)]
        assert (cache / "probe").stat().st_uid == uid


def test_docker_stop_during_a_long_request(image: str, model_dir: Path) -> None:
    """`docker stop` (Docker's default 10 s) while a ≈ 15 s request runs: a clean exit 0 before the
    SIGKILL, and the client gets its images or an OpenAI-shaped 503 — never a dropped connection."""
    port = free_port()
    env = {"HOST": "127.0.0.1", "PORT": str(port), **NO_WARMUP}
    with run_container(image, model_dir, "--network", "host", env=env) as ctr:
        ctr.wait_ready_line()
        wait_for(lambda: _ready(port), 60, ctr.logs)
        outcome: dict[str, object] = {}

        def long_request() -> None:
            try:
                outcome["response"] = httpx.post(
                    f"{loopback(port)}/v1/images/generations",
                    json={"prompt": "a long one", "n": 4, "size": "1024x1024", "num_inference_steps": 50},
                    timeout=60,
                )
            except httpx.HTTPError as error:
                outcome["error"] = error

        client = threading.Thread(target=long_request)
        client.start()
        time.sleep(2)  # the batch is on the worker by now
        started = time.monotonic()
        docker("stop", ctr.name, timeout=60)
        stopped_after = time.monotonic() - started
        client.join(60)

        state = ctr.inspect()["State"]
        assert state["ExitCode"] == 0 and not state["OOMKilled"], f"{state}\n{ctr.logs()[-3000:]}"
        assert stopped_after < 10, f"docker stop took {stopped_after:.1f} s: the SIGKILL came"
        assert "error" not in outcome, f"the client lost its connection: {outcome.get('error')!r}"
        response = outcome["response"]
        assert isinstance(response, httpx.Response)
        if response.status_code == 200:
            assert len(response.json()["data"]) == 4
        else:
            assert_openai_error(response, 503, "service_unavailable")


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"{loopback(port)}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --- docker-compose -----------------------------------------------------------


def test_compose_config_is_valid() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={key: value for key, value in os.environ.items() if key != "SHUTDOWN_GRACE_SECONDS"},
    )
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["sd35"]
    grace = float(service["environment"]["SHUTDOWN_GRACE_SECONDS"])
    stop_grace = _seconds(service["stop_grace_period"])
    assert stop_grace > grace + 5, "Docker must wait for the service's own grace, and the exit after it"


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_runs_the_image(image: str, model_dir: Path, tmp_path: Path) -> None:
    """docker-compose.yml as shipped, less its GPU reservation, on this host's network."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["sd35"]
    del service["deploy"]["resources"]["reservations"]["devices"]
    # No bridge network here: the host's, with the server on loopback, instead of the published port.
    port = free_port()
    del service["ports"]
    service["network_mode"] = "host"
    service["environment"].update({"HOST": "127.0.0.1", "PORT": str(port), **NO_WARMUP})
    service["volumes"].append(f"{model_dir}:/models/tiny-sd3:ro")
    stripped = tmp_path / "docker-compose.yml"
    stripped.write_text(yaml.safe_dump(compose))
    project = f"sd35test{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MODEL_ID": "/models/tiny-sd3", "SD35_IMAGE": image, "API_KEY": "", "HF_TOKEN": ""}
    command = ["docker-compose", "-p", project, "-f", str(stripped)]

    def compose_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)

    try:
        started = compose_run("up", "-d")
        assert started.returncode == 0, started.stderr
        name = compose_run("ps", "-q").stdout.strip()
        wait_for(lambda: _ready(port), 180, lambda: compose_run("logs").stdout[-3000:])
        generated = httpx.post(
            f"{loopback(port)}/v1/images/generations", json={"prompt": "a boat", "size": "256x256"}, timeout=60
        )
        assert generated.status_code == 200, generated.text
        config = json.loads(docker("inspect", name).stdout)[0]["Config"]
        assert config["StopTimeout"] == _seconds(service["stop_grace_period"])
        stopped = compose_run("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(docker("inspect", name).stdout)[0]["State"]["ExitCode"] == 0
    finally:
        compose_run("down", "-v", "--remove-orphans")
