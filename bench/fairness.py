"""Flood and trickle: one API key floods the GPU, another sends one image at a time — FIFO vs fair queueing.

The scenario of issue 21: ``--flood-clients`` clients of the key ``batch-job``
send ``--flood-n``-image requests back to back, while one client of the key
``chat`` sends single images one after the other. Measured per policy
(``QUEUE_POLICY=fifo`` and ``fair``, two ``bentoml serve`` processes up at once,
scenarios in alternating order):

- the chat key's median latency alone on the idle server (its solo latency),
- its median latency under the flood, and that as a multiple of its solo one,
- the flood's median latency, and images/s of the whole server during the flood
  (fairness must cost no throughput).

The model is the tiny random SD3 pipeline on CPU (or ``--model DIR`` for any
diffusers directory, on whatever device the server picks). Results go to
``bench/results/fairness-<date>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx

from bench.harness import commit, load_average, machine, serve_process, write_report
from sd35.tiny import write_tiny_pipeline

FLOOD_KEY = "sk-bench-batch-job"
CHAT_KEY = "sk-bench-chat"
KEYS_FILE = f"""\
[keys.batch-job]
key = "{FLOOD_KEY}"

[keys.chat]
key = "{CHAT_KEY}"
"""


@dataclass
class Outcome:
    chat_solo: list[float] = field(default_factory=list)
    chat: list[float] = field(default_factory=list)
    flood: list[float] = field(default_factory=list)
    flood_images: int = 0
    seconds: float = 0.0
    refused: int = 0

    @property
    def images_per_second(self) -> float:
        return (self.flood_images + len(self.chat)) / self.seconds if self.seconds else 0.0


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _post(http: httpx.AsyncClient, body: dict, key: str) -> tuple[float, int]:
    started = time.perf_counter()
    response = await http.post("/v1/images/generations", json=body, headers=_auth(key))
    return time.perf_counter() - started, response.status_code


async def solo(url: str, body: dict, requests: int, outcome: Outcome) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for index in range(requests):
            seconds, status = await _post(http, {**body, "seed": index}, CHAT_KEY)
            assert status == 200, status
            outcome.chat_solo.append(seconds)


async def flood_and_trickle(url: str, body: dict, args: argparse.Namespace, outcome: Outcome) -> None:
    stop = asyncio.Event()
    warmed = asyncio.Event()
    flood_limits = httpx.Limits(max_connections=args.flood_clients)

    async def flooder(index: int, http: httpx.AsyncClient) -> None:
        seed = index * 100_000
        while not stop.is_set():
            seed += 1
            seconds, status = await _post(http, {**body, "n": args.flood_n, "seed": seed}, FLOOD_KEY)
            if status != 200:
                outcome.refused += 1
                continue
            if warmed.is_set() and not stop.is_set():
                outcome.flood.append(seconds)
                outcome.flood_images += args.flood_n
            warmed.set()

    async def chatter() -> None:
        await warmed.wait()  # the flood's first requests are through: its queue is full from here on
        started = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for index in range(args.chat_requests):
                seconds, status = await _post(http, {**body, "seed": 50_000 + index}, CHAT_KEY)
                assert status == 200, status
                outcome.chat.append(seconds)
        outcome.seconds = time.perf_counter() - started
        stop.set()

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=flood_limits) as http:
        await asyncio.gather(chatter(), *(flooder(index, http) for index in range(args.flood_clients)))


def _ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def report_rows(outcomes: dict[str, Outcome]) -> list[str]:
    rows = [
        "| policy | chat alone p50 | chat under the flood p50 | × alone | flood p50 | chat p50 / flood p50 "
        "| images/s (all keys) | 429s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for policy, outcome in outcomes.items():
        alone, chat, flood = _ms(outcome.chat_solo), _ms(outcome.chat), _ms(outcome.flood)
        rows.append(
            f"| {policy} | {alone:.0f} ms | {chat:.0f} ms | {chat / alone:.1f}× | {flood:.0f} ms | "
            f"{chat / flood:.2f} | {outcome.images_per_second:.1f} | {outcome.refused} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", type=Path, help="a diffusers directory (default: the tiny model, built here)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--flood-clients", type=int, default=12)
    parser.add_argument("--flood-n", type=int, default=4)
    parser.add_argument("--chat-requests", type=int, default=20, help="chat requests per round under the flood")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-images", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.chat_requests, args.rounds, args.flood_clients = 5, 1, 4
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/cpu.py: spinning threads turn load into jitter
    body = {"prompt": "a lighthouse at dawn", "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps}
    started = time.monotonic()
    report = [f"# Fair queueing benchmark — {date.today().isoformat()}", "", f"Machine: {machine()}", ""]
    report += [
        f"Commit: {commit()}. Load average (1/5/15 min) at the start: {load_average()}. "
        f"Scenario: {args.flood_clients} clients of key `batch-job` sending n={args.flood_n} back to back; one client "
        f"of key `chat` sending n=1, {args.chat_requests} requests one after the other per round; "
        f"{args.size}², {args.steps} steps, MAX_BATCH_IMAGES={args.max_batch_images}; {args.rounds} rounds, "
        "FIFO and fair in alternating order. Latencies are medians over all rounds.",
        "",
    ]
    outcomes = {"fifo": Outcome(), "fair": Outcome()}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        model_dir = args.model or write_tiny_pipeline(Path(tmp) / "tiny-sd3")
        keys_file = Path(tmp) / "keys.toml"
        keys_file.write_text(KEYS_FILE)
        env = {
            "MODEL_ID": str(model_dir),
            "API_KEYS_FILE": str(keys_file),
            "WARMUP": "false",
            "LOG_LEVEL": "warning",
            # room for the whole flood in both queues (the per-key limit is half of this by default)
            "MAX_QUEUE_IMAGES": str(4 * args.flood_clients * args.flood_n),
            "MAX_BATCH_IMAGES": str(args.max_batch_images),
        }
        urls = {policy: stack.enter_context(serve_process({**env, "QUEUE_POLICY": policy})) for policy in outcomes}
        for round_index in range(args.rounds):
            order = list(outcomes) if round_index % 2 == 0 else list(reversed(outcomes))
            for policy in order:
                asyncio.run(solo(urls[policy], body, max(3, args.chat_requests // 2), outcomes[policy]))
                asyncio.run(flood_and_trickle(urls[policy], body, args, outcomes[policy]))
                print(f"round {round_index + 1}, {policy}: done", flush=True)
    rows = report_rows(outcomes)
    print("\n".join(rows))
    report += rows
    report += [
        "",
        f"Load average at the end: {load_average()}. Total benchmark time: {time.monotonic() - started:.0f} s; "
        f"command: `python -m bench.fairness{' --quick' if args.quick else ''}`.",
    ]
    write_report(args.out, f"fairness-{date.today().isoformat()}{'-quick' if args.quick else ''}.md", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
