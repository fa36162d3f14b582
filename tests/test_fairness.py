"""Fair queueing between API keys: the scheduler's invariants, then the engine's record of who each call served.

No wall clock here: orderings and shares are read from the queue and from the
engine's record of which keys each pipeline call served (the wall-clock view
is the real-server test and the benchmark).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Hashable
from contextvars import copy_context
from dataclasses import dataclass, field
from typing import Any

import pytest

from sd35.engine import GenerationEngine
from sd35.engine.fairness import FairQueue
from sd35.errors import QueueFullError, ValidationError
from sd35.logs import KEY_NAME
from tests.test_engine import _hold_worker, params, running_engine
from tests.test_engine import tiny_pipe as tiny_pipe  # the module-scoped fixture, shared


@dataclass(eq=False)
class Req:
    key: str
    images: int = 1
    cost: float = 1.0
    batch_key: Hashable = "same"
    label: str = field(default="")


def keys_of(batch: list[Req]) -> list[str]:
    return [job.key for job in batch]


def test_a_lone_key_gets_full_batches_whatever_its_weight() -> None:
    queue: FairQueue[Req] = FairQueue(weight=lambda key: 0.01)
    for _ in range(20):
        queue.push(Req("solo"))
    assert [len(queue.pop_batch(8)) for _ in range(3)] == [8, 8, 4]
    assert not queue and queue.pop_batch(8) == []


def test_a_key_sending_one_request_is_served_next_not_after_the_flood() -> None:
    queue: FairQueue[Req] = FairQueue()
    for _ in range(12):
        queue.push(Req("flood", images=4, cost=4))
    assert keys_of(queue.pop_batch(8)) == ["flood", "flood"]
    queue.push(Req("chat"))
    # the flood has been served more than the newcomer: it waits for its own turn rather than ride along
    assert keys_of(queue.pop_batch(8)) == ["chat"]
    assert keys_of(queue.pop_batch(8)) == ["flood", "flood"]


def test_keys_served_alike_share_a_call() -> None:
    queue: FairQueue[Req] = FairQueue()
    for _ in range(4):
        queue.push(Req("a", images=2, cost=2))
        queue.push(Req("b", images=2, cost=2))
    assert keys_of(queue.pop_batch(8)) == ["a", "b", "a", "b"]
    assert queue.counters() == {"a": 4, "b": 4}


def test_fifo_serves_in_arrival_order() -> None:
    queue: FairQueue[Req] = FairQueue(fair=False)
    for _ in range(6):
        queue.push(Req("flood", images=4, cost=4))
    queue.push(Req("chat"))
    calls = [keys_of(queue.pop_batch(8)) for _ in range(4)]
    assert calls == [["flood", "flood"], ["flood", "flood"], ["flood", "flood"], ["chat"]]


@pytest.mark.parametrize(("weights", "expected"), [((1, 1), (20, 20)), ((1, 3), (10, 30)), ((2, 1), (27, 13))])
def test_weights_set_the_shares_of_backlogged_keys(weights: tuple[float, float], expected: tuple[int, int]) -> None:
    weight = dict(zip("ab", weights, strict=True))
    queue: FairQueue[Req] = FairQueue(weight=weight.__getitem__)
    for _ in range(100):
        queue.push(Req("a"))
        queue.push(Req("b"))
    served = Counter(job.key for _ in range(40) for job in queue.pop_batch(1))
    assert abs(served["a"] - expected[0]) <= 1 and abs(served["b"] - expected[1]) <= 1, served


def test_weights_hold_inside_a_shared_batch() -> None:
    queue: FairQueue[Req] = FairQueue(weight={"a": 1, "b": 3}.__getitem__)
    for _ in range(20):
        queue.push(Req("a"))
        queue.push(Req("b"))
    batch = queue.pop_batch(8)
    assert Counter(keys_of(batch)) == {"a": 2, "b": 6}


@pytest.mark.parametrize("seed", range(5))
def test_service_gap_between_backlogged_keys_stays_within_twice_one_calls_share(seed: int) -> None:
    """VTC's bound: while both keys are backlogged, their weighted service differs by at most about twice the
    largest charge of one dispatch. A call takes a whole request from one key, then fills up with requests of the
    same batch key, so here one dispatch is what one call serves one key (up to MAX_BATCH_IMAGES of its images)."""
    rng = random.Random(seed)
    weights = {"a": rng.choice([0.5, 1, 2]), "b": rng.choice([0.5, 1, 3])}
    queue: FairQueue[Req] = FairQueue(weight=weights.__getitem__)
    largest = 0.0
    served = {"a": 0.0, "b": 0.0}
    for _ in range(300):
        for key in "ab":
            while queue.requests_of(key) < 3:
                size = rng.choice([1, 2, 4])
                queue.push(Req(key, images=size, cost=size * rng.choice([1, 4, 8]), batch_key=rng.choice("xy")))
        charged = {"a": 0.0, "b": 0.0}
        for job in queue.pop_batch(8):
            charged[job.key] += job.cost / weights[job.key]
        largest = max(largest, *charged.values())
        served = {key: served[key] + charged[key] for key in served}
        assert abs(served["a"] - served["b"]) <= 2 * largest + 1e-9, (served, largest)


def test_an_idle_key_earns_no_credit_for_a_later_burst() -> None:
    queue: FairQueue[Req] = FairQueue()
    for _ in range(50):
        queue.push(Req("busy"))
    for _ in range(50):
        queue.pop_batch(1)
    # "quiet" now sends a burst after idling while "busy" had the GPU to itself
    for _ in range(50):
        queue.push(Req("busy"))
        queue.push(Req("quiet"))
    first_ten = keys_of([job for _ in range(10) for job in queue.pop_batch(1)])
    assert Counter(first_ten) == {"busy": 5, "quiet": 5}, first_ten


def test_incompatible_requests_are_not_merged_and_nothing_is_lost() -> None:
    queue: FairQueue[Req] = FairQueue()
    jobs = [Req(key, batch_key=shape) for key in "ab" for shape in ("64x64", "128x128", "64x64")]
    for job in jobs:
        queue.push(job)
    calls = []
    while queue:
        batch = queue.pop_batch(8)
        assert len({job.batch_key for job in batch}) == 1
        calls.append(batch)
    assert sorted(map(id, (job for batch in calls for job in batch))) == sorted(map(id, jobs))
    assert queue.images == 0 and queue.keys() == []


def test_remove_and_drain_keep_the_counts() -> None:
    queue: FairQueue[Req] = FairQueue()
    jobs = [Req("a", images=2), Req("b", images=3), Req("a", images=1)]
    for job in jobs:
        queue.push(job)
    assert (queue.images, queue.images_of("a"), queue.images_of("b"), queue.requests_of("a")) == (6, 3, 3, 2)
    assert queue.remove(jobs[0]) and not queue.remove(jobs[0])
    assert (queue.images, queue.images_of("a")) == (4, 1)
    assert queue.drain() == [jobs[1], jobs[2]]
    assert queue.images == 0 and not queue


# --- through the engine: the record of which keys each pipeline call served -----------------


class Shares:
    """A queue policy for tests: weights and per-key limits by key name."""

    def __init__(self, weights: dict[str, float] | None = None, limits: dict[str, int] | None = None) -> None:
        self.weights = weights or {}
        self.limits = limits or {}

    def weight(self, key: str) -> float:
        return self.weights.get(key, 1.0)

    def queue_limit(self, key: str) -> int:
        return self.limits.get(key, 64)


def submit_as(engine: GenerationEngine, key: str, request: Any) -> Any:
    """Submit as the API key ``key`` would: its name in the request's context, as the auth middleware sets it."""

    def submit() -> Any:
        KEY_NAME.set(key)
        return engine.submit(request)

    return copy_context().run(submit)


async def _flood_and_trickle(engine: GenerationEngine) -> list[tuple[tuple[str, int], ...]]:
    blocker = await _hold_worker(engine)
    jobs = [submit_as(engine, "batch-job", params(seed, n=4)) for seed in range(6)]
    jobs.append(submit_as(engine, "chat", params(99)))
    engine.pipeline.gate.set()
    await blocker
    await asyncio.gather(*(engine.result(job) for job in jobs))
    return list(engine.served)[1:]  # after the blocker's call


def test_engine_serves_the_trickle_key_in_the_next_call(tiny_pipe: Any) -> None:
    with running_engine(tiny_pipe, max_batch_images=8) as engine:
        calls = asyncio.run(_flood_and_trickle(engine))
    # both keys were equal when they queued: the first call serves each, and the rest of the flood follows
    assert ("chat", 1) in calls[0], calls
    assert sum(images for call in calls for key, images in call if key == "batch-job") == 24


def test_engine_under_fifo_serves_the_trickle_key_last(tiny_pipe: Any) -> None:
    with running_engine(tiny_pipe, max_batch_images=8, queue_policy="fifo") as engine:
        calls = asyncio.run(_flood_and_trickle(engine))
    assert ("chat", 1) in calls[-1] and all(("chat", 1) not in call for call in calls[:-1]), calls


def test_engine_weights_split_each_call(tiny_pipe: Any) -> None:
    async def scenario(engine: GenerationEngine) -> list:
        blocker = await _hold_worker(engine)
        jobs = [submit_as(engine, key, params(seed)) for seed in range(8) for key in ("light", "heavy")]
        engine.pipeline.gate.set()
        await blocker
        await asyncio.gather(*(engine.result(job) for job in jobs))
        return list(engine.served)[1:]

    with running_engine(tiny_pipe, Shares(weights={"light": 1, "heavy": 3}), max_batch_images=4) as engine:
        calls = asyncio.run(scenario(engine))
    # while both keys wait, every call of 4 serves heavy 3 images for light's 1
    for call in calls[:2]:
        assert Counter(key for key, _ in call) == {"heavy": 3, "light": 1}, calls


def test_per_key_queue_limit_refuses_one_key_not_the_others(tiny_pipe: Any) -> None:
    async def scenario(engine: GenerationEngine) -> None:
        blocker = await _hold_worker(engine)
        queued = [submit_as(engine, "greedy", params(seed, n=2)) for seed in range(2)]
        with pytest.raises(QueueFullError) as refused:
            submit_as(engine, "greedy", params(5))
        assert refused.value.code == "queue_full" and refused.value.retry_after
        assert "at most 4 queued" in refused.value.message
        with pytest.raises(ValidationError) as never:
            submit_as(engine, "greedy", params(6, n=5))
        assert never.value.param == "n"
        polite = submit_as(engine, "polite", params(7, n=3))
        line = {queue.key: queue for queue in engine.queues()}
        assert (line["greedy"].queued_images, line["polite"].queued_images) == (4, 3)
        assert line["greedy"].max_queue_images == 4
        engine.pipeline.gate.set()
        await blocker
        await asyncio.gather(*(engine.result(job) for job in [*queued, polite]))

    with running_engine(tiny_pipe, Shares(limits={"greedy": 4}), max_queue_images=16) as engine:
        asyncio.run(scenario(engine))
