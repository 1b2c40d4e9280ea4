"""A rogue *trusted* peer abusing the message channels (its session is authenticated, so the
session layer lets everything through): the messenger's state must stay bounded and every
refusal is counted. Real sqlite store, the daemon's `Messenger`; the peer's messages are fed
as the daemon feeds them after decoding them from the session."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peerd.messages import MAX_INBOUND_CACHE, Messenger, OutboxLimits
from peerd.store import Store
from protocol.messaging import ChannelAck, ChannelMessage

NOW = 1_750_000_000.0
PEER = "x8gbjhzgqjrdsnftppjh"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "peerd.db", network="lab", overlap=0.0, create=True)
    try:
        yield s
    finally:
        await s.close()


def _messenger(store: Store, **limits: int) -> tuple[Messenger, list[tuple[str, bytes]]]:
    sent: list[tuple[str, bytes]] = []

    def transmit(peer: str, payload: bytes) -> bool:
        sent.append((peer, payload))
        return True

    return Messenger(store, transmit, OutboxLimits(**limits)), sent


async def test_messages_on_endless_channels_keep_the_cache_bounded(store: Store) -> None:
    m, _ = _messenger(store)
    for i in range(MAX_INBOUND_CACHE + 300):
        await m.on_message(PEER, ChannelMessage(f"c{i}", 1, b"x"), now=NOW)
    assert len(m._in) <= MAX_INBOUND_CACHE
    # Nothing was lost: every message is in the inbox once, and an evicted channel resumes
    # from the store (its next number is delivered, a repeat of the first is not).
    assert m.counters["received"] == MAX_INBOUND_CACHE + 300
    await m.on_message(PEER, ChannelMessage("c0", 1, b"x"), now=NOW)
    await m.on_message(PEER, ChannelMessage("c0", 2, b"y"), now=NOW)
    assert m.counters["received"] == MAX_INBOUND_CACHE + 301
    assert m.counters["duplicates"] == 1


async def test_empty_messages_cannot_fill_the_inbox_without_bound(store: Store) -> None:
    m, sent = _messenger(store, max_inbox_bytes=64 * 100)
    for seq in range(1, 151):
        await m.on_message(PEER, ChannelMessage("spam", seq, b""), now=NOW)
    (stored,) = await store.fetchone("SELECT COUNT(*) FROM inbox")
    assert 100 <= stored <= 101
    # The sender retransmits what was not acknowledged: refused again each time.
    for _ in range(3):
        await m.on_message(PEER, ChannelMessage("spam", stored + 1, b""), now=NOW)
    assert m.rejections["inbox-full"] == 4
    assert (await store.fetchone("SELECT COUNT(*) FROM inbox"))[0] == stored
    # What was refused is never acknowledged: every ACK covers only what was stored.
    acks = {payload for _, payload in sent}
    assert ChannelAck("spam", stored).encode() in acks
    assert ChannelAck("spam", stored + 1).encode() not in acks


async def test_messages_far_ahead_and_bogus_acks_are_counted_and_not_kept(store: Store) -> None:
    m, _ = _messenger(store)
    await m.on_message(PEER, ChannelMessage("a", 10_000, b"far ahead"), now=NOW)
    assert m.rejections["too-far-ahead"] == 1
    assert m.counters["received"] == 0
    for i in range(500):
        await m.on_ack(PEER, ChannelAck(f"never-used-{i}", 5), now=NOW)
    assert m.rejections["bad-ack"] == 500
    assert len(m._out) == 0
    # An ACK for numbers never sent on a real channel is refused too, and deletes nothing.
    seq = await m.send(PEER, "real", b"hello", now=NOW)
    await m.on_ack(PEER, ChannelAck("real", seq + 5), now=NOW)
    outbox = await store.fetchone("SELECT COUNT(*) FROM outbox")
    assert outbox[0] == 1
    await m.on_ack(PEER, ChannelAck("real", seq), now=NOW)
    outbox = await store.fetchone("SELECT COUNT(*) FROM outbox")
    assert outbox[0] == 0


async def test_a_flood_into_a_full_inbox_is_logged_within_the_budget(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused message is counted, but the lines saying so stay within the log budget
    (20 at once): a peer resending into a full inbox does not write a line per message."""
    m, _ = _messenger(store, max_inbox_bytes=1)
    await m.on_message(PEER, ChannelMessage("spam", 1, b""), now=NOW)
    with caplog.at_level(logging.WARNING, logger="peerd.messages"):
        for _ in range(500):
            await m.on_message(PEER, ChannelMessage("spam", 2, b""), now=NOW)
    assert m.rejections["inbox-full"] == 500
    lines = [r for r in caplog.records if "messages.inbox_full" in r.getMessage()]
    assert 1 <= len(lines) <= 25
