"""Fuzzing the session layer where it reads outside input: `SessionManager.receive` with an
established session, the handshake reader in each of its states, and credentials that arrive
inside a valid Noise handshake.

`receive` is documented never to raise for bad input: every refusal is a `Rejected` output,
counted in `rejections` under its reason. The invariants checked after every example: nothing
raised, nothing was delivered that the peer did not send, no session came up with anyone who
did not prove the key its certificate names, and the real session still carries messages.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from protocol import frames
from protocol.session import (
    HandshakeFailed,
    Message,
    Rejected,
    SendFrame,
    SessionManager,
    SessionUp,
)
from tests.fuzz.corpus import (
    NOW,
    Node,
    fuzz_settings,
    inputs,
    make_world,
    manager,
    trusting_view,
)

FUZZ = fuzz_settings(deadline=2000)

WORLD = make_world()


def _messages(outputs: Sequence[object]) -> list[bytes]:
    return [o.payload for o in outputs if isinstance(o, Message)]


@FUZZ
@given(st.lists(inputs("frame", max_random=1024), min_size=1, max_size=8))
def test_receive_never_raises_and_delivers_nothing_forged(batch: list[bytes]) -> None:
    w = WORLD
    for data in batch:
        for m in (w.a, w.b):
            before = sum(m.rejections.values())
            outputs = m.receive(data, NOW)
            for out in outputs:
                # A replayed HELLO may be answered (XX message 1 is unauthenticated); nothing
                # else comes out of junk.
                assert isinstance(out, Rejected | SendFrame), out
                if isinstance(out, SendFrame):
                    assert frames.decode(out.frame).__class__ is frames.Reply
            rejected = [o for o in outputs if isinstance(o, Rejected)]
            assert sum(m.rejections.values()) - before >= len(rejected)
            assert all(r.reason for r in rejected)
    # The real session is untouched: a message still goes both ways.
    got = []
    for out in w.a.send(w.bob.peer_id, b"still here", NOW):
        assert isinstance(out, SendFrame)
        got += _messages(w.b.receive(out.frame, NOW))
    assert got == [b"still here"]


def _fresh_pair() -> tuple[Node, Node, SessionManager, SessionManager]:
    alice, bob = Node(bytes(range(32))), Node(bytes(range(1, 33)))
    a = manager(alice, trusting_view(alice, bob))
    b = manager(bob, trusting_view(bob, alice))
    return alice, bob, a, b


def _frame_to(outputs: Sequence[object], peer: str) -> bytes:
    (out,) = [o for o in outputs if isinstance(o, SendFrame) and o.peer_id == peer]
    assert isinstance(out, SendFrame)
    return out.frame


def _mangle(frame: bytes, keep: int, data: st.DataObject) -> bytes:
    """Keep the header (so the frame reaches the handshake it names), fuzz the rest."""
    tail = data.draw(inputs("frame", max_random=512))
    how = data.draw(st.sampled_from(["replace", "flip", "truncate"]))
    if how == "replace":
        return frame[:keep] + tail
    if how == "truncate":
        return frame[: data.draw(st.integers(keep, len(frame)))]
    i = data.draw(st.integers(keep, len(frame) - 1))
    return frame[:i] + bytes([frame[i] ^ (1 << data.draw(st.integers(0, 7)))]) + frame[i + 1 :]


@FUZZ
@given(st.data())
def test_handshake_reader_in_every_state(data: st.DataObject) -> None:
    alice, bob, a, b = _fresh_pair()
    hello = _frame_to(a.connect(bob.peer_id, NOW), bob.peer_id)
    stage = data.draw(st.sampled_from(["hello", "reply", "finish"]))
    if stage == "hello":
        out = b.receive(_mangle(hello, 8, data), NOW)
        assert not [o for o in out if isinstance(o, SessionUp)]
        return
    reply = _frame_to(b.receive(hello, NOW), alice.peer_id)
    if stage == "reply":
        out = a.receive(_mangle(reply, 10, data), NOW)
        ups = [o for o in out if isinstance(o, SessionUp)]
        assert not ups
        sent = [o for o in out if isinstance(o, SendFrame)]
        if sent:  # only the genuine REPLY is answered with a FINISH
            assert frames.decode(sent[0].frame).__class__ is frames.Finish
        return
    finish = _frame_to(a.receive(reply, NOW), bob.peer_id)
    mangled = _mangle(finish, 6, data)
    out = b.receive(mangled, NOW)
    ups = [o for o in out if isinstance(o, SessionUp)]
    assert all(u.peer_id == alice.peer_id for u in ups)
    if mangled != finish:
        assert not ups


@FUZZ
@given(inputs("credentials", "certificate", max_random=256), st.sampled_from(["reply", "finish"]))
def test_bad_credentials_inside_a_valid_handshake(creds: bytes, where: str) -> None:
    """A rogue that speaks Noise correctly but presents fuzzed credentials: refused with a
    reason; an initiator refusing the responder sends nothing more (no FINISH: its own
    identity is never revealed to a responder it does not accept)."""
    alice, bob, a, b = _fresh_pair()
    rogue_bob = SessionManager(
        peer_id=bob.peer_id,
        network=b.network,
        static=bob.static,
        credentials=creds if where == "reply" else bob.credentials(),
        trust=b.trust,
    )
    rogue_alice = SessionManager(
        peer_id=alice.peer_id,
        network=a.network,
        static=alice.static,
        credentials=creds if where == "finish" else alice.credentials(),
        trust=a.trust,
    )
    genuine = creds in (bob.credentials(), alice.credentials())
    if where == "reply":
        hello = _frame_to(a.connect(bob.peer_id, NOW), bob.peer_id)
        reply = _frame_to(rogue_bob.receive(hello, NOW), alice.peer_id)
        out = a.receive(reply, NOW)
        if creds != bob.credentials():
            assert [type(o) for o in out] == [Rejected, HandshakeFailed]
        return
    hello = _frame_to(rogue_alice.connect(bob.peer_id, NOW), bob.peer_id)
    reply = _frame_to(b.receive(hello, NOW), alice.peer_id)
    finish = _frame_to(rogue_alice.receive(reply, NOW), bob.peer_id)
    out = b.receive(finish, NOW)
    ups = [o for o in out if isinstance(o, SessionUp)]
    if not genuine:
        assert not ups
        assert [type(o) for o in out] == [Rejected]
