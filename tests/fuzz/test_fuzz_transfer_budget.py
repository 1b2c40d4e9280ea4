"""Fuzzing a sender with what a hostile receiver may say (issue 18, item 3): any sequence of
Accepts, Acks and Requests, with any incarnation, durable prefix, credit and indices the wire
format allows. Whatever it says, the sender raises only RemoteProtocolError, never publishes
more for it than its re-send budget, never resets it more often than its restart cap, and a
co-receiver that behaves is not held back for ever."""

from __future__ import annotations

import math

import nacl.signing
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import RemoteProtocolError
from protocol.transfer import (
    Accept,
    Ack,
    ControlMessage,
    ReceiverFailed,
    Request,
    SenderTransfer,
    TransferConfig,
)
from protocol.transfer.messages import sack_bitmap
from tests.fuzz.corpus import fuzz_settings

CHUNK = 1024
COUNT = 40
WINDOW = 8
CONFIG = TransferConfig(chunk_size=CHUNK, window=WINDOW, sync_batch=2, start_wait=0.0)
BUDGET = COUNT + max(math.ceil(COUNT * CONFIG.resend_ratio), CONFIG.resend_floor)

prefixes = st.integers(0, 2) | st.integers(0, COUNT + 2)


@st.composite
def messages(draw: st.DrawFn, tid: bytes, last: int) -> ControlMessage:
    """A message of the receiver's last incarnation, the next (a restart) or an older one (an
    absurdly high one would only make every later message stale)."""
    kind = draw(st.sampled_from(["accept", "ack", "request"]))
    incarnation = draw(st.sampled_from([last, last + 1, last + 1, max(1, last - 1)]))
    if kind == "request":
        start = draw(st.integers(0, COUNT + 2))
        return Request(tid, incarnation, ((start, draw(st.integers(1, WINDOW))),))
    cum = draw(prefixes)
    limit = cum + draw(st.integers(0, WINDOW))
    above = draw(st.sets(st.integers(cum + 1, max(cum + 1, limit - 1)), max_size=WINDOW))
    sack = sack_bitmap(cum, {i for i in above if i < limit})
    cls = Accept if kind == "accept" else Ack
    return cls(tid, incarnation, cum, limit, sack)


@fuzz_settings(deadline=2000, share=3)
@given(st.data())
def test_a_hostile_receiver_costs_at_most_its_budget(data: st.DataObject) -> None:
    s = SenderTransfer(
        name="x.bin",
        size=COUNT * CHUNK,
        receivers=["mallory", "bob"],
        sender="alice",
        signing_key=nacl.signing.SigningKey(bytes(32)),
        now=0.0,
        config=CONFIG,
    )
    tid = s.transfer_id
    s.receive("bob", Accept(tid, 1, 0, WINDOW), 0.0)
    bob_cum = 0
    now = 0.0
    served = 0  # publishes mallory could claim: every one while she was active
    last = 1
    for _ in range(data.draw(st.integers(1, 300))):
        now += data.draw(st.sampled_from([0.0, 0.01, 1.0, 6.0]))
        message = data.draw(messages(tid, last))
        last = max(last, message.incarnation)
        try:
            s.receive("mallory", message, now)
        except RemoteProtocolError:
            pass  # counted and dropped by the shell; the transfer goes on
        s.on_timer(now)
        while (read := s.next_read(now)) is not None:
            if s.receiver_state("mallory") == "active":
                served += 1
            s.on_chunk_read(read, bytes(read.length))
        # bob acknowledges whatever has been published to him so far, in order.
        bob_cum = min(COUNT, max(bob_cum, s._receivers["bob"].cursor))
        s.receive("bob", Ack(tid, 1, bob_cum, min(COUNT, bob_cum + WINDOW)), now)
    assert served <= BUDGET + 1
    failed = [a for a in s.take_actions() if isinstance(a, ReceiverFailed)]
    assert all(f.peer == "mallory" and not f.remote for f in failed)
    assert all(f.reason in ("protocol-error", "over-budget") for f in failed)
    assert s._receivers["mallory"].restarts <= CONFIG.max_restarts + 1
    # bob was never dropped and, past the lag timeout, was never held back by mallory.
    assert s.receiver_state("bob") in ("active", "verified")
