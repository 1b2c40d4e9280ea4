"""Forward secrecy: someone who recorded a session and later steals *both* nodes' long-term
keys (static and identity) still cannot read it, and a session's keys are dropped once it is
superseded. Real session managers over real credentials; the recording is every frame they
exchanged."""

from __future__ import annotations

import pytest

from protocol import frames
from protocol.errors import RemoteProtocolError
from protocol.noise import HandshakeState
from protocol.session import NOISE_XX, SessionLimits, SessionManager, prologue
from tests.fuzz.corpus import NETWORK, NOW, make_world, manager, route, trusting_view


def test_stolen_static_keys_do_not_open_recorded_sessions() -> None:
    world = make_world()
    world.exchange([b"the weights of round 7", b"secret hyperparameters"])
    recorded = list(world.frames)
    hello, reply, finish = recorded[:3]
    data = [frames.decode(f) for f in recorded[3:]]
    assert all(isinstance(d, frames.Data) for d in data)

    # The thief holds bob's static private key and replays the responder's part with it:
    # message 1 reads, but bob's ephemeral is gone, so the recorded message 3 (and every
    # transport key after it) stays sealed.
    thief = HandshakeState(NOISE_XX, False, prologue(NETWORK, NOISE_XX), s=world.bob.static)
    thief.read_message(frames.decode(hello).noise)  # type: ignore[union-attr]
    thief.write_message(b"")
    with pytest.raises(RemoteProtocolError) as info:
        thief.read_message(frames.decode(finish).noise)  # type: ignore[union-attr]
    assert info.value.reason == "decrypt"

    # Likewise as the initiator with alice's static key: the recorded REPLY does not open.
    thief = HandshakeState(NOISE_XX, True, prologue(NETWORK, NOISE_XX), s=world.alice.static)
    thief.write_message(b"")
    with pytest.raises(RemoteProtocolError) as info:
        thief.read_message(frames.decode(reply).noise)  # type: ignore[union-attr]
    assert info.value.reason == "decrypt"


def test_superseded_sessions_drop_their_keys() -> None:
    limits = SessionLimits(previous_grace=60.0)
    world = make_world()
    a: SessionManager = world.a
    b = manager(world.bob, trusting_view(world.bob, world.alice))
    b.limits = limits
    a.limits = limits
    world.b = b
    world.frames.clear()
    world.handshake()
    first = a.session(world.bob.peer_id)
    assert first is not None
    old = route(a.send(world.bob.peer_id, b"before the rekey", NOW), b, [])
    assert old
    recorded = [o.frame for o in a.send(world.bob.peer_id, b"in flight", NOW)]  # type: ignore[union-attr]
    world.handshake()  # a rekey: a new session supersedes the first
    second = a.session(world.bob.peer_id)
    assert second is not None
    assert second is not first
    # Within the grace period the old session still receives what was in flight.
    assert [o for f in recorded for o in b.receive(f, NOW + 1)]
    a.on_timer(NOW + 61)
    b.on_timer(NOW + 61)
    assert first.sender.k is None
    assert first.receiver.k is None
    assert first not in a.sessions_for(world.bob.peer_id)
    before = b.rejections["unknown-session"] + b.rejections["replay"]
    for f in recorded:
        b.receive(f, NOW + 62)
    assert b.rejections["unknown-session"] + b.rejections["replay"] == before + len(recorded)
