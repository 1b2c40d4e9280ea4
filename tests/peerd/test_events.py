"""The daemon's event lanes and log budget (peerd/events.py): what is never dropped, what is
dropped and said, and who waits behind whom."""

from __future__ import annotations

import asyncio
import logging

import pytest

from peerd.events import EventLanes, LaneLimits, LogBudget, Work


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _work(done: list[str], name: str) -> Work:
    async def run() -> None:
        done.append(name)

    return run


async def _drain(lanes: EventLanes) -> None:
    while len(lanes):
        work = await lanes.get()
        await work()
        lanes.task_done()


async def test_urgent_first_then_statements_and_bulk_in_turn() -> None:
    lanes, done = EventLanes(), []
    for i in range(3):
        assert lanes.bulk(_work(done, f"bulk{i}"))
    for i in range(3):
        assert lanes.statement("bob", f"s{i}", _work(done, f"stmt{i}")) is None
    assert lanes.urgent(_work(done, "up"))
    await _drain(lanes)
    assert done == ["up", "stmt0", "bulk0", "stmt1", "bulk1", "stmt2", "bulk2"]


async def test_a_flooding_publisher_waits_for_its_turn() -> None:
    lanes, done = EventLanes(), []
    for i in range(64):
        assert lanes.statement("mallory", f"m{i}", _work(done, "mallory")) is None
    assert lanes.statement("mallory", "m64", _work(done, "mallory")) == "lane-full"
    assert lanes.statement("bob", "genuine", _work(done, "bob")) is None
    await _drain(lanes)
    assert done.index("bob") == 1  # one of mallory's, then bob's: round-robin


async def test_statements_are_deduplicated_and_rate_limited_per_publisher() -> None:
    clock = Clock()
    lanes = EventLanes(LaneLimits(statement_rate=1.0, statement_burst=2.0), clock=clock)
    done: list[str] = []
    assert lanes.statement("m", "a", _work(done, "a")) is None
    assert lanes.statement("m", "a", _work(done, "a")) == "duplicate"  # pending
    assert lanes.statement("m", "b", _work(done, "b")) is None
    assert lanes.statement("m", "c", _work(done, "c")) == "rate-limited"
    assert lanes.statement("bob", "d", _work(done, "d")) is None  # another publisher's bucket
    await _drain(lanes)
    lanes.applied("a")
    clock.now += 5
    assert lanes.statement("m", "a", _work(done, "a")) == "duplicate"  # applied before
    assert lanes.statement("m", "c", _work(done, "c")) is None  # refilled


async def test_bounds_say_no_rather_than_grow() -> None:
    lanes = EventLanes(LaneLimits(bulk=2, urgent=1, lanes=2))
    done: list[str] = []
    assert lanes.bulk(_work(done, "1"))
    assert lanes.bulk(_work(done, "2"))
    assert not lanes.bulk(_work(done, "3"))
    assert lanes.urgent(_work(done, "u1"))
    assert not lanes.urgent(_work(done, "u2"))
    assert lanes.statement("a", "1", _work(done, "a")) is None
    assert lanes.statement("b", "2", _work(done, "b")) is None
    assert lanes.statement("c", "3", _work(done, "c")) == "lanes-full"


async def test_join_waits_for_the_work_in_hand() -> None:
    lanes, done = EventLanes(), []
    lanes.bulk(_work(done, "x"))

    async def consume() -> None:
        work = await lanes.get()
        await asyncio.sleep(0.01)
        await work()
        lanes.task_done()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(lanes.join(), 5)
    assert done == ["x"]
    await task


def test_the_log_budget_says_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = LogBudget(logging.getLogger("test.budget"), burst=3, per_second=1.0, clock=clock)
    caplog.set_level(logging.INFO, logger="test.budget")
    for i in range(100):
        budget.log(logging.INFO, "bad-signature", "refused %d", i)
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused 1", "refused 2"]
    assert budget.suppressed == 97
    clock.now += 1.0
    budget.log(logging.INFO, "bad-signature", "refused %d", 100)
    assert caplog.records[-1].getMessage() == "refused 100 (97 similar line(s) suppressed)"
    for i in range(10):
        budget.log(logging.INFO, "malformed", "junk %d", i)
    budget.flush()
    assert caplog.records[-1].getMessage() == "event=log.suppressed about=malformed lines=7"


def test_budgeted_events_keep_their_keys_and_count_what_was_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    budget = LogBudget(logging.getLogger("test.events"), burst=2, per_second=1.0, clock=clock)
    caplog.set_level(logging.INFO, logger="test.events")
    for i in range(10):
        budget.event(logging.INFO, "rejected", "handshake.rejected", reason="bad-mac", n=i)
    assert [r.getMessage() for r in caplog.records] == [
        "event=handshake.rejected reason=bad-mac n=0",
        "event=handshake.rejected reason=bad-mac n=1",
    ]
    clock.now += 1.0
    budget.event(logging.INFO, "rejected", "handshake.rejected", reason="bad-mac", n=10)
    assert caplog.records[-1].getMessage() == (
        "event=handshake.rejected reason=bad-mac n=10 suppressed=8"
    )


def test_all_keys_together_have_a_budget_too(caplog: pytest.LogCaptureFixture) -> None:
    budget = LogBudget(logging.getLogger("test.total"), burst=2, per_second=1.0, clock=Clock())
    caplog.set_level(logging.INFO, logger="test.total")
    for i in range(1000):
        budget.log(logging.INFO, f"reason-{i}", "line %d", i)
    assert len(caplog.records) == 10  # five times one key's burst
    assert budget.suppressed == 990
