"""Waiting for an asyncio event with a bound, without losing a cancel.

`asyncio.wait_for(event.wait(), t)` looks like the same thing, but on Python 3.11 it returns
the event's result when the event and a cancel of the waiting task come at the same moment
(the cancel is dropped): a loop around it then goes on, and the daemon's task group waits on
that task for ever at shutdown (seen in CI: a daemon not stopping on SIGTERM). `asyncio.timeout`
raises the cancel.
"""

from __future__ import annotations

import asyncio

__all__ = ["wait_set"]


async def wait_set(event: asyncio.Event, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a failure
    """Wait until `event` is set or `timeout` seconds pass; whether it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
