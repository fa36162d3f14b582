"""bench/gpu.py: the full-size architecture maps to the published sizes, and the script runs end to end on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import DEFAULT_ARCH, load_arch, parameter_counts
from sd35.engine.memory import MODES

ROOT = Path(__file__).resolve().parent.parent

# Published sizes of SD3.5 Large's components, in parameters.
PUBLISHED = {
    "transformer": 8.1e9,
    "text_encoder_3": 4.76e9,  # T5-XXL encoder
    "text_encoder_2": 0.69e9,  # CLIP-G
    "text_encoder": 0.12e9,  # CLIP-L
    "vae": 0.08e9,
}


@pytest.mark.skipif(not DEFAULT_ARCH.is_file(), reason=f"{DEFAULT_ARCH} is not in this checkout")
def test_full_size_components_match_the_published_sizes() -> None:
    counts = parameter_counts(load_arch(DEFAULT_ARCH))
    assert set(counts) == set(PUBLISHED)
    for name, published in PUBLISHED.items():
        assert counts[name] == pytest.approx(published, rel=0.05), f"{name}: {counts[name] / 1e9:.3f} B parameters"


@pytest.mark.skipif(not DEFAULT_ARCH.is_file(), reason=f"{DEFAULT_ARCH} is not in this checkout")
def test_tiny_quick_run_serves_each_scenario_over_http(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.gpu", "--tiny", "--quick", "--scenarios", "baseline,no_t5,int8"]
    completed = subprocess.run(
        [*command, "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    [json_path] = tmp_path.glob("gpu-*-cpu-tiny.json")
    assert json_path.with_suffix(".md").is_file()
    [run] = json.loads(json_path.read_text())["runs"]
    assert run["judged"] is False, "targets are judged only for the full-size model on a GPU"
    results = {r["scenario"]: r for r in run["scenarios"]}
    assert list(results) == ["baseline", "no_t5", "int8"]
    for name, result in results.items():
        assert result["ok"], f"{name}: {result['error']}"
        assert result["images_per_second"] > 0
        assert 0 < result["p50_s"] <= result["p95_s"]
        assert result["concurrent_p50_s"] > 0
        assert result["vram_peak_traffic_gib"] is None, "no GPU memory to report on a CPU"
    assert results["no_t5"]["knobs"]["MEMORY_MODE"] == "no_t5"
    assert results["baseline"]["memory_mode"] == "full", "auto resolves to full on a CPU"
    # int8 goes through the service's real quantized loading, and is compared with baseline on the same seeds.
    assert results["int8"]["memory_mode"] == "int8"
    assert results["int8"]["weight_gib"] < results["baseline"]["weight_gib"]
    quality = results["int8"]["quality_vs_baseline"]
    assert 0 < quality["mad"] < 5 and quality["psnr_db"] > 30
    assert "quality_vs_baseline" not in results["baseline"]
    assert "| baseline |" in completed.stdout and "| int8 |" in completed.stdout


@pytest.mark.skipif(not DEFAULT_ARCH.is_file(), reason=f"{DEFAULT_ARCH} is not in this checkout")
def test_describe_lists_every_memory_mode_and_what_auto_picks() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--describe"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in completed.stdout.splitlines() if line.startswith("| `")}
    assert set(rows) == {f"`{mode}`" for mode in MODES}
    assert "16 GB → `nf4`" in completed.stdout and "24 GB → `int8`" in completed.stdout
