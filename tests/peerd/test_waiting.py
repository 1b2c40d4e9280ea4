"""peerd.waiting.wait_set: a bounded wait on an event that never drops a cancel."""

from __future__ import annotations

import asyncio

import pytest

from peerd.waiting import wait_set


async def test_a_cancel_at_the_moment_the_event_is_set_is_not_lost() -> None:
    """The event and the cancel come in the same loop turn, the case in which wait_for on
    Python 3.11 returns the event and drops the cancel (a loop around it went on for ever)."""
    event = asyncio.Event()
    task = asyncio.create_task(wait_set(event, 10.0))
    await asyncio.sleep(0)  # the task waits on the event
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_it_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert not await wait_set(event, 0.01)
    event.set()
    assert await wait_set(event, 0.01)
