"""bench/gpu.py: the full-size architecture maps to the published sizes, and the script runs end to end on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import DEFAULT_ARCH, load_arch, parameter_counts

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
    command = [sys.executable, "-m", "bench.gpu", "--tiny", "--quick", "--scenarios", "baseline,no_t5"]
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
    assert list(results) == ["baseline", "no_t5"]
    for name, result in results.items():
        assert result["ok"], f"{name}: {result['error']}"
        assert result["images_per_second"] > 0
        assert 0 < result["p50_s"] <= result["p95_s"]
        assert result["concurrent_p50_s"] > 0
        assert result["vram_peak_traffic_gib"] is None, "no GPU memory to report on a CPU"
    assert results["no_t5"]["knobs"]["MEMORY_MODE"] == "no_t5"
    assert "| baseline |" in completed.stdout and "| no_t5 |" in completed.stdout
