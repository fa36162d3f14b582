"""This tree against another revision, side by side (`make bench-against REV=<commit>`).

Both revisions are served at once by real ``bentoml serve`` processes with the
same packages (this environment's), the same tiny model and an API key, so
that authentication and every middleware are on the path. Rounds are
interleaved in alternating order, because these machines' speed drifts from
minute to minute:

1. One request at a time, 256², JPEG, 4 steps: end-to-end median, and each
   request's end to end minus its own pipeline call as the server timed it
   (what the code around the pipeline costs).
2. 16 concurrent clients at 256², 4 steps (batching, queueing, fairness):
   images/s and p50.

The other revision is checked out with ``git worktree`` in a temporary
directory and removed afterwards. Results go to
``bench/results/against-<date>.md`` with both commits and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import date
from pathlib import Path

import httpx

from bench.cpu import PROMPT, _post
from bench.harness import (
    ROOT,
    LoadResult,
    commit,
    load,
    load_average,
    machine,
    median_ms,
    serve_process,
    write_report,
)
from sd35.tiny import write_tiny_pipeline

KEY = "sk-bench-against"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A detached worktree of ``revision``, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", "--quiet", str(tree), revision)
        try:
            yield tree
        finally:
            _git("worktree", "remove", "--force", str(tree))


def sequential(urls: dict[str, str], rounds: int) -> list[str]:
    body = {"prompt": PROMPT, "size": "256x256", "output_format": "jpeg", "num_inference_steps": 4}
    end_to_end: dict[str, list[float]] = {name: [] for name in urls}
    around: dict[str, list[float]] = {name: [] for name in urls}
    with httpx.Client(timeout=120, headers=AUTH) as client:
        for i in range(rounds + 3):  # three warm-up rounds, not counted
            order = list(urls) if i % 2 == 0 else list(urls)[::-1]
            for name in order:
                seconds, generation, _ = _post(client, urls[name], {**body, "seed": i})
                if i >= 3:
                    end_to_end[name].append(seconds)
                    around[name].append(seconds - generation)
    lines = [
        f"## 1. One request at a time (256², jpeg, 4 steps, {rounds} interleaved rounds)",
        "",
        "| revision | end to end, median ms | min ms | end to end − its pipeline call, median ms |",
        "|---|---|---|---|",
    ]
    for name in urls:
        lines.append(
            f"| {name} | {median_ms(end_to_end[name]):.1f} | {min(end_to_end[name]) * 1000:.1f} | "
            f"{median_ms(around[name]):.1f} |"
        )
    this, other = list(urls)
    lines += [
        "",
        f"{this} − {other}: end to end **{median_ms(end_to_end[this]) - median_ms(end_to_end[other]):+.1f} ms**, "
        f"around the pipeline call **{median_ms(around[this]) - median_ms(around[other]):+.1f} ms** (medians).",
        "",
    ]
    return lines


def concurrent(urls: dict[str, str], rounds: int, requests: int) -> list[str]:
    body = {"prompt": PROMPT, "size": "256x256", "output_format": "jpeg", "num_inference_steps": 4}
    clients = 16
    results: dict[str, list[LoadResult]] = {name: [] for name in urls}
    for i in range(rounds):
        for name in list(urls) if i % 2 == 0 else list(urls)[::-1]:
            result = load(urls[name], body, clients, max(1, requests // clients), headers=AUTH)
            if result.statuses != {200: result.requests}:
                raise RuntimeError(f"{name}: not every request succeeded: {result.statuses}")
            results[name].append(result)
    lines = [
        f"## 2. {clients} concurrent clients (256², jpeg, 4 steps, {requests} requests a round, {rounds} rounds)",
        "",
        "| revision | images/s, median of rounds | p50 ms, median of rounds |",
        "|---|---|---|",
    ]
    ips = {name: statistics.median(r.images_per_second for r in results[name]) for name in urls}
    for name in urls:
        p50 = statistics.median(r.p50 for r in results[name]) * 1000
        lines.append(f"| {name} | {ips[name]:.1f} | {p50:.0f} |")
    this, other = list(urls)
    lines += ["", f"{this} / {other}: **{ips[this] / ips[other]:.2f}×** the images/s.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the commit, tag or branch to compare this tree against")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rounds", type=int, default=80, help="interleaved rounds of section 1")
    parser.add_argument("--load-rounds", type=int, default=4, help="rounds of section 2")
    parser.add_argument("--requests", type=int, default=64, help="requests per round in section 2")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by both servers
    other = _git("rev-parse", "--short", args.revision)
    this = commit()
    started = time.monotonic()
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        model_dir = write_tiny_pipeline(Path(tmp) / "tiny-sd3")
        env = {
            "MODEL_ID": str(model_dir),
            "API_KEY": KEY,
            "WARMUP": "false",
            "MAX_QUEUE_IMAGES": "256",
            "MAX_BATCH_IMAGES": "8",
            "LOG_LEVEL": "warning",
        }
        other_tree = stack.enter_context(checkout(other))
        other_label = other if other.startswith(args.revision) else f"{args.revision} ({other})"
        urls = {
            f"this tree ({this})": stack.enter_context(serve_process(env)),
            other_label: stack.enter_context(serve_process(env, tree=other_tree)),
        }
        report = [
            f"# This tree against {args.revision} — {date.today().isoformat()}",
            "",
            f"Machine: {machine()}",
            "",
            f"Load average (1/5/15 min) at the start: {load_at_start}. Both revisions served at once by "
            "`bentoml serve` with the same packages, the tiny model, `API_KEY` set, MAX_BATCH_IMAGES=8, "
            f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}.",
            "",
        ]
        for section in (sequential(urls, args.rounds), concurrent(urls, args.load_rounds, args.requests)):
            print("\n".join(section), flush=True)
            report += section
    report.append(
        f"Load average at the end: {load_average()}. Total time: {time.monotonic() - started:.0f} s; "
        f"command: `python -m bench.against {args.revision}`."
    )
    write_report(args.out, f"against-{date.today().isoformat()}.md", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
