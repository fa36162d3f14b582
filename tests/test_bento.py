"""The shipped artefacts: the Bento, its Dockerfile, compose and BentoCloud configs — and serving the Bento."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server import running_server

ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))
SECRET_VALUES = ("hf_sentinel_token_do_not_bake", "sk-sentinel-key-do-not-bake", "hub_sentinel_do_not_bake")
HF_HOME = "/home/bentoml/.cache/huggingface"
LOCKS = ("requirements.lock", "requirements-dev.lock", "requirements-torch.lock")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], str, Path]:
    """`bentoml build` into a temporary store, with secrets in the environment that must not be baked in."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_TOKEN": SECRET_VALUES[0],
        "API_KEY": SECRET_VALUES[1],
        "HUGGING_FACE_HUB_TOKEN": SECRET_VALUES[2],
    }
    result = subprocess.run(
        [BENTOML, "build", "-o", "tag"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = re.search(r"__tag__:(\S+)", result.stdout).group(1)
    name, version = tag.split(":")
    return env, tag, home / "bentos" / name / version


def _instructions(dockerfile: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _check_dockerfile(dockerfile: str) -> None:
    lines = _instructions(dockerfile)
    assert lines[0].startswith("FROM python:3.11-slim"), lines[0]
    exposed = [line for line in lines if line.startswith("EXPOSE")]
    assert "EXPOSE 8000" in exposed and "EXPOSE 3000" not in exposed, exposed
    healthchecks = [line for line in lines if line.startswith("HEALTHCHECK")]
    assert len(healthchecks) == 1
    check = healthchecks[0]
    assert "/readyz" in check and "${PORT:-8000}" in check and "curl -fsS" in check
    start_period = int(re.search(r"--start-period=(\d+)s", check).group(1))
    assert start_period >= 600, "the first start downloads ~30 GB"
    users = [line for line in lines if line.startswith("USER")]
    assert users[-1] == "USER bentoml", "the server must run as the non-root user"
    assert f"ENV HF_HOME={HF_HOME}" in lines and "ENV HOME=/home/bentoml" in lines
    # No VOLUME: an anonymous volume would hide a cache mounted through the /root link.
    assert not any(line.startswith("VOLUME") for line in lines)
    assert any('ln -sfn "$HF_HOME" /root/.cache/huggingface' in line for line in lines)
    assert any('chmod 1777 "$HOME" "$HOME/.cache" "$HF_HOME"' in line for line in lines), "any --user can write"
    assert "ARG BENTO_USER_UID=1000" in lines
    # torch first (the optional TORCH_INDEX_URL), then the lock, each hash-checked, never BentoML's install.sh.
    torch_step = next(i for i, line in enumerate(lines) if "TORCH_INDEX_URL" in line and line.startswith("RUN"))
    lock_step = next(i for i, line in enumerate(lines) if "-r ./src/requirements.lock" in line)
    assert "ARG TORCH_INDEX_URL=" in lines[:torch_step]
    assert "--require-hashes --no-deps -r ./src/requirements.lock" in lines[lock_step] and torch_step < lock_step
    assert not any("install.sh" in line for line in lines)
    assert "ENV UV_NO_CACHE=1 PIP_NO_CACHE_DIR=1" in lines[: lines.index(next(x for x in lines if "uv venv" in x))]
    assert lines[-1].startswith("ENTRYPOINT") and "entrypoint.sh" in lines[-1]


def test_bento_dockerfile(built: tuple[dict[str, str], str, Path]) -> None:
    _, _, bento = built
    _check_dockerfile((bento / "env" / "docker" / "Dockerfile").read_text())


def test_dockerfile_that_containerize_renders(built: tuple[dict[str, str], str, Path], tmp_path: Path) -> None:
    """`bentoml containerize` renders the Dockerfile again (with BuildKit); check that one too.

    It runs the way `make containerize` runs it: with TMPDIR under the working
    directory, which BentoML 1.4.40 needs to read the template back.
    """
    env, tag, _ = built
    (tmp_path / "tmp").mkdir()
    env = {**env, "TMPDIR": str(tmp_path / "tmp")}
    script = (
        "import bentoml, sys\n"
        "from bentoml._internal.container import construct_containerfile\n"
        f"with construct_containerfile(bentoml.get({tag!r}), enable_buildkit=True) as (_, path):\n"
        "    sys.stdout.write(open(path).read())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_dockerfile(result.stdout)


def test_bento_holds_exactly_what_runs(built: tuple[dict[str, str], str, Path]) -> None:
    _, _, bento = built
    src = bento / "src"
    files = {str(path.relative_to(src)) for path in src.rglob("*") if path.is_file()}
    package = {str(path.relative_to(ROOT)) for path in (ROOT / "sd35").rglob("*.py")}
    assert "sd35/engine/worker.py" in package, "the engine package is part of what runs"
    static = {f"sd35/static/{path.name}" for path in (ROOT / "sd35" / "static").iterdir()}
    assert static == {"sd35/static/playground.html"}
    locks = {"requirements.lock", "requirements-torch.lock"}
    assert files == {"service.py", "bentofile.yaml", *package, *static, *locks}


def test_no_secret_is_baked_in(built: tuple[dict[str, str], str, Path]) -> None:
    _, _, bento = built
    for path in bento.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for secret in SECRET_VALUES:
                assert secret.encode() not in text, f"{secret} leaked into {path.relative_to(bento)}"


def test_bento_yaml(built: tuple[dict[str, str], str, Path]) -> None:
    _, tag, bento = built
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["name"] == "sd35" and tag.startswith("sd35:")
    assert info["service"] == "service:SD35" and info["entry_service"] == "sd35"
    assert [service["name"] for service in info["services"]] == ["sd35"]
    assert info.get("envs") in (None, []), "no environment (and so no secret) is baked into the bento"
    assert info["docker"]["python_version"] == "3.11"


def test_the_bento_declares_the_locks_not_loose_pins(built: tuple[dict[str, str], str, Path]) -> None:
    """env/python/requirements.txt (what BentoCloud installs): every locked package at its locked version with its
    hashes, torch's CUDA build included; nothing left for a resolver to choose."""
    text = (built[2] / "env" / "python" / "requirements.txt").read_text()
    # BentoML appends its own pin, unhashed; pip and uv take it with the hashed line of the same version.
    text, appended = text.rstrip().rsplit("\n", 1)
    assert appended == "bentoml==1.4.40"
    declared = _lock_text(text)
    locked = {**_lock(ROOT / "requirements.lock"), **_lock(ROOT / "requirements-torch.lock")}
    assert declared == locked
    assert declared["torch"][0] == "2.13.0" and "nvidia-cublas" in declared
    assert "bentoml==1.4.40 \\" in text


def _pins(path: Path) -> dict[str, str]:
    """``name: version`` of a requirements file's own ``name==version`` lines (extras dropped)."""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", path.read_text(), re.MULTILINE)
    return {name.lower().replace("_", "-"): version for name, version in found}


def _lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """``name: (version, hashes)`` of a lock file written by `make lock`."""
    return _lock_text(path.read_text())


def _lock_text(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    entries = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if head:
            hashes = frozenset(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
            entries[head.group(1).lower().replace("_", "-")] = (head.group(2), hashes)
    return entries


def test_the_locks_match_the_requirements_and_each_other() -> None:
    """Refreshed by `make lock`; this fails when a pin changed and the lock did not."""
    runtime, dev, torch = (_lock(ROOT / name) for name in LOCKS)
    assert all(hashes for lock in (runtime, dev, torch) for _, hashes in lock.values()), "every entry has hashes"
    wanted = {**_pins(ROOT / "requirements.txt")}
    torch_pin = wanted.pop("torch")
    assert {name: runtime[name][0] for name in wanted} == wanted
    dev_wanted = {**wanted, **_pins(ROOT / "requirements-dev.txt")}
    assert {name: dev[name][0] for name in dev_wanted} == dev_wanted
    # The image's lock is the development lock's runtime part: the tests run what the image runs.
    assert {name: dev[name] for name in runtime} == runtime
    # torch and the CUDA libraries only in the torch lock; what it shares with the others agrees.
    cuda = {name for name in torch if name.startswith(("nvidia-", "cuda-")) or name in {"torch", "triton"}}
    assert torch["torch"][0] == torch_pin and "triton" in cuda
    assert not cuda & (set(runtime) | set(dev))
    assert {name: torch[name] for name in set(torch) - cuda} == {name: runtime[name] for name in set(torch) - cuda}


def test_the_bento_carries_the_locks(built: tuple[dict[str, str], str, Path]) -> None:
    _, _, bento = built
    for name in ("requirements.lock", "requirements-torch.lock"):
        assert (bento / "src" / name).read_bytes() == (ROOT / name).read_bytes()


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["sd35"]
    assert service["ports"] == ["${PORT:-8000}:8000"]
    assert f"huggingface-cache:{HF_HOME}" in service["volumes"] and "huggingface-cache" in compose["volumes"]
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    health = service["healthcheck"]
    assert "http://127.0.0.1:8000/readyz" in health["test"] and int(health["start_period"].rstrip("s")) >= 600
    assert {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "API_KEY", "MODEL_ID"} <= set(service["environment"])
    assert all(str(value).startswith("${") for value in service["environment"].values()), "values come from the host"


def test_bentocloud_config() -> None:
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    raw = yaml.safe_load((ROOT / "deploy" / "bentocloud.yaml").read_text())
    config = bentoml_cattr.structure(raw, CreateDeploymentSchema)
    assert config.name == "sd35" and config.bento == "sd35:latest"
    assert config.secrets == ["huggingface", "sd35-api-key"]
    assert not any(env.name in {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "API_KEY"} for env in config.envs)
    service = config.services["sd35"]
    assert service.instance_type and service.instance_type.startswith("gpu.")
    assert 1 <= service.scaling.min_replicas <= service.scaling.max_replicas
    assert service.config_overrides["traffic"]["timeout"] > 300, "must outlast REQUEST_TIMEOUT"


@pytest.mark.server
def test_the_built_bento_serves(built: tuple[dict[str, str], str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    env, tag, _ = built
    server_env = {"BENTOML_HOME": env["BENTOML_HOME"], "MODEL_ID": str(tiny_model_dir)}
    with running_server(server_env, tmp_path, target=tag) as running:
        response = httpx.post(
            f"{running.url}/v1/images/generations",
            json={"prompt": "a boat", "size": "256x256", "num_inference_steps": 1},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 1
