"""The generation engine's invariants: batching is invisible, failures stay local, one call at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sd35.config import Settings
from sd35.engine import GenerationEngine, GenerationParams
from sd35.errors import (
    GenerationFailedError,
    GPUOutOfMemoryError,
    QueueFullError,
    RequestTimeoutError,
    ValidationError,
)


class InstrumentedPipeline:
    """The real pipeline, plus: a gate to hold the worker, fault injection, and an overlap detector."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        self.fail_on: dict[str, BaseException] = {}

    def __call__(self, **kwargs: Any) -> Any:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.entered.set()
            assert self.gate.wait(30)
            time.sleep(0.01)  # widen the window in which an overlapping call would be seen
            self.calls.append(list(kwargs["prompt"]))
            for word, error in self.fail_on.items():
                if any(word in prompt for prompt in kwargs["prompt"]):
                    raise error
            return self.pipe(**kwargs)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir: Path) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def engine(tiny_pipe: Any) -> Iterator[GenerationEngine]:
    with running_engine(tiny_pipe) as started:
        yield started


@contextmanager
def running_engine(tiny_pipe: Any, policy: Any = None, **overrides: Any) -> Iterator[GenerationEngine]:
    overrides.setdefault("warmup", False)
    settings = Settings(model_id="tiny", **overrides)
    instrumented = InstrumentedPipeline(tiny_pipe)
    engine = GenerationEngine(settings, loader=lambda *_: (instrumented, "cpu"), policy=policy)
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield engine
    finally:
        instrumented.gate.set()
        engine.close()


def params(seed: int, prompt: str = "a lighthouse", n: int = 1, size: int = 64, steps: int = 2) -> GenerationParams:
    return GenerationParams(
        prompt=prompt, width=size, height=size, num_images=n, seed=seed, num_inference_steps=steps, guidance_scale=0.0
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _hold_worker(engine: GenerationEngine) -> asyncio.Task:
    """Occupy the worker with a blocker request so that the next ones queue up together."""
    pipe: InstrumentedPipeline = engine.pipeline
    pipe.gate.clear()
    pipe.entered.clear()
    blocker = asyncio.ensure_future(engine.generate(params(999, "blocker", size=128)))
    while not pipe.entered.is_set():
        await asyncio.sleep(0.005)
    return blocker


def test_batched_results_equal_solo_results(engine: GenerationEngine) -> None:
    requests = [params(seed=s, prompt=f"prompt {s}", n=1 + s % 2) for s in range(5)]

    async def solo() -> list:
        return [await engine.generate(p) for p in requests]

    async def batched() -> list:
        blocker = await _hold_worker(engine)
        tasks = [asyncio.ensure_future(engine.generate(p)) for p in requests]
        await asyncio.sleep(0.05)
        engine.pipeline.gate.set()
        await blocker
        return await asyncio.gather(*tasks)

    alone = run(solo())
    assert all(size == requests[i].num_images for i, size in enumerate(engine.batch_sizes))
    together = run(batched())
    assert max(engine.batch_sizes) == sum(p.num_images for p in requests), engine.batch_sizes
    for request, a, b in zip(requests, alone, together, strict=True):
        assert len(a) == len(b) == request.num_images
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape == (64, 64, 3)
            diff = np.abs(x.astype(int) - y.astype(int))
            assert diff.max() <= 1, "a batched image must be its solo image within ±1/255"
            assert (diff > 0).mean() <= 0.01
    # and the images really are per-request, not one image copied around
    assert np.abs(together[0][0].astype(int) - together[1][0].astype(int)).mean() > 1


def test_worker_never_runs_two_calls_at_once(engine: GenerationEngine) -> None:
    async def many() -> None:
        await asyncio.gather(*(engine.generate(params(s, size=64 + 16 * (s % 3))) for s in range(12)))

    run(many())
    assert engine.pipeline.max_active == 1
    assert len(engine.pipeline.calls) >= 3, "three sizes cannot share a call"


def test_incompatible_requests_are_not_merged(engine: GenerationEngine) -> None:
    async def mixed() -> list:
        blocker = await _hold_worker(engine)
        tasks = [
            asyncio.ensure_future(engine.generate(p))
            for p in (params(1, "a", size=64), params(2, "b", size=80), params(3, "c", steps=3), params(4, "d"))
        ]
        await asyncio.sleep(0.05)
        engine.pipeline.gate.set()
        await blocker
        return await asyncio.gather(*tasks)

    results = run(mixed())
    assert [r[0].shape[0] for r in results] == [64, 80, 64, 64]
    calls = engine.pipeline.calls[1:]
    assert sorted(calls) == sorted([["a", "d"], ["b"], ["c"]])


def test_batch_budget_is_respected(tiny_pipe: Any) -> None:
    async def burst(engine: GenerationEngine) -> None:
        blocker = await _hold_worker(engine)
        tasks = [asyncio.ensure_future(engine.generate(params(s, n=2))) for s in range(4)]
        await asyncio.sleep(0.05)
        engine.pipeline.gate.set()
        await blocker
        await asyncio.gather(*tasks)

    with running_engine(tiny_pipe, max_batch_images=3) as engine:
        run(burst(engine))
        assert max(list(engine.batch_sizes)[1:]) <= 3
        assert sum(list(engine.batch_sizes)[1:]) == 8


def test_a_failing_request_does_not_fail_its_neighbours(engine: GenerationEngine) -> None:
    engine.pipeline.fail_on["poison"] = RuntimeError("boom from inside the pipeline")

    async def batch() -> list:
        blocker = await _hold_worker(engine)
        tasks = [
            asyncio.ensure_future(engine.generate(params(s, prompt)))
            for s, prompt in enumerate(["good one", "poison pill", "good two"])
        ]
        await asyncio.sleep(0.05)
        engine.pipeline.gate.set()
        await blocker
        return await asyncio.gather(*tasks, return_exceptions=True)

    good_one, poisoned, good_two = run(batch())
    assert isinstance(poisoned, GenerationFailedError)
    assert "boom" not in poisoned.message, "internal error text must not reach clients"
    assert isinstance(good_one, list) and isinstance(good_two, list)
    assert ["good one", "poison pill", "good two"] in engine.pipeline.calls
    # the engine is still up
    assert len(run(engine.generate(params(7)))) == 1


def test_out_of_memory_is_reported_and_the_engine_recovers(engine: GenerationEngine) -> None:
    engine.pipeline.fail_on["huge"] = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
    with pytest.raises(GPUOutOfMemoryError, match="ran out of memory"):
        run(engine.generate(params(1, "huge")))
    assert len(run(engine.generate(params(1, "small")))) == 1


def test_queue_is_bounded(tiny_pipe: Any) -> None:
    async def flood(engine: GenerationEngine) -> None:
        blocker = await _hold_worker(engine)
        queued = [asyncio.ensure_future(engine.generate(params(s, n=2))) for s in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as refused:
            await engine.generate(params(9))
        assert refused.value.retry_after is not None and refused.value.retry_after > 0
        engine.pipeline.gate.set()
        await blocker
        await asyncio.gather(*queued)
        assert len(await engine.generate(params(9))) == 1, "room again once the queue drains"

    with running_engine(tiny_pipe, max_queue_images=4) as engine:
        run(flood(engine))
        with pytest.raises(ValidationError, match="MAX_QUEUE_IMAGES=4") as too_many:
            engine.submit(params(1, n=5))
        assert too_many.value.param == "n", "a request larger than the whole queue can never succeed: 400, not 429"


def test_timed_out_request_is_dropped_not_run(engine: GenerationEngine) -> None:
    async def scenario() -> None:
        blocker = await _hold_worker(engine)
        with pytest.raises(RequestTimeoutError, match="REQUEST_TIMEOUT"):
            await engine.generate(params(5, "abandoned"), timeout=0.05)
        engine.pipeline.gate.set()
        await blocker
        await engine.generate(params(6, "after"))

    run(scenario())
    flat = [prompt for call in engine.pipeline.calls for prompt in call]
    assert "abandoned" not in flat and "after" in flat


def test_requests_before_load_are_refused(tiny_pipe: Any) -> None:
    from sd35.errors import ModelNotLoadedError

    engine = GenerationEngine(Settings(model_id="tiny"), loader=lambda *_: (tiny_pipe, "cpu"))
    with pytest.raises(ModelNotLoadedError, match="loading"):
        engine.submit(params(1))


def test_close_waits_for_the_running_batch(tiny_pipe: Any) -> None:
    with running_engine(tiny_pipe) as engine:

        async def start_one() -> asyncio.Task:
            return await _hold_worker(engine)

        loop = asyncio.new_event_loop()
        blocker = loop.run_until_complete(start_one())
        threading.Timer(0.3, engine.pipeline.gate.set).start()
        started = time.monotonic()
        engine.close(wait_seconds=30)
        assert not engine._worker.is_alive(), "the worker finished its batch and stopped"
        assert time.monotonic() - started >= 0.25
        assert len(loop.run_until_complete(blocker)) == 1
        loop.close()


def test_the_workers_log_lines_name_the_keys_of_its_batch(engine: GenerationEngine) -> None:
    """Its lines carry the requests' ids and their keys' names (never ``key=-``), as the requests' own lines do."""
    import logging

    from sd35.logs import KEY_NAME, REQUEST_ID

    seen: list[tuple[str, str, str]] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:  # in the thread that logs, with its context
            seen.append((record.getMessage(), REQUEST_ID.get(), KEY_NAME.get()))

    async def failing() -> None:
        REQUEST_ID.set("req-1")
        KEY_NAME.set("alice")
        with pytest.raises(GenerationFailedError):
            await engine.generate(params(1, "boom"))

    logger = logging.getLogger("sd35.engine.worker")
    recorder = Recorder(logging.ERROR)
    logger.addHandler(recorder)
    engine.pipeline.fail_on["boom"] = RuntimeError("boom")
    try:
        run(failing())
    finally:
        logger.removeHandler(recorder)
    assert [(rid, key) for message, rid, key in seen if "generation failed" in message] == [("req-1", "alice")]
