"""Sharing the GPU fairly between API keys: one queue per key, served by virtual counters (VTC).

Each key (a *flow*) has its own first-in first-out queue and a counter of the
weighted service it has received: every request the GPU takes adds
``cost / weight`` to its key's counter, where cost ≈ images × steps × pixels
(see :meth:`GenerationParams.cost`). The next pipeline call starts with the
oldest request of the backlogged key whose counter is lowest, so a key sending
one request at a time is served next rather than after another key's flood,
and two backlogged keys receive service in the ratio of their weights, never
apart by more than about one request's cost (VTC, "Fairness in Serving Large
Language Models", OSDI '24).

- A key that becomes backlogged starts no lower than the *virtual time*, the
  counter the last served key had when it was chosen: idling earns no credit
  to spend later in a burst, and a newcomer is served before keys that have
  been served since.
- Work-conserving: whenever anything is queued the worker takes it, so a lone
  key gets the whole GPU whatever its weight.
- Batching stays: the call is filled with requests of the same batch key from
  any key that has not received more than the key whose turn it is, each
  chosen the same way (lowest counter first) and charged to its own key; a key
  already ahead waits for its own turn rather than ride along, which keeps the
  bound whatever the batch keys.

``fair=False`` puts every request in one flow: plain first-in first-out, as
before (``QUEUE_POLICY=fifo``, for comparison).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the queue needs of a request."""

    @property
    def key(self) -> str: ...  # the API key's name

    @property
    def images(self) -> int: ...

    @property
    def cost(self) -> float: ...

    @property
    def batch_key(self) -> Hashable: ...


J = TypeVar("J", bound=Queued)


class QueuePolicy(Protocol):
    """Per key: the share of the GPU under contention, and how many images it may have queued."""

    def weight(self, key: str) -> float: ...

    def queue_limit(self, key: str) -> int: ...


@dataclass(frozen=True)
class EqualShares:
    """Every key weighs the same and may fill the whole queue (no keys file)."""

    max_queue_images: int

    def weight(self, key: str) -> float:
        return 1.0

    def queue_limit(self, key: str) -> int:
        return self.max_queue_images


@dataclass
class _Flow(Generic[J]):
    # (arrival number, request), oldest first
    jobs: deque[tuple[int, J]] = field(default_factory=deque)
    counter: float = 0.0


class FairQueue(Generic[J]):
    """The engine's queue; not thread-safe (the engine holds its lock around every call)."""

    def __init__(self, weight: Callable[[str], float] = lambda key: 1.0, fair: bool = True) -> None:
        self._weight = weight
        self.fair = fair
        self._flows: dict[str, _Flow[J]] = {}
        self._arrivals = itertools.count()
        self._virtual_time = 0.0
        self.images = 0
        self._images_by_key: dict[str, int] = {}
        self._requests_by_key: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(self._requests_by_key.values())

    def __bool__(self) -> bool:
        return bool(self._requests_by_key)

    def images_of(self, key: str) -> int:
        return self._images_by_key.get(key, 0)

    def requests_of(self, key: str) -> int:
        return self._requests_by_key.get(key, 0)

    def keys(self) -> list[str]:
        """Keys with something queued."""
        return [key for key, count in self._requests_by_key.items() if count]

    def counters(self) -> dict[str, float]:
        """Each flow's weighted service so far (for tests and the benchmark)."""
        return {name: flow.counter for name, flow in self._flows.items()}

    def _flow_name(self, job: J) -> str:
        return job.key if self.fair else ""

    def push(self, job: J) -> None:
        name = self._flow_name(job)
        flow = self._flows.get(name)
        if flow is None:
            flow = self._flows[name] = _Flow()
        if not flow.jobs:
            flow.counter = max(flow.counter, self._virtual_time)
        flow.jobs.append((next(self._arrivals), job))
        self._count(job, +1)

    def remove(self, job: J) -> bool:
        """Take out a request that is still queued (its client gave up); False if it is not here."""
        flow = self._flows.get(self._flow_name(job))
        if flow is None:
            return False
        for entry in flow.jobs:
            if entry[1] is job:
                flow.jobs.remove(entry)
                self._count(job, -1)
                return True
        return False

    def drain(self) -> list[J]:
        """Everything queued, oldest first; the queue is empty afterwards."""
        entries = sorted((entry for flow in self._flows.values() for entry in flow.jobs), key=lambda entry: entry[0])
        for flow in self._flows.values():
            flow.jobs.clear()
        for _, job in entries:
            self._count(job, -1)
        return [job for _, job in entries]

    def pop_batch(self, max_images: int) -> list[J]:
        """The requests of the next pipeline call: the head of the least-served key's queue, then, while
        images fit, requests of the same batch key, each from the least-served key that has one and has not
        received more service than the key whose turn it is (counted with what this call gives it)."""
        backlogged = [flow for flow in self._flows.values() if flow.jobs]
        if not backlogged:
            return []
        head = min(backlogged, key=lambda flow: (flow.counter, flow.jobs[0][0]))
        self._virtual_time = max(self._virtual_time, head.counter)
        _, first = head.jobs.popleft()
        self._charge(head, first)
        batch, images = [first], first.images
        while images < max_images:
            best: tuple[float, int, _Flow[J], tuple[int, J]] | None = None
            for flow in backlogged:
                if flow is not head and flow.counter > head.counter:
                    continue  # ahead of the key whose turn it is: riding along would be served out of turn
                entry = next(self._compatible(flow, first.batch_key, max_images - images), None)
                if entry is not None and (best is None or (flow.counter, entry[0]) < best[:2]):
                    best = (flow.counter, entry[0], flow, entry)
            if best is None:
                break
            flow, entry = best[2], best[3]
            flow.jobs.remove(entry)
            self._charge(flow, entry[1])
            batch.append(entry[1])
            images += entry[1].images
        self._forget_idle()
        return batch

    @staticmethod
    def _compatible(flow: _Flow[J], batch_key: Hashable, room: int) -> Iterator[tuple[int, J]]:
        return (entry for entry in flow.jobs if entry[1].batch_key == batch_key and entry[1].images <= room)

    def _charge(self, flow: _Flow[J], job: J) -> None:
        flow.counter += job.cost / self._weight(job.key)
        self._count(job, -1)

    def _count(self, job: J, sign: int) -> None:
        self.images += sign * job.images
        self._images_by_key[job.key] = self._images_by_key.get(job.key, 0) + sign * job.images
        self._requests_by_key[job.key] = self._requests_by_key.get(job.key, 0) + sign
        if not self._requests_by_key[job.key]:
            del self._requests_by_key[job.key], self._images_by_key[job.key]

    def _forget_idle(self) -> None:
        """An idle flow at or below the virtual time would start from it anyway: drop it (bounded memory)."""
        idle = [name for name, flow in self._flows.items() if not flow.jobs and flow.counter <= self._virtual_time]
        for name in idle:
            del self._flows[name]
