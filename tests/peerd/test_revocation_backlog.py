"""The read path's backlog of revocation statements from the broker (peerd/revocations.py):
bounded per publisher, so one account's flood is dropped and counted while another
publisher's statement is still filed and checked (docs/SECURITY.md 3.5.1).

The e2e flood (tests/attacks/test_revocation_flood.py) fills the backlog only when the flood
outruns the checks, which depends on the machine; here the statements are filed without the
checker getting the loop in between, so the bound is met every run.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerd.events import EventLanes
from peerd.mqtt import Message
from peerd.revocations import BACKLOG_PER_PUBLISHER, Revocations
from tests.attacks.helpers import made_up_peer_id
from tests.peerd.test_mqtt import eventually
from tests.support.fakehost import FakeBroker, FakeHost

EXTRA = 44  # statements beyond the flooding publisher's bound


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[FakeHost]:
    host = await FakeHost.create(tmp_path / "alice", FakeBroker(), "alice")
    try:
        yield host
    finally:
        await host.close()


def _junk(host: FakeHost, publisher: str) -> Message:
    """Random bytes under a statement id that is not theirs: refused by the first cheap check."""
    topic = f"{host.topics.prefix}rev/{publisher}/{os.urandom(16).hex()}"
    return Message(topic, os.urandom(200), 1, False, False)


async def test_a_flooding_publisher_is_dropped_at_its_bound_and_another_is_still_checked(
    host: FakeHost,
) -> None:
    revocations = Revocations(host, EventLanes())
    mallory, bob = made_up_peer_id(), made_up_peer_id()

    # Filed in one turn of the loop: the checks cannot run in between.
    for _ in range(BACKLOG_PER_PUBLISHER + EXTRA):
        revocations.on_broker_message(_junk(host, mallory))
    revocations.on_broker_message(_junk(host, bob))
    assert host.rejections["revocation-backlog-full"] == EXTRA
    assert revocations.backlog() == BACKLOG_PER_PUBLISHER + 1
    assert revocations.backlog_peak == BACKLOG_PER_PUBLISHER + 1

    checks = asyncio.create_task(revocations.run())
    try:
        await eventually(lambda: revocations.backlog() == 0, "the backlog checked", 30)
    finally:
        checks.cancel()
        await asyncio.gather(checks, return_exceptions=True)
    # Every filed statement was checked, bob's among them; none dropped after filing.
    assert host.rejections["revocation-topic-mismatch"] == BACKLOG_PER_PUBLISHER + 1
    assert host.rejections["revocation-backlog-full"] == EXTRA

    # With the backlog empty, mallory's next statement is filed again.
    revocations.on_broker_message(_junk(host, mallory))
    assert revocations.backlog() == 1
    assert host.rejections["revocation-backlog-full"] == EXTRA
