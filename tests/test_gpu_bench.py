"""bench/gpu: the full-size architecture maps to the published sizes, the script runs end to end on a CPU,
and what travels to the GPU machine (the bundle lock, the version check) is consistent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu import bundle, check_env
from bench.gpu.arch import DEFAULT_ARCH, load_arch, parameter_counts
from bench.gpu.scenarios import SCENARIOS, WINDOWS, Scenario, skip_reason
from sd35.engine.memory import MODES

ROOT = Path(__file__).resolve().parent.parent
needs_arch = pytest.mark.skipif(not DEFAULT_ARCH.is_file(), reason=f"{DEFAULT_ARCH} is not in this checkout")

# Published sizes of SD3.5 Large's components, in parameters.
PUBLISHED = {
    "transformer": 8.1e9,
    "text_encoder_3": 4.76e9,  # T5-XXL encoder
    "text_encoder_2": 0.69e9,  # CLIP-G
    "text_encoder": 0.12e9,  # CLIP-L
    "vae": 0.08e9,
}


@needs_arch
def test_full_size_components_match_the_published_sizes() -> None:
    counts = parameter_counts(load_arch(DEFAULT_ARCH))
    assert set(counts) == set(PUBLISHED)
    for name, published in PUBLISHED.items():
        assert counts[name] == pytest.approx(published, rel=0.05), f"{name}: {counts[name] / 1e9:.3f} B parameters"


def bench_gpu(*args: str, out: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], dict]:
    options = ["--device", "cpu", "--out", str(out), "--stem", "results", "--checkpoint", str(out / "checkpoint")]
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args, *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = out / "results.json"
    return completed, json.loads(results.read_text()) if results.is_file() else {}


@needs_arch
def test_tiny_quick_run_serves_skips_and_measures_batching(tmp_path: Path) -> None:
    scenarios = "baseline,int8,nf4,auto_24gb,batching"
    completed, results = bench_gpu("--tiny", "--quick", "--scenarios", scenarios, out=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (tmp_path / "results.md").is_file()
    assert results["synthetic"] is True and results["device"] == "cpu"
    assert results["python_version"] and results["torch_version"] == __import__("torch").__version__
    [run] = results["runs"]
    assert run["judged"] is False, "targets are judged only for the full-size model on a GPU"
    assert run["checkpoint"]["bytes"] > 0 and run["checkpoint"]["reused"] is False
    assert "built in memory" in (tmp_path / "results.md").read_text(), "which way to make the weights is faster"
    found = run["scenarios"]
    assert list(found) == scenarios.split(",")
    assert {name: r["status"] for name, r in found.items()} == {
        "baseline": "ok",
        "int8": "ok",
        "nf4": "skipped",
        "auto_24gb": "ok",
        "batching": "ok",
    }, {name: r.get("error") for name, r in found.items()}
    baseline = found["baseline"]
    assert 0 < baseline["p50_s"] <= baseline["p95_s"] and baseline["images_per_second"] > 0
    assert baseline["bare_p50_s"] > 0, "the baseline also times the bare pipeline call"
    assert baseline["memory_mode"] == "full" and "vram_peak_traffic_gib" not in baseline, "no GPU memory on a CPU"
    # int8 goes through the service's real quantized loading.
    assert found["int8"]["memory_mode"] == "int8" and found["int8"]["weight_gib"] < baseline["weight_gib"]
    assert "CUDA" in found["nf4"]["skipped"]
    # On a CPU the cap scenario computes auto's pick for the full-size model and serves the tiny one in it.
    assert found["auto_24gb"]["auto_mode"] == "int8" and found["auto_24gb"]["memory_mode"] == "int8"
    assert found["auto_24gb"]["statuses"] == {"200": results["runs"][0]["settings"]["clients"]}
    # Batched images of float32 stay within 1/255 of the same seeds alone; bf16 is measured, not bounded here.
    assert found["batching"]["by_dtype"]["float32"]["max_abs"] <= 1
    assert "bfloat16" in found["batching"]["by_dtype"]
    assert "| baseline |" in completed.stdout and "nf4**: skipped" in completed.stdout


@needs_arch
def test_a_window_past_its_deadline_skips_with_the_reason_and_passes(tmp_path: Path) -> None:
    from bench.gpu.cli import main

    def window(name: str) -> dict:
        common = ["--tiny", "--quick", "--device", "cpu", "--checkpoint", str(tmp_path / "checkpoint")]
        options = [*common, "--out", str(tmp_path), "--stem", "r", "--deadline", str(time.time())]
        assert main(["--window", name, *options]) == 0, "skipped is not failed"
        return json.loads((tmp_path / "r.json").read_text())

    [run] = window("first")["runs"]
    assert run["window"] == "first" and list(run["scenarios"]) == list(WINDOWS["first"])
    assert all(r["status"] == "skipped" and "out of window time" in r["skipped"] for r in run["scenarios"].values())
    # A second window the same day adds a run to the same files.
    assert [r["window"] for r in window("nf4")["runs"]] == ["first", "nf4"]
    assert "out of window time" in (tmp_path / "r.md").read_text()


@needs_arch
def test_describe_lists_every_memory_mode_and_what_auto_picks() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--describe"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in completed.stdout.splitlines() if line.startswith("| `")}
    assert set(rows) == {f"`{mode}`" for mode in MODES}
    assert "16 GB → `nf4`" in completed.stdout and "24 GB → `int8`" in completed.stdout


def test_the_first_window_answers_the_first_questions_and_every_scenario_has_a_window() -> None:
    assert WINDOWS["first"] == ("baseline", "int8", "fp8", "auto_40gb", "auto_24gb", "auto_16gb")
    assert SCENARIOS["baseline"].bare, "the first window compares HTTP with the bare pipeline"
    assert {name for names in WINDOWS.values() for name in names} == set(SCENARIOS)


def test_skip_reasons_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert skip_reason(SCENARIOS["nf4"], "cpu") == "needs a CUDA GPU; this run is on cpu"
    assert skip_reason(SCENARIOS["baseline"], "cpu") is None
    assert "compute capability ≥ 8.9" in skip_reason(SCENARIOS["fp8"], "cuda:0", (8, 0))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    reason = skip_reason(Scenario("x", "", needs=("bitsandbytes",)), "cuda:0", (9, 0))
    assert reason.startswith("bitsandbytes is not installed (41 MiB")


# --- what travels to the GPU machine ----------------------------------------------


def test_the_bundle_lock_carries_our_versions_and_nothing_the_machine_has() -> None:
    """Refreshed by `make gpu-lock`; this fails when requirements.lock moved and the bundle lock did not."""
    carried = bundle.lock_entries(bundle.LOCK)
    ours = bundle.lock_entries(ROOT / "requirements.lock")
    pins, installed = bundle.machine_packages()
    assert all(hashes for _, hashes in carried.values()), "every wheel is hash-checked"
    assert {"bentoml", "diffusers", "fastapi", "pydantic", "torchao", "uvicorn"} <= set(carried)
    assert not set(carried) & (set(pins) | set(bundle.EXCLUDED)), "the machine's pins and the exclusions stay out"
    assert {name: version for name, (version, _) in carried.items()} == {name: ours[name][0] for name in carried}, (
        "the bundle holds the versions the tests run"
    )
    assert "torch" in pins and "transformers" in installed


def test_the_environment_check_finds_missing_and_incompatible_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_env.problems(["bentoml", "diffusers"]) == [], "this venv is consistent"
    assert check_env.problems(["no-such-package-sd35"]) == ["no-such-package-sd35 is not installed"]
    real_version = check_env.metadata.version

    def old_starlette(name: str) -> str:
        return "0.1.0" if name == "starlette" else real_version(name)

    monkeypatch.setattr(check_env.metadata, "version", old_starlette)
    [problem] = check_env.problems(["fastapi"])
    assert problem.startswith("starlette 0.1.0 does not satisfy fastapi")
    assert "boto3" not in check_env.needed() and "bentoml" in check_env.needed()
