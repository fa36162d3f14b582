"""``python -m bench.gpu``: run a window (or named scenarios) and write the results after every scenario."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import harness
from bench.gpu import checkpoint, report
from bench.gpu.arch import (
    ARCH_NAME,
    DEFAULT_ARCH,
    ROOT,
    components_table,
    describe,
    load_arch,
    memory_modes_table,
    tiny_arch,
)
from bench.gpu.measure import Context, run_scenario
from bench.gpu.scenarios import SCENARIOS, WINDOWS
from sd35.engine.loading import resolve_device

PROMPT = "an astronaut riding a horse on the moon, photograph"
DEFAULT_OUT = ROOT / "bench" / "results"
REHEARSAL_OUT = ROOT / "build" / "gpu-results"

# A window on an H100 must end within 8 minutes: 10 sequential requests give a
# steady median at ~0.3 s each, 16 clients × 3 keep the batch full for ~10 s.
FULL_DEFAULTS = {"size": 1024, "sequential": 10, "clients": 16, "per_client": 3, "quality_seeds": 2, "batch_images": 8}
QUICK_DEFAULTS = {"size": 256, "sequential": 3, "clients": 2, "per_client": 2, "quality_seeds": 2, "batch_images": 4}
REHEARSAL_DEFAULTS = {**QUICK_DEFAULTS, "clients": 4}


def log(message: str) -> None:
    print(message, flush=True)


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description="Benchmark the sd35 service on the full-size SD3.5 Large architecture with random weights.",
    )
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument(
        "--window",
        choices=WINDOWS,
        help="a group of scenarios sized to ≤ 8 minutes on an H100 (default: first); "
        + "; ".join(f"{name}: {', '.join(names)}" for name, names in WINDOWS.items()),
    )
    choose.add_argument("--scenarios", help=f"comma-separated, run in this order: {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="the window on this machine's CPU at reduced model size, written to build/gpu-results/rehearsal.*",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (sd35.tiny's sizes): runs on a CPU")
    parser.add_argument("--quick", action="store_true", help="256² images and few requests (explicit options win)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024; --quick 256)")
    parser.add_argument("--steps", type=int, default=report.TARGET_STEPS, help="denoising steps (default 4)")
    parser.add_argument("--sequential", type=int, help="timed sequential n=1 requests (default 10; --quick 3)")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 16; --quick 2)")
    parser.add_argument("--per-client", type=int, help="requests per concurrent client (default 3; --quick 2)")
    parser.add_argument("--batch-images", type=int, help="images in the batching scenario's batch (default 8)")
    parser.add_argument("--quality-seeds", type=int, help="fixed-seed images compared with baseline's (default 2)")
    parser.add_argument("--output-format", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--device", default=None, help="DEVICE for the service (default auto; --rehearse cpu)")
    parser.add_argument(
        "--env",
        type=env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra service variable for every scenario (e.g. MAX_BATCH_IMAGES=16); repeatable",
    )
    parser.add_argument("--log-level", default="WARNING", help="the service's LOG_LEVEL (default WARNING)")
    parser.add_argument("--arch", type=Path, default=DEFAULT_ARCH, help="the published component configurations")
    parser.add_argument("--out", type=Path, help="directory for the .json and .md results (default bench/results)")
    parser.add_argument("--mirror", type=Path, action="append", default=[], help="write a copy here too; repeatable")
    parser.add_argument("--stem", help="results file name without suffix (default gpu-<date>-<device>)")
    parser.add_argument(
        "--deadline",
        type=float,
        help="a time (seconds since the epoch) after which no scenario may end: one that the longest so far says "
        "would end later is skipped, with why",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="where the random checkpoint is saved and reused (default: a folder in the temp directory)",
    )
    parser.add_argument(
        "--describe",
        action="store_true",
        help="only print the parameter counts and every memory mode's weights and fits, then exit",
    )
    args = parser.parse_args(argv)
    if args.rehearse:
        args.tiny = True
        args.device = args.device or "cpu"
        args.out = args.out or REHEARSAL_OUT
        args.stem = args.stem or "rehearsal"
    defaults = REHEARSAL_DEFAULTS if args.rehearse else QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = args.device or "auto"
    args.out = args.out or DEFAULT_OUT
    if args.scenarios:
        names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
        unknown = [name for name in names if name not in SCENARIOS]
        if unknown or not names:
            parser.error(f"unknown scenario(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SCENARIOS)}")
        args.window = "custom"
    else:
        args.window = args.window or "first"
        names = list(WINDOWS[args.window])
    args.scenario_names = names
    if not args.arch.is_file():
        parser.error(f"no architecture file at {args.arch}; pass --arch PATH to {ARCH_NAME}")
    return args


def device_kind(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    published = load_arch(args.arch)
    arch = tiny_arch(published) if args.tiny else published
    model_id = "random-sd3.5-large-tiny" if args.tiny else "random-sd3.5-large"
    device = resolve_device(args.device)
    # The run's dtype is load_pipeline's; --describe reports bf16, the GPU's, on any machine.
    dtype = torch.bfloat16 if device.startswith("cuda") or args.describe else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    components = describe(arch, dtype)
    log(f"{model_id} ({dtype_name}), from {args.arch}:\n{components_table(components, dtype_name)}")
    if args.describe:
        log("\nMemory modes (weights computed from the architecture):\n" + memory_modes_table(arch))
        return 0

    capability = torch.cuda.get_device_capability(device) if device.startswith("cuda") else None
    folder = args.checkpoint or Path(tempfile.gettempdir()) / f"sd35-{model_id}-{dtype_name}"
    log(f"random checkpoint in {folder} ...")
    prepared = checkpoint.prepare(arch, folder, device, dtype)
    log(report.checkpoint_line(prepared))

    reasons = []
    if args.tiny:
        reasons.append("tiny shapes")
    if not device.startswith("cuda"):
        reasons.append(f"device {device}")
    if (args.size, args.steps, args.clients) != (report.TARGET_SIZE, report.TARGET_STEPS, report.TARGET_CLIENTS):
        reasons.append(f"{args.size}², {args.steps} steps, {args.clients} clients")
    started = dt.datetime.now().astimezone()
    stem = args.stem or f"gpu-{started.date().isoformat()}-{device_kind(device)}{'-tiny' if args.tiny else ''}"
    results: dict[str, Any] = {
        "synthetic": True,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "machine": harness.machine(),
        "runs": report.previous_runs(args.out / f"{stem}.json"),
    }
    run: dict[str, Any] = {
        "window": args.window,
        "started": started.isoformat(timespec="seconds"),
        "command": "python -m bench.gpu " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": device,
        "model": model_id,
        "dtype": dtype_name,
        "settings": {
            "size": args.size,
            "steps": args.steps,
            "sequential": args.sequential,
            "clients": args.clients,
            "per_client": args.per_client,
            "output_format": args.output_format,
            "env": dict(args.env),
        },
        "judged": not reasons,
        "not_judged_because": ", ".join(reasons),
        "components": components,
        "checkpoint": prepared,
        "scenarios": {},
    }
    results["runs"].append(run)
    context = Context(
        args=args,
        checkpoint=folder,
        device=device,
        capability=capability,
        full_arch=published,
        references=checkpoint.References(folder, args.size, args.steps, args.quality_seeds),
    )
    log(f"{results['machine']}\n{report.targets_line()}")
    longest = 0.0
    for index, name in enumerate(args.scenario_names, 1):
        scenario = SCENARIOS[name]
        if args.deadline is not None and time.time() + longest > args.deadline:
            result = {"scenario": name, "about": scenario.about, "kind": scenario.kind, "status": "skipped"}
            result["skipped"] = (
                f"out of window time: {args.deadline - time.time():.0f} s left, and the longest scenario so far "
                f"took {longest:.0f} s"
            )
        else:
            log(f"[{index}/{len(args.scenario_names)}] {name}: {scenario.about}")
            result = run_scenario(scenario, context)
            longest = max(longest, result["seconds"])
        result["targets"] = report.judge(result, run["judged"])
        run["scenarios"][name] = result
        written = report.save(results, stem, [args.out, *args.mirror])
        log(f"[{index}/{len(args.scenario_names)}] {name}: {summary(result)}")
    log("\n" + report.serve_table(run, results["runs"]))
    for line in report.other_lines(run):
        log(line)
    log(f"\nwrote {', '.join(str(path) for path in written)}")
    failed = [name for name, result in run["scenarios"].items() if result["status"] == "failed"]
    if failed:
        log(f"failed: {', '.join(failed)} (the error of each is in the results)")
    return 1 if failed else 0


def summary(result: dict[str, Any]) -> str:
    if result["status"] == "skipped":
        return f"skipped: {result['skipped']}"
    if result["status"] == "failed":
        return f"FAILED: {result['error']}"
    parts = [f"{result.get('seconds', 0):.0f} s"]
    if result.get("p50_s") is not None:
        parts.append(f"p50 {result['p50_s']:.3f} s")
    if result.get("bare_p50_s") is not None:
        parts.append(f"bare p50 {result['bare_p50_s']:.3f} s")
    if result.get("images_per_second") is not None:
        parts.append(f"{result['images_per_second']:.2f} images/s")
    if result.get("auto_mode"):
        parts.append(f"auto picks {result['auto_mode']}")
    for dtype, diff in result.get("by_dtype", {}).items():
        parts.append(f"{dtype}: batched vs alone ≤ {diff['max_abs']}/255")
    return ", ".join(parts)
