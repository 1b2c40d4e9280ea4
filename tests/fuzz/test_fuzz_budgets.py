"""The daemon's budgets under any sequence of load (peerd/events.py, docs/SECURITY.md 3.5.1):
whatever mix of urgent, statement and bulk work arrives, in whatever order and with whatever
statement ids and publishers, the lanes stay within their limits, never refuse urgent work
below its cap, hand out every queued piece of work exactly once and serve urgent work first;
the log budget emits at most its burst plus its rate over any run and counts everything it
holds back.
"""

from __future__ import annotations

import asyncio
import logging

from hypothesis import given
from hypothesis import strategies as st

from peerd.events import EventLanes, LaneLimits, LogBudget, Work
from tests.fuzz.corpus import fuzz_settings

FUZZ = fuzz_settings(deadline=None)
LIMITS = LaneLimits(
    bulk=8, urgent=6, statements_per_lane=3, lanes=4, statement_rate=2.0, statement_burst=4.0
)

publishers = st.sampled_from(["a", "b", "c", "d", "e", "f"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("urgent")),
        st.tuples(st.just("bulk")),
        st.tuples(st.just("statement"), publishers, st.integers(0, 30)),
        st.tuples(st.just("applied"), st.integers(0, 30)),
        st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
        st.tuples(st.just("take"), st.integers(1, 4)),
    ),
    max_size=200,
)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@FUZZ
@given(ops)
def test_event_lanes_hold_their_promises(script: list[tuple[object, ...]]) -> None:
    async def run() -> None:
        clock = Clock()
        lanes = EventLanes(LIMITS, clock=clock)
        queued: dict[str, tuple[str, object]] = {}  # name -> (lane kind, publisher)
        done: list[str] = []

        def work(name: str) -> Work:
            async def go() -> None:
                done.append(name)

            return go

        async def take(n: int) -> None:
            for _ in range(min(n, len(lanes))):
                urgent_waiting = any(k == "urgent" for k, _ in queued.values())
                item = await lanes.get()
                await item()
                lanes.task_done()
                name = done[-1]
                kind, _ = queued.pop(name)
                assert not urgent_waiting or kind == "urgent", (name, queued)

        for counter, op in enumerate(script):
            name = f"w{counter}"
            if op[0] == "urgent":
                waiting = sum(1 for k, _ in queued.values() if k == "urgent")
                took = lanes.urgent(work(name))
                assert took == (waiting < LIMITS.urgent)
                if took:
                    queued[name] = ("urgent", None)
            elif op[0] == "bulk":
                if lanes.bulk(work(name)):
                    queued[name] = ("bulk", None)
                else:
                    assert sum(1 for k, _ in queued.values() if k == "bulk") == LIMITS.bulk
            elif op[0] == "statement":
                publisher, sid = op[1], f"s{op[2]}"
                if lanes.statement(str(publisher), sid, work(name)) is None:
                    queued[name] = ("statement", publisher)
            elif op[0] == "applied":
                lanes.applied(f"s{op[1]}")
            elif op[0] == "tick":
                clock.now += float(op[1])  # type: ignore[arg-type]
            else:
                await take(int(op[1]))  # type: ignore[call-overload]
            pending = [p for k, p in queued.values() if k == "statement"]
            assert len({*pending}) <= LIMITS.lanes
            assert all(pending.count(p) <= LIMITS.statements_per_lane for p in pending)
            assert len(lanes) == len(queued)
        await take(len(lanes))
        assert not queued
        assert len(done) == len(set(done))  # each piece of work ran once
        await asyncio.wait_for(lanes.join(), 1.0)

    asyncio.run(run())


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["x", "y", "z", "w"]), st.floats(0.0, 0.5)),
        max_size=400,
    )
)
def test_the_log_budget_is_a_budget(calls: list[tuple[str, float]]) -> None:
    clock = Clock()
    logger = logging.getLogger("fuzz.budget")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        budget = LogBudget(logger, burst=3.0, per_second=1.0, clock=clock)
        for key, dt in calls:
            clock.now += dt
            budget.log(logging.INFO, key, "line about %s", key)
        # Per key at most its burst plus its rate over the run; all together five times that.
        assert len(lines) <= 5 * 3.0 + 5 * 1.0 * clock.now + 1
        for key in "xyzw":
            emitted = sum(1 for line in lines if line.startswith(f"line about {key}"))
            assert emitted <= 3.0 + 1.0 * clock.now + 1
        assert len(lines) + budget.suppressed == len(calls)
        # What was held back is said: on a later line of its key, or by flush().
        said = sum(int(line.split("(")[1].split()[0]) for line in lines if "suppressed" in line)
        budget.flush()
        flushed = [line for line in lines if line.startswith("event=log.suppressed ")]
        said += sum(int(line.rsplit("lines=", 1)[1].split()[0]) for line in flushed)
        assert said == budget.suppressed
    finally:
        logger.removeHandler(handler)
