"""One-round-trip sessions with a known peer (SPEC.md 4.7): resumption tickets, early data,
replay, fallback to XX, rotation, crossing handshakes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import frames
from protocol.noise import KeyPair, message_overheads
from protocol.resumption import NOISE_RESUME, Ticket
from protocol.session import (
    NOISE_XX,
    NOISE_XXPSK0,
    Message,
    Output,
    Rejected,
    SendFrame,
    SessionManager,
    SessionUp,
    TicketIssued,
    TicketSpent,
)
from tests.protocol.sessionkit import Directory, Network, make_node, trusted_pair


def _stored(events: list[Output]) -> list[Ticket]:
    """What a shell that persists TicketIssued / erases TicketSpent would hold."""
    held: dict[bytes, Ticket] = {}
    for e in events:
        if isinstance(e, TicketIssued):
            held[e.ticket.ticket_id] = e.ticket
        elif isinstance(e, TicketSpent):
            held.pop(e.ticket.ticket_id, None)
    return list(held.values())


def _restart(net: Network, name: str, directory: Directory, static: KeyPair, **kw: object) -> None:
    """A fresh manager with the same keys and the tickets its shell stored."""
    old = net.nodes[name]
    tickets = _stored(net.events[name])
    node = make_node(name, directory, static=static, **kw)  # type: ignore[arg-type]
    node.load_tickets(tickets, net.now)
    assert old.peer_id == node.peer_id
    net.nodes[name] = node
    net.events[name] = [TicketIssued(t) for t in tickets]


def _known_pair(**kw: object) -> tuple[Directory, dict[str, KeyPair], Network]:
    """Alice and Bob after one XX session, both restarted: known peers, no session."""
    directory = Directory()
    keys = {n: KeyPair.generate() for n in ("alice", "bob")}
    a = make_node("alice", directory, static=keys["alice"], **kw)  # type: ignore[arg-type]
    b = make_node("bob", directory, static=keys["bob"], **kw)  # type: ignore[arg-type]
    directory.trusts.update(alice={"bob"}, bob={"alice"})
    net = Network(a, b)
    net.deliver("alice", a.connect("bob", net.now))
    assert [u.protocol for u in net.of("alice", SessionUp)] == [NOISE_XXPSK0 if kw else NOISE_XX]
    for name in ("alice", "bob"):
        _restart(net, name, directory, keys[name], **kw)
    net.wire.clear()
    return directory, keys, net


def test_a_known_peer_resumes_in_one_round_trip_and_leaves_new_tickets() -> None:
    _, _, net = _known_pair()
    a, b = net.nodes["alice"], net.nodes["bob"]
    assert a.can_resume("bob", net.now)
    net.deliver("alice", a.connect("bob", net.now))
    # RESUME and REPLY: one round trip, and no confirmation message is needed.
    kinds = [f[1] for _, f in net.wire]
    assert kinds == [frames.FrameType.RESUME, frames.FrameType.REPLY]
    (up_a,) = net.of("alice", SessionUp)
    (up_b,) = net.of("bob", SessionUp)
    assert up_a.protocol == up_b.protocol == NOISE_RESUME
    assert up_a.session_id == up_b.session_id
    # RESUME: header, reply_to, ticket id, then e, [e1], [credentials].
    overhead = message_overheads(NOISE_RESUME)[0]
    assert len(net.wire[0][1]) == 2 + 4 + 1 + len("alice") + 16 + overhead + len(b"alice")
    net.deliver("alice", a.send("bob", b"hello", net.now))
    net.deliver("bob", b.send("alice", b"back", net.now))
    assert [m.payload for m in net.of("bob", Message)] == [b"hello"]
    assert [m.payload for m in net.of("alice", Message)] == [b"back"]
    # The used ticket is gone on both sides, a new one took its place: again one round trip.
    assert a.can_resume("bob", net.now)
    net.wire.clear()
    a.close("bob", "test", net.now, notify=False)
    b.close("alice", "test", net.now, notify=False)
    net.deliver("alice", a.connect("bob", net.now))
    assert [f[1] for _, f in net.wire] == [frames.FrameType.RESUME, frames.FrameType.REPLY]


def test_early_data_travels_behind_the_resume_and_is_delivered_once() -> None:
    _, _, net = _known_pair()
    a, b = net.nodes["alice"], net.nodes["bob"]
    hello = a.connect("bob", net.now)
    early = a.send("bob", b"offer", net.now) + a.send("bob", b"more", net.now)
    assert [f.frame[1] for f in early if isinstance(f, SendFrame)] == [frames.FrameType.EARLY] * 2
    net.deliver("alice", hello + early)
    assert [m.payload for m in net.of("bob", Message)] == [b"offer", b"more"]
    assert a.has_session("bob")
    # Replayed EARLY frames are refused by their window; nothing is delivered twice.
    for f in early:
        assert isinstance(f, SendFrame)
        assert [type(o) for o in b.receive(f.frame, net.now)] == [Rejected]
    assert b.rejections["replay"] == 2
    assert [m.payload for m in net.of("bob", Message)] == [b"offer", b"more"]


def test_a_replayed_resume_is_refused_before_any_cryptography() -> None:
    _, _, net = _known_pair()
    a, b = net.nodes["alice"], net.nodes["bob"]
    out = a.connect("bob", net.now)
    net.deliver("alice", out)
    (resume,) = [f.frame for f in out if isinstance(f, SendFrame)]
    for when in (0.0, 1.0, 3600.0):
        result = b.receive(resume, net.now + when)
        assert [type(o) for o in result] == [Rejected]
        assert result[0].reason == "unknown-ticket"  # type: ignore[union-attr]
    assert len(net.of("bob", SessionUp)) == 1
    # Also after a restart of the responder: its shell erased the ticket.
    assert all(t.ticket_id != resume[13:29] for t in _stored(net.events["bob"]))


def test_a_ticket_is_single_use_on_the_initiator_too() -> None:
    _, _, net = _known_pair()
    a = net.nodes["alice"]
    (before,) = [t for t in _stored(net.events["alice"]) if t.initiator]
    out = a.connect("bob", net.now)  # sent, never answered
    assert any(isinstance(o, TicketSpent) and o.ticket == before for o in out)
    assert not a.can_resume("bob", net.now)


def test_a_responder_without_the_ticket_gets_xx_after_one_timeout_and_the_early_data() -> None:
    directory, keys, net = _known_pair()
    # Bob restarts without its tickets (a lost store, or it never stored them).
    net.events["bob"].clear()
    _restart(net, "bob", directory, keys["bob"])
    a, b = net.nodes["alice"], net.nodes["bob"]
    out = a.connect("bob", net.now)
    out += a.send("bob", b"early", net.now)
    net.deliver("alice", out)
    assert b.rejections["unknown-ticket"] == 1
    assert not net.of("alice", SessionUp)
    net.tick(a.limits.handshake_timeout)
    (up,) = net.of("alice", SessionUp)
    assert up.protocol == NOISE_XX
    # The early data bob never read came again on the XX session.
    assert [m.payload for m in net.of("bob", Message)] == [b"early"]
    assert a.can_resume("bob", net.now)  # and the XX session left a fresh ticket


def test_a_rotated_static_key_drops_the_tickets_and_falls_back_to_xx() -> None:
    directory, _, net = _known_pair()
    a, b = net.nodes["alice"], net.nodes["bob"]
    new = KeyPair.generate()
    spent = b.set_identity(new, b"bob")
    assert spent
    assert all(isinstance(o, TicketSpent) for o in spent)
    directory.keys["bob"] = new.public
    net.deliver("alice", a.connect("bob", net.now))
    net.tick(a.limits.handshake_timeout)
    (up,) = net.of("alice", SessionUp)
    assert up.protocol == NOISE_XX
    assert b.session("alice") is not None


def test_the_initiator_who_rotated_does_not_use_its_old_tickets() -> None:
    _, _, net = _known_pair()
    a = net.nodes["alice"]
    a.static = KeyPair.generate()  # as if rotated without set_identity's clean-up
    assert not a.can_resume("bob", net.now)
    out = a.connect("bob", net.now)
    assert [f.frame[1] for f in out if isinstance(f, SendFrame)] == [frames.FrameType.HELLO]


def test_an_untrusted_peer_with_a_ticket_is_refused() -> None:
    directory, _, net = _known_pair()
    a, b = net.nodes["alice"], net.nodes["bob"]
    directory.trusts["bob"] = set()  # bob no longer trusts alice (blocked, revoked)
    net.deliver("alice", a.connect("bob", net.now))
    assert b.rejections["unknown-peer"] == 1
    assert not net.of("bob", SessionUp)


def test_crossing_resumptions_both_come_up_and_leave_consistent_tickets() -> None:
    _, _, net = _known_pair()
    a, b = net.nodes["alice"], net.nodes["bob"]
    # Give bob an initiating ticket too: a session bob initiated.
    net.deliver("bob", b.connect("alice", net.now))
    a.close("bob", "test", net.now, notify=False)
    b.close("alice", "test", net.now, notify=False)
    for _ in range(3):
        out_a = a.connect("bob", net.now)
        out_b = b.connect("alice", net.now)
        net.deliver("alice", out_a)
        net.deliver("bob", out_b)
        ups = net.of("alice", SessionUp)[-2:] + net.of("bob", SessionUp)[-2:]
        assert {u.protocol for u in ups} == {NOISE_RESUME}
        assert a.has_session("bob")
        assert b.has_session("alice")
        # Both sides hold the same tickets whatever the order the sessions completed in.
        held_a = {(t.ticket_id, not t.initiator) for t in a.tickets.all()}
        held_b = {(t.ticket_id, t.initiator) for t in b.tickets.all()}
        assert held_a == held_b
        assert len(held_a) == 2
        a.close("bob", "test", net.now, notify=False)
        b.close("alice", "test", net.now, notify=False)


def test_resumption_with_a_network_psk_and_none_across_networks() -> None:
    psk = bytes(range(32))
    _, _, net = _known_pair(network_psk=psk)
    a = net.nodes["alice"]
    net.deliver("alice", a.connect("bob", net.now))
    assert [u.protocol for u in net.of("alice", SessionUp)] == [NOISE_RESUME]
    # A responder with another network PSK cannot read message 1.
    _, _, net2 = _known_pair(network_psk=psk)
    b2 = net2.nodes["bob"]
    b2.network_psk = bytes(32)
    net2.deliver("alice", net2.nodes["alice"].connect("bob", net2.now))
    assert b2.rejections["decrypt"] == 1
    assert not net2.of("bob", SessionUp)


def test_expired_tickets_are_not_used_and_come_back_to_be_erased() -> None:
    _, keys, net = _known_pair()
    late = net.now + net.nodes["alice"].limits.ticket_lifetime + 1
    assert net.nodes["alice"].can_resume("bob", late - 2)
    node = make_node("alice", Directory(), static=keys["alice"])
    spent = node.load_tickets(_stored(net.events["alice"]), late)
    assert len(spent) == 2
    assert all(isinstance(o, TicketSpent) for o in spent)
    assert not node.can_resume("bob", late)


def test_early_data_is_bounded_and_the_rest_waits_for_the_session() -> None:
    _, _, net = _known_pair()
    a = net.nodes["alice"]
    a.connect("bob", net.now)
    for _ in range(a.limits.max_early_messages):
        a.send("bob", b"x", net.now)
    with pytest.raises(Exception, match="no session"):
        a.send("bob", b"x", net.now)


def test_xx_handshakes_still_cannot_carry_early_data() -> None:
    a, _, net = trusted_pair()
    a.connect("bob", net.now)
    with pytest.raises(Exception, match="no session"):
        a.send("bob", b"x", net.now)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.sampled_from(["a-connect", "b-connect", "both", "drop", "restart-a", "restart-b"]),
        min_size=1,
        max_size=8,
    )
)
def test_whatever_happens_the_peers_end_up_with_a_session_and_messages_flow(
    steps: list[str],
) -> None:
    """Crossing handshakes, lost frames, restarts with and without tickets: each step settles
    (timers run), and then both sides can always talk, never through a hang."""
    directory, keys, net = _known_pair()
    for step in steps:
        a, b = net.nodes["alice"], net.nodes["bob"]
        if step == "a-connect":
            net.deliver("alice", a.connect("bob", net.now))
        elif step == "b-connect":
            net.deliver("bob", b.connect("alice", net.now))
        elif step == "both":
            out_a, out_b = a.connect("bob", net.now), b.connect("alice", net.now)
            net.deliver("alice", out_a)
            net.deliver("bob", out_b)
        elif step == "drop":
            net.fault = lambda _to, _frame: []
            net.deliver("alice", a.connect("bob", net.now))
            net.fault = None
        else:
            name = step[-1:].replace("a", "alice").replace("b", "bob")
            _restart(net, name, directory, keys[name])
        for _ in range(6):
            net.tick(1.0)
    a, b = net.nodes["alice"], net.nodes["bob"]
    net.deliver("alice", a.connect("bob", net.now))
    for _ in range(6):
        net.tick(1.0)
    assert a.has_session("bob")
    _send_both_ways(net, a, b)


def _send_both_ways(net: Network, a: SessionManager, b: SessionManager) -> None:
    before_a, before_b = len(net.of("alice", Message)), len(net.of("bob", Message))
    net.deliver("alice", a.send("bob", b"ping", net.now))
    net.deliver("bob", b.send("alice", b"pong", net.now))
    assert [m.payload for m in net.of("bob", Message)[before_b:]] == [b"ping"]
    assert [m.payload for m in net.of("alice", Message)[before_a:]] == [b"pong"]
