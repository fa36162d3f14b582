"""The board that the workers of one server share for AUTOMATIC1111's global state, as two workers use it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from sd35.a1111.board import DATABASE_NAME, Board, shared_database
from sd35.a1111.serving import A1111Serving, _Run
from sd35.engine.worker import JobProgress
from sd35.logs import KEY_NAME


@pytest.fixture
def boards(tmp_path: Path) -> Iterator[tuple[Board, Board]]:
    first, second = Board(tmp_path / DATABASE_NAME, 1), Board(tmp_path / DATABASE_NAME, 2)
    yield first, second
    first.close()
    second.close()


def test_the_board_is_a_file_only_for_several_workers_of_a_multiprocess_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert shared_database(2) == tmp_path / DATABASE_NAME
    assert shared_database(1) is None
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert shared_database(2) is None
    alone = Board(None, 1)
    assert not alone.shared
    alone.set_checkpoint("alice", "neon")
    assert alone.checkpoint("alice") == "neon"


def test_a_checkpoint_set_by_one_worker_is_read_by_the_other_per_key(boards: tuple[Board, Board]) -> None:
    first, second = boards
    assert first.shared and second.checkpoint("alice") is None
    first.set_checkpoint("alice", "neon")
    first.set_checkpoint("alice", "tiny-sd3")
    first.set_checkpoint("bob", "neon")
    assert second.checkpoint("alice") == "tiny-sd3" and second.checkpoint("bob") == "neon"


def test_each_worker_reads_the_others_runs_of_a_key_while_they_are_fresh(boards: tuple[Board, Board]) -> None:
    first, second = boards
    run = {"kind": "txt2img", "states": [[1, 4, "running"]]}
    first.publish({"alice": [run], "bob": [run, run]})
    assert second.others("alice", fresh_within=5) == [run]
    assert len(second.others("bob", fresh_within=5)) == 2
    assert first.others("alice", fresh_within=5) == [], "a worker's own runs are its own to report"
    time.sleep(0.05)
    assert second.others("alice", fresh_within=0.01) == [], "a worker that stopped publishing is not believed"
    first.publish({"bob": [run]})
    assert second.others("alice", fresh_within=5) == [], "a run that ended is gone at the next publish"
    first.publish({})
    assert second.others("bob", fresh_within=5) == []


def test_commands_reach_the_other_workers_once_in_order(boards: tuple[Board, Board]) -> None:
    first, second = boards
    seen = second.last_command()
    first.post("alice", "skip")
    second.post("alice", "interrupt")
    first.post("bob", "interrupt")
    commands = second.commands_after(seen)
    assert [(c.worker, c.key, c.action) for c in commands] == [(1, "alice", "skip"), (1, "bob", "interrupt")]
    assert commands[0].at <= commands[1].at <= time.monotonic()
    assert second.commands_after(commands[-1].id) == []
    assert [c.action for c in first.commands_after(0)] == ["interrupt"], "the one the second worker posted"


def test_a_failing_board_costs_a_log_line_not_the_request(
    boards: tuple[Board, Board], caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = boards
    first.close()
    with caplog.at_level(logging.WARNING, logger="sd35.a1111.board"):
        first.publish({"alice": []})
        first.post("alice", "interrupt")
        assert first.others("alice", fresh_within=5) == []
        assert first.commands_after(0) == []
    assert [r.getMessage().split(" failed")[0] for r in caplog.records] == [
        "AUTOMATIC1111 board (publish)",
        "AUTOMATIC1111 board (post)",
        "AUTOMATIC1111 board (others)",
        "AUTOMATIC1111 board (commands_after)",
    ]


class _Engine:
    """The two calls of the engine that interrupt and skip use: where a job stands, and ending it early."""

    def __init__(self) -> None:
        self.states: dict[int, str] = {}
        self.ended: list[str] = []

    def progress(self, job: SimpleNamespace) -> JobProgress:
        return JobProgress(self.states[id(job)], 1, 4, 0.1, 1)

    def end_early(self, job: SimpleNamespace) -> bool:
        self.ended.append(job.name)
        return self.states[id(job)] == "queued"


def _worker(board: Board, engine: _Engine) -> A1111Serving:
    return A1111Serving(SimpleNamespace(settings=None, engine=engine), board)  # type: ignore[arg-type]


def _job(engine: _Engine, name: str, state: str, started: float | None) -> SimpleNamespace:
    job = SimpleNamespace(name=name, started=started)
    engine.states[id(job)] = state
    return job


def _run_of(jobs: list[SimpleNamespace], started: float) -> _Run:
    return _Run("txt2img", "20261206000000", [], jobs=jobs, started=started)  # type: ignore[arg-type]


def _asked_on_the_first_worker(first: A1111Serving, key: str, action: str) -> None:
    token = KEY_NAME.set(key)
    try:
        getattr(first, action)()
    finally:
        KEY_NAME.reset(token)


def test_an_interrupt_from_another_worker_ends_the_keys_requests_begun_before_it(boards: tuple[Board, Board]) -> None:
    engine = _Engine()
    first, second = _worker(boards[0], engine), _worker(boards[1], engine)
    before = time.monotonic()
    running = _run_of([_job(engine, "running", "running", before), _job(engine, "queued", "queued", None)], before)
    others = _run_of([_job(engine, "bob's", "running", before)], before)
    second._runs = {"alice": [running], "bob": [others]}
    _asked_on_the_first_worker(first, "alice", "interrupt")
    later = _run_of([_job(engine, "later", "running", time.monotonic())], time.monotonic())
    second._runs["alice"].append(later)
    second._apply(second.board.commands_after(second._last_command))
    assert engine.ended == ["running", "queued"], "alice's request begun before the interrupt, nothing else"
    assert running.interrupted and not later.interrupted and not others.interrupted
    assert running.dropped == {id(running.jobs[1])}, "the queued iteration is dropped, not answered"
    second._apply(second.board.commands_after(second._last_command))
    assert engine.ended == ["running", "queued"], "a command is applied once"


def test_a_skip_from_another_worker_ends_the_iteration_running_then_not_the_next(boards: tuple[Board, Board]) -> None:
    engine = _Engine()
    first, second = _worker(boards[0], engine), _worker(boards[1], engine)
    begun = time.monotonic()
    done = _job(engine, "done", "done", begun)
    run = _run_of([done], begun)
    second._runs = {"alice": [run]}
    _asked_on_the_first_worker(first, "alice", "skip")
    # Before the second worker's next round, the skipped iteration ended on its own and the next began.
    run.jobs.append(_job(engine, "next", "running", time.monotonic()))
    second._apply(second.board.commands_after(second._last_command))
    assert engine.ended == [] and not run.skipped
    _asked_on_the_first_worker(first, "alice", "skip")
    second._apply(second.board.commands_after(second._last_command))
    assert engine.ended == ["next"] and run.skipped and not run.interrupted
