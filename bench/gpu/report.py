"""The GPU benchmark's results: one JSON and one Markdown file per day and device, rewritten after every scenario.

A window cut short (the lent machine's time ran out) keeps everything it
finished. Windows run on the same day and device accumulate in the same files;
``--mirror`` writes copies elsewhere too (``$OUT`` on the lent machine, the
only folder whose files come back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.gpu.arch import components_table
from sd35.engine.memory import GIB

TARGET_P50_S = 0.35
TARGET_IMAGES_PER_SECOND = 4.0
TARGET_SIZE = 1024
TARGET_STEPS = 4
TARGET_CLIENTS = 16


def judge(result: dict[str, Any], judged: bool) -> dict[str, str | None]:
    if not judged or result.get("status") != "ok" or result.get("kind") != "serve":
        return {"p50": None, "images_per_second": None}
    return {
        "p50": "PASS" if result["p50_s"] <= TARGET_P50_S else "FAIL",
        "images_per_second": "PASS" if result["images_per_second"] >= TARGET_IMAGES_PER_SECOND else "FAIL",
    }


def targets_line() -> str:
    return (
        f"Targets ({TARGET_SIZE}², {TARGET_STEPS} steps, on an H100): p50 ≤ {TARGET_P50_S} s end-to-end over HTTP "
        f"for n=1; ≥ {TARGET_IMAGES_PER_SECOND:g} images/s sustained with {TARGET_CLIENTS} concurrent clients."
    )


def fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _cell(text: str | None, limit: int = 240) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")[:limit]


def baseline_of(runs: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any] | None:
    """The latest successful baseline measured like ``run`` (same model and settings), maybe in an earlier window."""
    for other in reversed(runs[: runs.index(run) + 1]):
        if (other["model"], other["settings"]) != (run["model"], run["settings"]):
            continue
        found = other["scenarios"].get("baseline")
        if found and found.get("status") == "ok":
            return found
    return None


def ratio(value: float | None, reference: float | None) -> str:
    return "–" if value is None or not reference else f"×{value / reference:.2f}"


def serve_table(run: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """Served scenarios: latency, throughput, memory; ``vs baseline`` is each knob's effect (×0.5: twice as fast)."""
    baseline = baseline_of(runs, run) or {}
    rows = [
        f"| scenario | mode | weights GiB | load s | warm-up s | p50 s (HTTP) | p50 s (bare) | p95 s | p50 vs baseline "
        f"| img/s ({run['settings']['clients']} clients) | img/s vs baseline | GiB after load | peak GiB traffic "
        "| MAD vs baseline | PSNR dB | targets |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in run["scenarios"].values():
        if r.get("kind") != "serve" or r.get("status") != "ok":
            continue
        quality = r.get("quality_vs_baseline") or {}
        verdict = r.get("targets") or {}
        targets = "n/a" if verdict.get("p50") is None else f"p50 {verdict['p50']}, img/s {verdict['images_per_second']}"
        rows.append(
            f"| {r['scenario']} | {r.get('memory_mode') or '–'} | {fmt(r.get('weight_gib'), '.2f')} "
            f"| {fmt(r.get('load_s'), '.1f')} | {fmt(r.get('warmup_s'), '.1f')} | {fmt(r.get('p50_s'))} "
            f"| {fmt(r.get('bare_p50_s'))} | {fmt(r.get('p95_s'))} | {ratio(r.get('p50_s'), baseline.get('p50_s'))} "
            f"| {fmt(r.get('images_per_second'), '.2f')} "
            f"| {ratio(r.get('images_per_second'), baseline.get('images_per_second'))} "
            f"| {fmt(r.get('vram_after_load_gib'), '.1f')} | {fmt(r.get('vram_peak_traffic_gib'), '.1f')} "
            f"| {fmt(quality.get('mad'), '.2f')} | {fmt(quality.get('psnr_db'), '.1f')} | {targets} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def other_lines(run: dict[str, Any]) -> list[str]:
    """Memory caps, batching, skipped and failed scenarios, one line each."""
    lines = []
    for r in run["scenarios"].values():
        name = r["scenario"]
        if r.get("status") == "skipped":
            lines.append(f"- **{name}**: skipped: {r['skipped']}")
        elif r.get("status") == "failed":
            lines.append(f"- **{name}**: FAILED: {_cell(r.get('error'), 600)}")
        elif r.get("kind") == "cap":
            served = ""
            if r.get("statuses"):
                fits = {True: ", peak reserved within the cap", False: ", peak reserved ABOVE the cap"}
                served = (
                    f"; served {sum(r['statuses'].values())} concurrent requests: statuses {r['statuses']}, "
                    f"{fmt(r.get('images_per_second'), '.2f')} img/s, "
                    f"peak {fmt(r.get('vram_reserved_peak_gib'), '.1f')} GiB reserved"
                    + fits.get(r.get("within_cap"), "")
                )
            simulated = f" ({r['simulated']})" if r.get("simulated") else ""
            lines.append(
                f"- **{name}**: auto picks `{r.get('auto_mode')}`{simulated}: {_cell(r.get('plan'), 400)}{served}"
            )
        elif r.get("kind") == "batching":
            for dtype, d in r.get("by_dtype", {}).items():
                lines.append(
                    f"- **{name}** ({dtype}, {r['batch_images']} images at {r['size']}²): batched vs alone differ by "
                    f"at most {d['max_abs']}/255, {d['mean_abs']:.3f}/255 on average; {d['share_differing']:.2%} of "
                    f"values differ, {d['share_above_1']:.2%} by more than 1"
                )
        if r.get("cached_steps") is not None:
            lines.append(f"- {name}: steps served from the cache in the last call: {r['cached_steps']}")
        if r.get("http_overhead_s") is not None:
            lines.append(
                f"- {name}: HTTP p50 − bare p50 = {r['http_overhead_s'] * 1000:.0f} ms (encoding, HTTP, queue)"
            )
        if (r.get("vram_before_gib") or 0) > 0.5:
            lines.append(f"- {name}: started with {r['vram_before_gib']:.1f} GiB left by earlier scenarios")
    return lines


def checkpoint_line(info: dict[str, Any] | None, baseline: dict[str, Any] | None = None) -> str:
    """What the random weights cost, and whether building them in memory would beat loading them from disk."""
    if not info:
        return ""
    size = f"{info['bytes'] / GIB:.1f} GiB"
    if info.get("reused"):
        return f"Random checkpoint ({size}) reused from {info['path']}."
    line = (
        f"Random checkpoint ({size}): built on the device in {info['built_s']:.1f} s, saved to {info['path']} in "
        f"{info['saved_s']:.1f} s; each scenario loads it with load_pipeline (its load s)."
    )
    if baseline and baseline.get("load_s"):
        faster = "building in memory" if info["built_s"] < baseline["load_s"] else "loading from disk"
        line += (
            f" Per unquantized scenario: built in memory {info['built_s']:.1f} s vs loaded from disk "
            f"{baseline['load_s']:.1f} s (baseline): {faster} is faster here (quantized modes load through "
            "diffusers either way)."
        )
    return line


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# SD3.5 Large architecture, random weights: GPU benchmark",
        "",
        f"Synthetic weights (random, the real shapes). {results['machine']}",
        "",
        targets_line(),
        "",
    ]
    runs = results["runs"]
    for run in runs:
        s = run["settings"]
        lines += [
            f"## {run['started']} — window `{run['window']}`: {run['model']} ({run['dtype']}) on {run['device']}",
            "",
            f"`{run['command']}`",
            "",
            f"{s['size']}², {s['steps']} steps, output {s['output_format']}; sequential: {s['sequential']} requests "
            f"after an untimed priming round; concurrent: {s['clients']} clients × {s['per_client']} requests. "
            f"Targets judged: {'yes' if run['judged'] else 'no (' + run['not_judged_because'] + ')'}.",
            "",
            checkpoint_line(run.get("checkpoint"), run["scenarios"].get("baseline")),
            "",
            components_table(run["components"], run["dtype"]),
            "",
            serve_table(run, runs),
            "",
            *other_lines(run),
            "",
        ]
    return "\n".join([*lines, COLUMNS])


COLUMNS = """Columns: *mode*: the MEMORY_MODE the service resolved; *weights GiB*: the weights the loaded pipeline
holds, quantized ones at their stored size; *load s*: load_pipeline reading the random checkpoint and applying the knobs
(quantizing, for the quantized modes); *warm-up s*: from then until ready (one 1024² generation, and torch.compile's
compilation); *p50 s (HTTP)*: sequential n=1 requests end to end (encoding included); *p50 s (bare)*: the pipeline
call alone (denoising and VAE decode to a tensor); *img/s*: with the concurrent clients, whom the engine batches;
*GiB after load*: torch.cuda.memory_allocated once loaded; *peak GiB traffic*: max_memory_allocated during the
requests; *MAD vs baseline* / *PSNR dB*: fixed-seed images against baseline's (on random weights this is numeric
drift, not perceived quality).
"""


def save(results: dict[str, Any], stem: str, directories: list[Path]) -> list[Path]:
    """``<stem>.json`` and ``.md`` in every directory; returns the paths written."""
    written = []
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        md_path.write_text(markdown(results))
        written += [json_path, md_path]
    return written


def previous_runs(path: Path) -> list[dict[str, Any]]:
    """Runs already in the file (earlier windows the same day on the same device), so that they accumulate."""
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["runs"])
    except (ValueError, KeyError, TypeError):
        return []
